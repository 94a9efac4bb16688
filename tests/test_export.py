"""`tunelab export`: GGUF files that transformers' own GGUF reader and llama.cpp load with the source's
logits and greedy tokens, with the chat template and end-of-turn token a run was trained with; merged
safetensors; the errors a user can meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from tiny_models import tiny_bert_dir, tiny_llama_dir

TEXT = "What is the capital of France? The capital of France is Paris. And of Spain? Madrid. Germany? Berlin."


def tiny_gemma3_dir(folder: Path) -> Path:
    """A 4-layer Gemma-3 (3 sliding-window layers, then a full one... as llama.cpp's pattern needs 5 + 1:
    6 layers) with the tiny byte-level BPE tokenizer (no chat template, BOS added)."""
    from tiny_tokenizer import base_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = base_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # random norms around 0 (HF's convention: the norm multiplies by 1 + w)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    tiny_llama_dir(root / "llama")
    tiny_gemma3_dir(root / "gemma3")
    tiny_bert_dir(root / "bert")
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."} for i in range(48)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lora.yaml").write_text(
        f"method: sft\nmodel: {root / 'gemma3'}\noutput_dir: {root / 'runs' / 'lora'}\n"
        f"data: {{train: {root / 'train.jsonl'}, max_length: 64, template: alpaca}}\ntuning: {{mode: lora, lora: {{r: 4}}}}\n"
        "train: {max_steps: 4, batch_size: 8, lr: 5e-2, warmup_ratio: 0, precision: fp32}\n")
    code, _, err = run_cli("train", str(root / "lora.yaml"))
    assert code == 0, err
    return root


def export(target: Path | str, out: Path, *flags: str) -> Path:
    code, _, err = run_cli("export", str(target), str(out), *flags)
    assert code == 0, err
    return out


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def source_model(folder: Path):
    from tunelab.models.load import load_causal_lm

    model, tokenizer = load_causal_lm(folder)
    return model.eval(), tokenizer


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_transformers_reads_every_type_with_the_sources_logits(workspace, arch):
    source, tokenizer = source_model(workspace / arch)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    want = logits(source, ids)
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        path = export(workspace / arch, workspace / f"{arch}-{kind}.gguf", "--type", kind)
        model, read = gguf_model(path)
        assert read(TEXT).input_ids == ids[0].tolist(), kind  # the tokenizer went in whole
        got = logits(model, ids)
        if kind == "f32":
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        elif kind == "f16":
            assert float((got - want).abs().max() / want.abs().max()) < 1e-2
        elif kind == "q8_0":  # the real models' top-1 test is below; a tiny random model's logits are too flat
            assert float((got - want).abs().max() / want.abs().max()) < 5e-2
        assert got.shape == want.shape


def test_a_lora_run_is_merged_and_carries_its_template_and_end_token(workspace):
    import gguf

    source, tokenizer = source_model(workspace / "runs" / "lora" / "final")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    path = export(workspace / "runs" / "lora", workspace / "lora.gguf", "--type", "f32")
    model, _ = gguf_model(path)
    torch.testing.assert_close(logits(model, ids), logits(source, ids), atol=1e-4, rtol=0)
    base, _ = source_model(workspace / "gemma3")
    assert not torch.allclose(logits(base, ids), logits(source, ids), atol=1e-3)  # the adapter did change it
    fields = gguf.GGUFReader(str(path)).fields
    template = fields["tokenizer.chat_template"].contents()
    assert "### Response:" in template  # the Alpaca template the run was trained with
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.convert_tokens_to_ids("<eos>")


def test_a_chat_model_stops_at_its_end_of_turn_token(workspace):
    import gguf

    fields = gguf.GGUFReader(str(export(workspace / "llama", workspace / "chat.gguf"))).fields
    _, tokenizer = source_model(workspace / "llama")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template


def test_safetensors_is_the_merged_plain_checkpoint(workspace):
    from transformers import AutoModelForCausalLM

    source, tokenizer = source_model(workspace / "runs" / "lora" / "final")
    out = export(workspace / "runs" / "lora", workspace / "merged", "--format", "safetensors")
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    torch.testing.assert_close(logits(plain, ids), logits(source, ids), atol=1e-4, rtol=0)


def test_an_export_never_overwrites_unasked_and_leaves_no_partial_file(workspace):
    out = workspace / "kept.gguf"
    out.write_text("the user's file")
    code, _, err = run_cli("export", str(workspace / "llama"), str(out))
    assert code == 1 and "already exists; pass --force" in err and out.read_text() == "the user's file"
    export(workspace / "llama", out, "--force")
    assert out.read_bytes()[:4] == b"GGUF"
    assert not [p for p in workspace.iterdir() if p.name.startswith(".kept.gguf")]


def test_what_cannot_be_exported_says_why(workspace):
    code, _, err = run_cli("export", str(workspace / "bert"), str(workspace / "bert.gguf"))
    assert code == 1 and "llama, gemma3_text" in err and not (workspace / "bert.gguf").exists()
    code, _, err = run_cli("export", str(workspace / "llama"), str(workspace / "x.gguf"), "--type", "q5_k")
    assert code == 1 and "--type q5_k: expected one of f32, f16, bf16, q8_0, q4_0" in err
    code, _, err = run_cli("export", str(workspace / "llama"), str(workspace / "x"), "--format", "onnx")
    assert code == 1 and "--format onnx: expected one of gguf, safetensors" in err


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_the_real_models_q8_0_keeps_the_top_token_on_real_text(tmp_path, name):
    from tunelab.models import resolve_model

    source, tokenizer = source_model(resolve_model(name))
    text = Path("../shared/data/summarize/dialogsum.test.jsonl").read_text().splitlines()[0]
    ids = tokenizer(json.loads(text)["dialogue"], return_tensors="pt").input_ids[:, :256]
    model, read = gguf_model(export(name, tmp_path / f"{name}.gguf"))
    assert read.decode(ids[0]) == tokenizer.decode(ids[0])
    agree = float((logits(model, ids).argmax(-1) == logits(source, ids).argmax(-1)).float().mean())
    assert agree >= 0.95, agree
