"""Generative task fine-tuning (`method: task`): summarise, translate, answer, on (source, target) pairs.

    tunelab train configs/task-smollm2-dialogsum.yaml
    tunelab eval runs/task-smollm2-dialogsum --data ../shared/data/summarize/dialogsum.test.jsonl

A decoder-only model gets each source as the user turn `data.prompt` (through its chat template, or
the Alpaca layout) and learns the target only; an encoder-decoder model (T5, BART) reads the source
and learns the target as its decoder output. During training the evaluation data is scored by loss
and by generation (ROUGE-1/2/L, BLEU, chrF, exact match against every reference), on at most
`generation.max_examples` examples; at the end on all of them, with the predictions kept in
`eval_predictions.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from tunelab.config import RunConfig
from tunelab.data.batching import collate_seq2seq
from tunelab.data.dataset import read_pairs, read_split, renderer_for
from tunelab.errors import UserError
from tunelab.eval.files import write_predictions
from tunelab.eval.metrics import generation_metrics
from tunelab.infer.generate import predict_targets
from tunelab.models import resolve_model
from tunelab.models.load import check_causal_lm, is_encoder_decoder, pad_id, tuned_model
from tunelab.precision import resolve_precision, training_device
from tunelab.train.objectives import CausalLMObjective, Seq2SeqObjective
from tunelab.train.plan import BatchPlan, lm_eval_batches, lm_plan
from tunelab.train.run import Evaluation, Parts, Run


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run = Run(cfg, resume)
    folder = resolve_model(cfg.model)
    encoder_decoder = is_encoder_decoder(folder)
    if not encoder_decoder:
        check_causal_lm(folder, "method task (a decoder-only or an encoder-decoder model)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records, held_out = read_split(cfg.files(), read_pairs)
    renderer = renderer_for(tokenizer, cfg.data.options())
    model, objective, train, plan, eval_batches = (seq2seq_parts if encoder_decoder else decoder_parts)(
        folder, cfg, renderer, records, held_out, pad_id(tokenizer)
    )

    def generate(rows, what):
        return predict_targets(model, tokenizer, rows, renderer, encoder_decoder, cfg, what)

    architecture = "encoder-decoder" if encoder_decoder else "decoder"

    def announce(loop) -> str:
        return (
            f"  {architecture}: {len(train):,} training pairs, {len(held_out):,} for evaluation -> "
            f"{loop.total_steps} steps"
        )

    return run.train(
        Parts(
            model,
            objective,
            tokenizer,
            plan,
            resolve_precision(cfg.train.precision, training_device()),
            announce,
            None if encoder_decoder else renderer.template,
            eval_batches,
            evaluation=generation_evaluation(held_out, generate, cfg.generation.max_examples),
            summary={"train_examples": len(train), "eval_examples": len(held_out), "architecture": architecture},
        )
    )


def decoder_parts(folder: Path, cfg: RunConfig, renderer, records: list, held_out: list, pad: int):
    """A causal LM: each source as the user turn data.prompt, the target as the trained answer."""
    train = [e for e in renderer.pairs(records, cfg.data.prompt) if e.usable]
    evaluation = [e for e in renderer.pairs(held_out, cfg.data.prompt) if e.usable]
    model = tuned_model(folder, cfg.tuning, cfg.train.seed, cfg.train.neftune_alpha)
    plan, eval_batches = lm_plan(train, cfg.data, cfg.train, pad), lm_eval_batches(evaluation, cfg.data, cfg.train, pad)
    return model, CausalLMObjective(model, cfg.train.output_gradient), train, plan, eval_batches


def seq2seq_parts(folder: Path, cfg: RunConfig, renderer, records: list, held_out: list, pad: int):
    """An encoder-decoder: the source as the encoder's input, the target as the decoder's."""
    train = [e for e in renderer.seq2seq(records) if e.input_ids and e.labels]
    if not train:
        raise UserError(f"{cfg.data.train}: no pair left to train on (see `tunelab data validate`)")
    evaluation = renderer.seq2seq(held_out)
    size = cfg.train.batch_size
    model = tuned_model(folder, cfg.tuning, cfg.train.seed, cfg.train.neftune_alpha, "SEQ_2_SEQ_LM")
    plan = BatchPlan.grouped(
        len(train),
        size,
        cfg.train.seed,
        lambda g: collate_seq2seq([train[i] for i in g], pad),
        [len(e.input_ids) + len(e.labels) for e in train],
    )
    batches = [collate_seq2seq(evaluation[k : k + size], pad) for k in range(0, len(evaluation), size)]
    return model, Seq2SeqObjective(model), train, plan, batches or None


def generation_evaluation(held_out: list, generate, limit: int | None) -> Evaluation | None:
    """Generation scored against every reference: on the first `limit` held-out pairs during training,
    on all of them at the end (its predictions kept in eval_predictions.jsonl)."""
    if not held_out:
        return None

    def measure(complete: bool) -> dict:
        rows = held_out if complete else held_out[:limit]
        predictions = generate(rows, "final evaluation" if complete else "evaluating")
        return {
            **generation_metrics(predictions, [r.references or [r.target] for r in rows]),
            "predictions": predictions,
        }

    def keep(metrics: dict, run_dir: Path) -> dict:
        write_predictions(run_dir / "eval_predictions.jsonl", held_out, metrics["predictions"])
        return {k: v for k, v in metrics.items() if k != "predictions"}

    def report(metrics: dict) -> str:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        return f"tunelab: final evaluation on {len(held_out):,} examples: {shown}"

    return Evaluation(measure, report, keep, complete_in_training=limit is None or limit >= len(held_out))
