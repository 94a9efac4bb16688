"""`tunelab export`: GGUF files that transformers' own GGUF reader and llama.cpp load with the source's
logits and greedy tokens, with the chat template and end-of-turn token a run was trained with; merged
safetensors; the errors a user can meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DATA, run_cli
from tiny_models import DECODER_FAMILIES, tiny_bert_dir, tiny_decoder_dir, tiny_llama_dir

TEXT = "What is the capital of France? The capital of France is Paris. And of Spain? Madrid. Germany? Berlin."


def tiny_gemma3_dir(folder: Path) -> Path:
    """A 6-layer Gemma-3 (5 sliding-window layers, then a full one, llama.cpp's pattern; a window of 8,
    shorter than the texts; heads of 256 as Gemma-3-270M's, the attention scale llama.cpp and transformers'
    GGUF reader both assume) with the tiny byte-level BPE tokenizer (no chat template, BOS added)."""
    from tiny_tokenizer import base_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = base_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=8,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # random norms around 0 (HF's convention: the norm multiplies by 1 + w)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sharpen(folder: Path) -> None:
    """Larger Q and K weights: a random tiny model's attention is otherwise nearly uniform, and a wrong
    rotary layout would change nothing a test could see."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    sharpen(tiny_llama_dir(root / "llama"))
    tiny_gemma3_dir(root / "gemma3")
    tiny_bert_dir(root / "bert")
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."} for i in range(48)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lora.yaml").write_text(
        f"method: sft\nmodel: {root / 'gemma3'}\noutput_dir: {root / 'runs' / 'lora'}\n"
        f"data: {{train: {root / 'train.jsonl'}, max_length: 64, template: alpaca}}\ntuning: {{mode: lora, lora: {{r: 4}}}}\n"
        "train: {max_steps: 4, batch_size: 8, lr: 5e-2, warmup_ratio: 0, precision: fp32}\n"
    )
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
        else:  # q4_0: coarser, and still the source's logits (not a bare shape)
            assert float(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]) > 0.9
            assert float((got - want).abs().mean() / want.abs().mean()) < 0.5
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


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_lora_adapter_as_gguf_on_the_base_gguf_computes_the_merged_model(workspace, arch):
    """--format gguf-lora: llama.cpp applies the adapter file on top of the base's GGUF (no merge) and gets
    the adapted model's logits (within 1e-2 of the largest, as for f16 files: llama.cpp keeps its KV cache in
    f16), ten times closer than the base's own; llama's Q/K rows reordered in B as in the base."""
    from llama_cpp_child import in_child, tokens_and_logits

    run = workspace / "runs" / "lora"
    if arch == "llama":  # a run on the tiny Llama too: its q/k adapters carry the rotary reordering
        run = workspace / "runs" / "lora-llama"
        config = (workspace / "lora.yaml").read_text().replace(str(workspace / "gemma3"), str(workspace / "llama"))
        (workspace / "lora-llama.yaml").write_text(config.replace(str(workspace / "runs" / "lora"), str(run)))
        code, _, err = run_cli("train", str(workspace / "lora-llama.yaml"))
        assert code == 0, err
    base = export(workspace / arch, workspace / f"base-{arch}.gguf", "--type", "f32")
    adapter = export(run, workspace / f"adapter-{arch}.gguf", "--format", "gguf-lora")
    adapted, tokenizer = source_model(run / "final")
    plain, _ = source_model(workspace / arch)
    for prompt, (ids, scores) in zip(PROMPTS, in_child(tokens_and_logits, str(base), PROMPTS, str(adapter))):
        want, without = logits(adapted, torch.tensor([ids])), logits(plain, torch.tensor([ids]))
        off = float((torch.tensor(scores) - want).abs().max())
        assert off / float(want.abs().max()) < 1e-2, prompt  # llama.cpp's f16 KV cache, as in the f16 tests
        assert off < 0.1 * float((want - without).abs().max()), prompt  # the adapter is applied, not ignored
    with pytest.raises(AssertionError):  # a model that is no adapter is said to be none
        export(workspace / arch, workspace / "not-an-adapter.gguf", "--format", "gguf-lora")


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
    assert code == 1 and "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3" in err
    assert not (workspace / "bert.gguf").exists()
    code, _, err = run_cli("export", str(workspace / "llama"), str(workspace / "x.gguf"), "--type", "q5_k")
    assert code == 1 and "--type q5_k: expected one of f32, f16, bf16, q8_0, q4_0" in err
    code, _, err = run_cli("export", str(workspace / "llama"), str(workspace / "x"), "--format", "onnx")
    assert code == 1 and "--format onnx: expected one of gguf, gguf-lora, safetensors, vllm" in err


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_the_real_models_q8_0_keeps_the_top_token_on_real_text_and_imports_again(tmp_path, monkeypatch, name):
    """The real models' q8_0 exports, read back by `tunelab models pull` (transformers' own GGUF reader,
    de-quantized into a checkpoint): the same tokenizer, and the source's top token on >= 95% of the
    positions of a DialogSum dialogue."""
    from tunelab.models import resolve_model

    source, tokenizer = source_model(resolve_model(name))
    path = export(name, tmp_path / f"{name}.gguf")
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))  # the import goes to an empty cache
    code, out, err = run_cli("models", "pull", str(path))
    assert code == 0, err
    again, read = source_model(Path(out.strip().splitlines()[-1]))
    text = json.loads((DATA / "summarize" / "dialogsum.test.jsonl").read_text().splitlines()[0])["dialogue"]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert read(text).input_ids[:256] == ids[0].tolist()
    agree = float((logits(again, ids).argmax(-1) == logits(source, ids).argmax(-1)).float().mean())
    assert agree >= 0.95, agree


@pytest.mark.parametrize(
    "arch", ["llama"]
)  # transformers' GGUF import of the tiny gemma3 (a GPT-2 BPE) wants an unk token
def test_an_export_imports_again_with_the_same_logits(workspace, tunelab_home, arch):
    """Round trip: `tunelab models pull OUT.gguf` makes a checkpoint again, with the source's logits
    (Gemma-3's round trip is the real model's, above: transformers reads a Gemma GGUF's tokenizer only as
    SentencePiece, which the tiny gemma3's GPT-2 BPE is not)."""
    path = export(workspace / arch, workspace / f"again-{arch}.gguf", "--type", "f32")
    code, out, err = run_cli("models", "pull", str(path))
    assert code == 0, err
    folder = Path(out.strip().splitlines()[-1])
    assert folder.parent == tunelab_home / "models"
    source, tokenizer = source_model(workspace / arch)
    again, _ = source_model(folder)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    torch.testing.assert_close(logits(again, ids), logits(source, ids), atol=1e-4, rtol=0)


def test_the_metadata_reader_reads_what_ggufs_own_reader_reads(workspace):
    """models.gguf.read_metadata (hand-written for speed) against the gguf package's GGUFReader, every key
    of an export: strings, numbers, booleans, arrays of strings and of numbers."""
    from gguf import GGUFReader

    from tunelab.models.gguf import read_metadata

    path = export(workspace / "runs" / "lora", workspace / "metadata.gguf", "--type", "f16")
    mine = read_metadata(path)
    fields = {k: f for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    assert mine.keys() == fields.keys()

    def text(v):
        return v.decode() if isinstance(v, bytes) else [text(x) for x in v] if isinstance(v, list) else v

    for key, field in fields.items():
        kind, sub_type, value = mine[key]
        assert kind == field.types[0] and (sub_type is None) == (len(field.types) == 1), key
        assert text(value) == field.contents(), key
    assert len(mine["tokenizer.ggml.tokens"][2]) > 100 and mine["general.architecture"][2] == b"gemma3"


# --- llama.cpp runs what was exported -----------------------------------------------------------------

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Translate into German: the cat"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_computes_the_source_model(workspace, arch, kind):
    """llama.cpp tokenizes as transformers does, computes the source checkpoint's logits on three prompts
    (f16: 1e-2 of the largest; q8_0, whose activations llama.cpp quantizes too: 0.1; a wrong transform
    is off by the whole scale), and in f16 continues each greedily as transformers does,
    16 tokens (a tiny random model's logits are too flat for q8_0 noise to keep every argmax)."""
    from llama_cpp_child import greedy, in_child, tokens_and_logits

    path = export(workspace / arch, workspace / f"cpp-{arch}-{kind}.gguf", "--type", kind)
    model, tokenizer = source_model(workspace / arch)
    for prompt, (ids, scores) in zip(PROMPTS, in_child(tokens_and_logits, str(path), PROMPTS)):
        assert ids == tokenizer(prompt).input_ids, prompt
        got, want = torch.tensor(scores), logits(model, torch.tensor([ids]))
        assert float((got - want).abs().max() / want.abs().max()) < (1e-2 if kind == "f16" else 0.1), prompt
    if kind == "f16":
        prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS]
        for ids, got in zip(prompts, in_child(greedy, str(path), prompts, 16)):
            with torch.no_grad():
                want = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
            assert got == want[0, len(ids) :].tolist(), tokenizer.decode(ids)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> Path:
    """Every decoder family as a tiny random model (tests/tiny_models.py). Windows where llama.cpp draws
    them (Gemma-2's and Gemma-3's: 4, shorter than the prompts); none for Mistral and Phi-3, whose llama.cpp
    graphs have none (a windowed one is exported with its context bounded: the test after this one)."""
    root = tmp_path_factory.mktemp("families")
    for family in DECODER_FAMILIES:
        # `root / family` links to the model, whose folder names the export: not "phi3" (llama.cpp gives a
        # model named so Phi-3's own token fix-ups, looking up <s>, </s>, <unk>, <|endoftext|>, which the tiny
        # ChatML vocabulary lacks) nor "mistral" (transformers' GGUF reader takes a llama file named exactly
        # so for a Mistral architecture gguf-py does not have)
        folder = root / ("tiny-phi" if family == "phi3" else f"tiny-{family}")
        tiny_decoder_dir(folder, family, window=4 if family.startswith("gemma") else None)
        (root / family).symlink_to(folder)
    return root


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_computes_every_family(families, family, kind):
    """Each family exported (Llama 3's RoPE scaling as llama.cpp's per-frequency factors, Qwen2's biases,
    Qwen3's query/key norms, Gemma-2's soft-caps and alternating windows, Phi-3's fused projections, spare
    embedding rows as unused tokens) and run by llama.cpp: it tokenizes as transformers does and computes
    the source model's logits on three prompts (f16: 1e-2 of the largest; q8_0: 0.1), and in f16 continues
    each greedily as transformers' `generate` does, 16 tokens or to the end token."""
    from llama_cpp_child import greedy, in_child, tokens_and_logits

    source = (families / family).resolve()
    path = export(source, families / f"{family}-{kind}.gguf", "--type", kind)
    model, tokenizer = source_model(source)
    for prompt, (ids, scores) in zip(PROMPTS, in_child(tokens_and_logits, str(path), PROMPTS)):
        assert ids == tokenizer(prompt).input_ids, prompt
        got, want = torch.tensor(scores), logits(model, torch.tensor([ids]))
        assert got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) < (1e-2 if kind == "f16" else 0.1), prompt
    if kind == "f16":
        prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS]
        for ids, got in zip(prompts, in_child(greedy, str(path), prompts, 16)):
            with torch.no_grad():  # up to its end token, where generate stops (llama.cpp's greedy goes on)
                want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
            assert got[: len(want)] == want.tolist(), (family, tokenizer.decode(ids))


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_familys_lora_adapter_as_gguf_computes_the_adapted_model(families, tmp_path, family):
    """--format gguf-lora for each family: a LoRA adapter on every linear layer (Phi-3's fused qkv_proj and
    gate_up_proj, Qwen2's biased projections, Llama's reordered Q/K) applied by llama.cpp on the base's
    GGUF gives the adapted model's logits (1e-2 of the largest), ten times closer than the base's own."""
    from llama_cpp_child import in_child, tokens_and_logits
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    source = (families / family).resolve()
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(source), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a live adapter (peft starts B at zero)
    model.save_pretrained(tmp_path / "adapter")
    base = export(source, tmp_path / "base.gguf", "--type", "f32")
    adapter = export(tmp_path / "adapter", tmp_path / "adapter.gguf", "--format", "gguf-lora")
    adapted, tokenizer = source_model(tmp_path / "adapter")
    plain, _ = source_model(source)
    for prompt, (ids, scores) in zip(PROMPTS, in_child(tokens_and_logits, str(base), PROMPTS, str(adapter))):
        want, without = logits(adapted, torch.tensor([ids])), logits(plain, torch.tensor([ids]))
        off = float((torch.tensor(scores) - want).abs().max())
        assert off / float(want.abs().max()) < 1e-2, prompt
        assert off < 0.1 * float((want - without).abs().max()), prompt


def edited(source: Path, folder: Path, **changes) -> Path:
    """A copy of the checkpoint `source` with config.json `changes` (its weights as they are)."""
    import shutil

    shutil.copytree(source.resolve(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_what_llama_cpp_would_compute_otherwise_is_refused_before_any_weight_loads(families, tmp_path, monkeypatch):
    """A RoPE scaling llama.cpp does not take from this export, a Gemma attention scale or layer pattern it
    does not draw: one line each, and no weight loaded, no file written."""
    from tunelab.models import load

    monkeypatch.setattr(load, "load_causal_lm", lambda *a, **k: pytest.fail("weights loaded before the check"))
    cases = [
        (
            "qwen2",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 1e6,
                    "original_max_position_embeddings": 64,
                }
            },
            "RoPE scaling 'yarn' on a qwen2 model is not one llama.cpp reproduces",
        ),
        ("gemma2", {"query_pre_attn_scalar": 256}, "scales attention by 1/sqrt(256), llama.cpp by 1/sqrt(16)"),
        ("gemma2", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "every 2th layer full"),
        ("gemma2", {"tie_word_embeddings": False}, "output matrix from the embedding"),
    ]
    for i, (family, changes, message) in enumerate(cases):
        folder = edited(families / family, tmp_path / f"{family}-{i}", **changes)
        code, _, err = run_cli("export", str(folder), str(tmp_path / f"{i}.gguf"))
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"{i}.gguf").exists()


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_a_window_llama_cpp_does_not_draw_bounds_the_context(families, tmp_path, family):
    """Mistral's and Phi-3's sliding windows are not in llama.cpp's graphs for them: the export claims the
    window as its context, within which sliding and full attention are the same."""
    from tunelab.models.gguf import read_metadata

    folder = edited(families / family, tmp_path / family, sliding_window=24)
    path = export(folder, tmp_path / f"{family}.gguf", "--type", "f16")
    arch = read_metadata(path, "general.architecture")["general.architecture"][2].decode()
    assert read_metadata(path, f"{arch}.context_length")[f"{arch}.context_length"][2] == 24
    whole = export(families / family, tmp_path / f"{family}-whole.gguf", "--type", "f16")
    assert read_metadata(whole, f"{arch}.context_length")[f"{arch}.context_length"][2] == 256


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3"])
def test_a_familys_export_imports_again_with_the_same_logits(families, tunelab_home, family):
    """`tunelab models pull OUT.gguf` of the families transformers' GGUF reader rebuilds (Mistral's as the
    llama it is to llama.cpp, Qwen2's biases, Phi-3's fused projections): the source's logits again. Its
    reader loses Llama 3's RoPE scaling and Qwen3's head size, and reads Gemma's tokenizer only as
    SentencePiece: those are refused on import (the test after this one)."""
    path = export((families / family).resolve(), families / f"again-{family}.gguf", "--type", "f32")
    code, out, err = run_cli("models", "pull", str(path))
    assert code == 0, err
    folder = Path(out.strip().splitlines()[-1])
    source, tokenizer = source_model((families / family).resolve())
    again, read = source_model(folder)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert read(TEXT).input_ids == ids[0].tolist()
    torch.testing.assert_close(logits(again, ids), logits(source, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "family, message",
    [
        ("llama3", "drops Llama 3's RoPE scaling"),
        ("qwen3", "head size"),
    ],
)
def test_a_gguf_transformers_would_misread_is_refused_on_import(families, tunelab_home, family, message):
    """What transformers' GGUF reader would fill with its own defaults (Llama 3's RoPE scaling, Qwen3's head
    size) is a one-line error before the import starts, and nothing is installed."""
    path = export((families / family).resolve(), families / f"misread-{family}.gguf", "--type", "f32")
    code, _, err = run_cli("models", "pull", str(path))
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error:") and message in last, err
    assert not (tunelab_home / "models").exists() or not any((tunelab_home / "models").iterdir())


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_familys_q4_k_m_is_the_source_model_in_llama_cpp(families, family):
    """llama.cpp's own quantizer takes every family's f16 export (its tensor names, Phi-3's fused matrices,
    Llama 3's rope_freqs) and the q4_k_m file computes the source model within 4-bit noise: its logits
    correlate with the source's (a wrong transform leaves none), as the q4_0 files' do."""
    from llama_cpp_child import in_child, tokens_and_logits

    source = (families / family).resolve()
    path = export(source, families / f"k-{family}.gguf", "--type", "q4_k_m")
    model, tokenizer = source_model(source)
    for prompt, (ids, scores) in zip(PROMPTS, in_child(tokens_and_logits, str(path), PROMPTS)):
        got, want = torch.tensor(scores), logits(model, torch.tensor([ids]))
        assert float(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]) > 0.9, prompt
        assert float((got - want).abs().mean() / want.abs().mean()) < 0.5, prompt


@pytest.mark.parametrize("kind", ["q4_k_m", "q6_k"])
def test_llama_cpps_own_k_quants_are_written_from_the_f16_file(workspace, kind):
    """--type q4_k_m / q6_k: llama.cpp's quantizer on the f16 export (the file says the K-quant type, no f16
    file is left beside it), and llama.cpp computes the source model from it within 4-bit noise."""
    import gguf
    from llama_cpp_child import in_child, tokens_and_logits

    path = export(workspace / "llama", workspace / f"k-{kind}.gguf", "--type", kind)
    file_type = gguf.GGUFReader(str(path)).fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == int(getattr(gguf.LlamaFileType, f"MOSTLY_{kind.upper()}"))
    assert {p.name for p in path.parent.glob(f"*k-{kind}*")} == {path.name, path.with_suffix(".Modelfile").name}
    model, tokenizer = source_model(workspace / "llama")
    for prompt, (ids, scores) in zip(PROMPTS, in_child(tokens_and_logits, str(path), PROMPTS)):
        assert ids == tokenizer(prompt).input_ids, prompt
        got, want = torch.tensor(scores), logits(model, torch.tensor([ids]))
        assert float((got - want).abs().max() / want.abs().max()) < 0.2, prompt


def test_llama_cpp_answers_a_chat_as_tunelab_generate_and_stops(tmp_path):
    """The real SmolLM2: llama.cpp renders a chat with the exported template and stops at the end-of-turn
    token (f16, q8_0, and llama.cpp's own q4_k_m); the f16 answer is `tunelab generate`'s (greedy) word for
    word."""
    from llama_cpp_child import chat, in_child

    question = "Give three tips for staying healthy."
    code, answer, err = run_cli("generate", "smollm2-135m-instruct", question, "--max-new-tokens", "200")
    assert code == 0, err
    for kind in ("f16", "q8_0", "q4_k_m"):
        path = export("smollm2-135m-instruct", tmp_path / f"smollm2-{kind}.gguf", "--type", kind)
        reply = in_child(chat, str(path), [{"role": "user", "content": question}], 200)
        assert reply["finish_reason"] == "stop" and reply["message"]["content"].strip(), kind
        if kind == "f16":
            assert reply["message"]["content"].strip() == answer.strip()


# --- the Ollama Modelfile -----------------------------------------------------------------------------


def test_a_modelfile_beside_the_gguf_translates_the_template_and_stops_at_end_of_turn(workspace):
    export(workspace / "llama", workspace / "ollama-chat.gguf")
    text = (workspace / "ollama-chat.Modelfile").read_text()
    assert "FROM ./ollama-chat.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'TEMPLATE """{{- $system := .System }}{{- if $system }}<|im_start|>system' in text  # ChatML
    export(workspace / "runs" / "lora", workspace / "ollama-alpaca.gguf")
    text = (workspace / "ollama-alpaca.Modelfile").read_text()
    assert "### Instruction:\n{{ .Content }}" in text and "{{ .Content }}<eos>" in text
    assert 'PARAMETER stop "<eos>"' in text
    code, _, err = run_cli("export", str(workspace / "llama"), str(workspace / "ollama-chat.gguf"))
    assert code == 1 and "already exists" in err


def test_layouts_are_recognised_by_what_the_template_renders():
    from tiny_tokenizer import chat_tokenizer

    from tunelab.export.ollama import recognise

    tokenizer = chat_tokenizer()
    found = recognise(tokenizer)
    assert found.layout.name == "ChatML" and found.system is None
    tokenizer.chat_template = (  # SmolLM2's layout: a default system turn when the conversation has none
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
        "You are SmolLM.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    found = recognise(tokenizer)
    assert found.layout.name == "ChatML" and found.system.startswith("You are")  # the default one, for SYSTEM
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
        "else 'user') + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    )
    assert recognise(tokenizer) is None  # a system turn rendered as a user turn: not Gemma's layout
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert recognise(tokenizer) is None


# --- the Modelfile's TEMPLATE, rendered by Go's text/template as Ollama renders it ---------------------

GEMMA3_TEMPLATE = (  # the layout of Gemma-3's instruction-tuned template, text turns only
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + (prefix if loop.first else '') }}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [
        {"role": "user", "content": "Two\nlines"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Again"},
    ],
]


@pytest.fixture(scope="module")
def ollama_render(tmp_path_factory):
    """Ollama's prompt for (TEMPLATE, SYSTEM, messages): tests/go/ollama_render.go, built once."""
    import os
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("Go is not installed: .ci/run installs Debian's golang-go for the Ollama template check")
        pytest.skip("the Ollama template check needs Go: apt-get install golang-go")
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    subprocess.run(
        [go, "build", "-o", str(binary), str(Path(__file__).parent / "go" / "ollama_render.go")],
        check=True,
        capture_output=True,
    )

    def render(template: str, system: str | None, messages: list[dict]) -> str:
        if system is not None and messages[0]["role"] != "system":  # Ollama adds the Modelfile's SYSTEM so
            messages = [{"role": "system", "content": system}, *messages]
        done = subprocess.run(
            [str(binary)],
            input=json.dumps({"template": template, "messages": messages}),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    return render


def modelfile_block(text: str, key: str) -> str | None:
    import re

    found = re.search(key + r' """(.*?)"""\n', text, re.S)
    return found.group(1) if found else None


TEMPLATES = Path(__file__).parent / "templates"  # the families' own chat templates (templates/README.md)
FAMILY_TEMPLATES = {  # template file: (the layout recognised, a default system prompt, a preamble)
    "meta-llama-Llama-3.2-3B-Instruct": ("Llama 3", False, True),
    "Qwen-Qwen2.5-7B-Instruct": ("ChatML", True, False),
    "Qwen-Qwen3-0.6B": ("ChatML", False, False),
    "mistralai-Mistral-Nemo-Instruct-2407": ("Mistral", False, False),
    "google-gemma-2-2b-it": ("Gemma", False, False),
    "microsoft-Phi-3.5-mini-instruct": ("Phi-3", False, False),
}


@pytest.mark.parametrize("layout", ["chatml", "smollm2", "gemma3", "alpaca", *FAMILY_TEMPLATES])
def test_ollama_renders_the_modelfile_template_as_the_jinja_template(ollama_render, layout):
    """Every layout tunelab translates, on the families' own templates (Llama 3.2's, with its dated
    preamble before every system prompt; Qwen2.5's default system prompt; Qwen3's; Mistral-Nemo's, the
    system prompt in the last user turn; Gemma-2's, which refuses a system turn; Phi-3.5's): Go's
    text/template renders the Modelfile's TEMPLATE (with its SYSTEM where the conversation has none) into
    the very text the Jinja chat template renders, on every conversation the template takes."""
    from tiny_tokenizer import base_tokenizer, chat_tokenizer

    from tunelab.data.render import chat_template_for
    from tunelab.export.ollama import _jinja, modelfile, recognise

    tokenizer = chat_tokenizer() if layout in ("chatml", "smollm2") else base_tokenizer()
    if layout in FAMILY_TEMPLATES:  # (their BOS is the one the tokenizer adds, as the runtime does)
        tokenizer.chat_template = (TEMPLATES / f"{layout}.jinja").read_text()
        name, default, preamble = FAMILY_TEMPLATES[layout]
        found = recognise(tokenizer)
        assert found is not None and found.layout.name == name, layout
        assert (found.system is not None, bool(found.preamble)) == (default, preamble)
    if layout == "smollm2":
        tokenizer.chat_template = (
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
            "You are SmolLM, a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% endif %}"
        )
    elif layout == "gemma3":
        tokenizer.chat_template = GEMMA3_TEMPLATE
    elif layout == "alpaca":
        tokenizer.chat_template = chat_template_for(tokenizer, "alpaca")
    text = modelfile("model.gguf", tokenizer, tokenizer.eos_token)
    template, system = modelfile_block(text, "TEMPLATE"), modelfile_block(text, "SYSTEM")
    assert template is not None, text
    if layout not in FAMILY_TEMPLATES:
        assert (system is not None) == (layout == "smollm2")
    compared = 0
    for messages in CONVERSATIONS:
        want = _jinja(tokenizer, messages)
        if want is None:  # a conversation the template refuses (Gemma-2: a system turn)
            assert layout == "google-gemma-2-2b-it" and messages[0]["role"] == "system"
            continue
        assert ollama_render(template, system, messages) == want, messages
        compared += 1
    assert compared >= 2
