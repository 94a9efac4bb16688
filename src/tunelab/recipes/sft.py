"""Instruction-tuning (`method: sft`): a causal LM learns to answer, with the loss on the answers only.

    tunelab train configs/sft-smollm2-alpaca.yaml
    tunelab train --resume runs/sft-smollm2          # after a crash or kill: continues exactly

The model (full, LoRA/DoRA or freeze) trains on the rendered examples, packed or grouped; held-out
examples (data.eval, or data.eval_split) give the eval loss and token accuracy. `final/` is loadable by
plain transformers (or peft, for an adapter), with the tokenizer and the chat template used in training.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from tunelab.config import MixSource, RunConfig
from tunelab.data.dataset import DataOptions, Split, Tokenized, renderer_for, split_records, tokenized_for_training
from tunelab.models import resolve_model
from tunelab.models.load import check_causal_lm, pad_id, tuned_model
from tunelab.precision import resolve_precision, training_device
from tunelab.train.objectives import CausalLMObjective
from tunelab.train.plan import lm_eval_batches, lm_plan
from tunelab.train.run import Parts, Run


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """Train as `cfg` says into `cfg.output_dir`; with `resume`, continue from its last checkpoint."""
    run = Run(cfg, resume)
    folder = resolve_model(cfg.model)
    check_causal_lm(folder, "instruction-tuning (method sft)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    options = cfg.data.options()
    data = tokenized_for_training(cfg.data.train, tokenizer, options)
    held_out = tokenized_for_training(cfg.data.eval, tokenizer, options) if cfg.data.eval else None
    template = renderer_for(tokenizer, options).template
    model = tuned_model(folder, cfg.tuning, cfg.train.seed, cfg.train.neftune_alpha)
    train, evaluation = split_records(usable(data), usable(held_out), cfg.split())
    for source in cfg.data.mix:
        more, more_held_out = mixed_in(source, tokenizer, options, cfg.train.seed)
        train, evaluation = train + more, evaluation + more_held_out
    precision = resolve_precision(cfg.train.precision, training_device())

    def announce(loop) -> str:
        return (
            f"  data: {len(train):,} training examples, {len(evaluation):,} for evaluation ({data_report(data)}) "
            f"-> {loop.plan.items:,} {cfg.data.batching} items, {loop.total_steps} steps"
        )

    return run.train(
        Parts(
            model,
            CausalLMObjective(model, cfg.train.output_gradient),
            tokenizer,
            lm_plan(train, cfg.data, cfg.train, pad_id(tokenizer)),
            precision,
            announce,
            template,
            eval_batches=lm_eval_batches(evaluation, cfg.data, cfg.train, pad_id(tokenizer)),
            summary={"train_examples": len(train)},
        )
    )


def mixed_in(source: MixSource, tokenizer, options: DataOptions, seed: int) -> tuple[list, list]:
    """(training, held-out) examples of one `data.mix` file: read, rendered and split as data.train is, with
    its own eval_split and max_examples (seeded by train.seed)."""
    from dataclasses import replace

    data = tokenized_for_training(source.train, tokenizer, replace(options, prompt=source.prompt or options.prompt))
    return split_records(usable(data), [], Split(source.eval_split, source.max_examples, seed))


def usable(data: Tokenized | None) -> list:
    """The examples that have something to train on (none for no data)."""
    return [e for e in data.examples if e.usable] if data else []


def data_report(data: Tokenized) -> str:
    """What happened to the file's rows on their way to examples, in words."""
    counts = {k: sum(e.status == k for e in data.examples) for k in ("truncated", "dropped", "untrained")}
    skipped = sum(p.severity == "warning" for p in data.problems)
    return (
        f"of the file's rows: {skipped} skipped when read; {counts['truncated']} truncated, {counts['dropped']} "
        f"dropped, {counts['untrained']} with nothing to train{'; cached' if data.cached else ''}"
    )
