"""Every model family tunelab supports, each a tiny random model built from its transformers config class
(tests/tiny_models.py). Decoders (Llama, with and without Llama 3's RoPE scaling; Qwen2; Qwen3; Mistral;
Gemma-2; Gemma-3; Phi-3) through training: each fused path computes what plain transformers and peft
compute (or is bypassed, shown here), and sft (LoRA and full), dpo and reward runs finish with a final/
that plain transformers and peft load; serving is in test_serve.py (`test_every_family_batches_...`),
export in test_export.py (`test_llama_cpp_computes_every_family`). Encoders (BERT, RoBERTa, DeBERTa-v2,
ModernBERT) learn a classification task; encoder-decoders (T5, BART) a generation task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import preference_pairs
from tiny_models import (
    DECODER_FAMILIES,
    ENCODER_FAMILIES,
    SEQ2SEQ_FAMILIES,
    tiny_bert_dir,
    tiny_decoder,
    tiny_decoder_dir,
    tiny_t5_dir,
)

IDS = torch.tensor([[5, 9, 13, 2, 7, 11, 3, 40, 41, 42, 17, 19, 23, 29, 31, 37]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def forward_backward(model, ids=IDS, dtype=None):
    """(logits, {name: gradient}) of a squared-logits loss, under `dtype` autocast when given."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_fused_norms_compute_what_each_familys_norms_compute(family, tmp_path):
    """Every RMSNorm of the family (Qwen3's query and key norms, Gemma-2's four a layer, Phi-3's) takes the
    hand-written backward, with transformers' outputs bit for bit and its gradients to fp32 rounding; the
    model loaded as a run loads it, and switched to eval and back (an evaluation between steps: transformers
    >= 5.25 kernelizes again there, which would drop the fused forwards)."""
    from transformers import AutoModelForCausalLM

    from tunelab.train.fused_norm import fused_norms

    tiny_decoder(family, 300).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train()
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    want, want_grads = forward_backward(model)
    with fused_norms(model) as fused:
        assert fused == len(norms) >= 9, (fused, len(norms))
        model.eval().train()
        assert all("forward" in vars(m) for m in norms)
        got, grads = forward_backward(model)
    assert torch.equal(got, want)
    assert grads.keys() == want_grads.keys()
    assert all(rel(grads[n], g) < 1e-5 for n, g in want_grads.items() if g.norm() > 0), family
    assert not any("forward" in vars(m) for m in norms)  # transformers' own forward again


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_fused_lora_computes_what_peft_computes_in_every_family(family):
    """LoRA on all linear layers (Phi-3's fused qkv_proj and gate_up_proj, Qwen2's biased projections):
    the fused forward gives peft's outputs and adapter gradients to fp32 rounding."""
    from peft import LoraConfig, get_peft_model

    from tunelab.train.fused_lora import fused_lora

    torch.manual_seed(1)
    model = get_peft_model(tiny_decoder(family, 300), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a live adapter (peft starts B at zero)
    lora = [m for m in model.modules() if hasattr(m, "lora_A")]
    want, want_grads = forward_backward(model)
    with fused_lora(model) as fused:
        assert fused == len(lora) > 0
        got, grads = forward_backward(model)
    assert rel(got, want) < 1e-6
    assert all(rel(grads[n], g) < 1e-5 for n, g in want_grads.items()), family
    if family == "phi3":
        assert {type(m.base_layer).__name__ for m in lora} == {"Linear"}
        assert any(n.endswith("qkv_proj") for n, m in model.named_modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_packed_rows_give_each_example_what_it_gives_alone_in_every_family(family, monkeypatch):
    """On the CPU, training attends within each example of a packed row on its own (no block-diagonal
    mask): every example's hidden states, and the gradient they give every weight, equal its forward
    alone, sliding windows (4) drawn inside each example, and the config says sdpa again afterwards.
    Gemma-2 attends eagerly (sdpa has no soft-capping), so the per-example path stands aside for it and
    transformers' own block-diagonal mask does the work."""
    from tunelab.data.batching import collate_packed, pack
    from tunelab.data.render import Example
    from tunelab.train import packed_attention
    from tunelab.train.objectives import CausalLMObjective

    model = tiny_decoder(family, 300)
    objective = CausalLMObjective(model)
    if family == "gemma2":
        assert model.config._attn_implementation == "eager" and objective.packed == []
    else:
        assert objective.packed, "the tiny models use sdpa on the CPU"
    calls = []
    segments = packed_attention._segment_starts
    monkeypatch.setattr(packed_attention, "_segment_starts", lambda *a: calls.append(1) or segments(*a))
    generator = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 9, 3, 12, 7, 4)]
    data = [Example(ids, [-100] + ids[1:]) for ids in texts]
    rows = pack(data, 24)
    batch = collate_packed(rows, pad_id=0)
    packed = objective.hidden(batch["input_ids"], position_ids=batch["position_ids"])
    weights = torch.zeros(packed.shape)  # on the examples' positions, not on a row's padding
    for r, row in enumerate(rows):
        width = sum(len(data[i].input_ids) for i in row.examples)
        weights[r, :width] = torch.randn(width, packed.shape[2], generator=generator)
    (packed * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for r, row in enumerate(rows):
        start = 0
        for i in row.examples:
            ids = torch.tensor([data[i].input_ids])
            alone = model.model(input_ids=ids, use_cache=False).last_hidden_state
            span = slice(start, start + ids.shape[1])
            assert torch.allclose(packed[r, span], alone[0], atol=1e-5), (r, i)
            (alone[0] * weights[r, span]).sum().backward()
            start += ids.shape[1]
    assert bool(calls) == (family != "gemma2")  # the per-example path ran, or stood aside
    assert grads and grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in grads:
            assert (grads[name] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-6, name
    assert all(c._attn_implementation == "sdpa" for c in objective.packed)


# --- runs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."} for i in range(24)
    ]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(24, 0)))
    words = {"pos": ["good", "great", "lovely", "superb"], "neg": ["bad", "awful", "poor", "terrible"]}
    labels = [{"text": f"the movie was {words[label][i % 4]}", "label": label} for i in range(16) for label in words]
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    task = [{"source": s, "target": t} for s, t in [("what is the capital of france", "paris"), ("germany", "berlin")]]
    (root / "pairs-task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task * 8))
    return root


FILES = {
    "sft": "sft.jsonl",
    "dpo": "pairs.jsonl",
    "reward": "pairs.jsonl",
    "classify": "labels.jsonl",
    "task": "pairs-task.jsonl",
}


def train(
    data: Path,
    model: Path,
    run: Path,
    method: str,
    tuning: str,
    *overrides: str,
    steps: int = 4,
    lr: float = 1e-2,
    batch: int = 4,
) -> list[float]:
    """A short fp32 run; its logged training losses."""
    path = run.with_suffix(".yaml")
    lora = ", lora: {r: 4}" if tuning == "lora" else ""
    path.write_text(
        f"method: {method}\nmodel: {model}\noutput_dir: {run}\n"
        f"data: {{train: {data / FILES[method]}, max_length: 48}}\ntuning: {{mode: {tuning}{lora}}}\n"
        f"train: {{max_steps: {steps}, batch_size: {batch}, lr: {lr}, warmup_ratio: 0, log_every: 1, precision: fp32}}\n"
    )
    code, _, err = run_cli("train", str(path), *overrides)
    assert code == 0, err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e["split"] == "train"]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_family_trains_sft_dpo_and_reward_into_what_plain_libraries_load(family, data, tmp_path, tunelab_home):
    """sft with LoRA, fused and not (the same losses in fp32), and with all weights; dpo and a reward
    model with LoRA. Each final/ loads in plain transformers and peft (a LoRA reward model is saved merged)
    and computes what was trained (not the base model)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = tiny_decoder_dir(tmp_path / family, family)
    fused = train(data, model, tmp_path / "lora", "sft", "lora")
    plain = train(data, model, tmp_path / "plain", "sft", "lora", "train.fused_lora=false")
    assert fused == pytest.approx(plain, rel=1e-5) and fused[-1] < fused[0]
    full = train(data, model, tmp_path / "full", "sft", "full")
    assert full[-1] < full[0]
    train(data, model, tmp_path / "dpo", "dpo", "lora")
    train(data, model, tmp_path / "reward", "reward", "lora")

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model).eval()(IDS).logits
        for run in ("lora", "dpo"):
            tuned = AutoPeftModelForCausalLM.from_pretrained(tmp_path / run / "final").eval()
            assert not torch.allclose(tuned(IDS).logits, base, atol=1e-4), run
        assert not torch.allclose(
            AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").eval()(IDS).logits, base, atol=1e-4
        )
        scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward" / "final").eval()
        assert scorer(IDS).logits.shape == (1, 1)  # the reward model is saved merged, head and all


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_every_encoder_family_learns_to_classify_into_what_transformers_loads(family, data, tmp_path, tunelab_home):
    """method: classify on BERT, RoBERTa, DeBERTa-v2 and ModernBERT: LoRA fused and not (the same losses in
    fp32), all weights learning the one-word sentiment task; final/ is a plain sequence classifier that
    transformers' pipeline runs with the label names."""
    from transformers import pipeline

    model = tiny_bert_dir(tmp_path / family, family=family)
    fused = train(data, model, tmp_path / "lora", "classify", "lora")
    plain = train(data, model, tmp_path / "plain", "classify", "lora", "train.fused_lora=false")
    assert fused == pytest.approx(plain, rel=1e-5)
    full = train(data, model, tmp_path / "full", "classify", "full", steps=48, lr=3e-3, batch=16)
    assert max(full[-4:]) < 0.9 * min(full[:4]), full
    classifier = pipeline("text-classification", model=str(tmp_path / "full" / "final"))
    assert [p["label"] for p in classifier(["the movie was great", "the movie was awful"])] == ["pos", "neg"]


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_every_seq2seq_family_learns_a_task_into_what_transformers_and_peft_load(family, data, tmp_path, tunelab_home):
    """method: task on T5 and BART: LoRA fused and not (the same losses in fp32), all weights learning two
    answers; final/ loads in plain transformers (full) and peft (LoRA) and writes what was trained."""
    from peft import AutoPeftModelForSeq2SeqLM
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = tiny_t5_dir(tmp_path / family, family=family)
    fused = train(data, model, tmp_path / "lora", "task", "lora")
    plain = train(data, model, tmp_path / "plain", "task", "lora", "train.fused_lora=false")
    assert fused == pytest.approx(plain, rel=1e-5)
    full = train(data, model, tmp_path / "full", "task", "full", steps=40)
    assert full[-1] < full[0] / 4, full
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "full" / "final")
    trained = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "full" / "final").eval()
    ids = tokenizer(["germany" + tokenizer.eos_token], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = trained.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "berlin" in tokenizer.decode(out[0], skip_special_tokens=True)
    adapter = AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "lora" / "final").eval()
    with torch.no_grad():
        base = AutoModelForSeq2SeqLM.from_pretrained(model).eval()
        start = torch.tensor([[trained.config.decoder_start_token_id]])
        assert not torch.allclose(
            adapter(**ids, decoder_input_ids=start).logits, base(**ids, decoder_input_ids=start).logits, atol=1e-4
        )
