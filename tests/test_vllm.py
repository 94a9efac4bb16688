"""The vLLM handoff (`tunelab export RUN OUT --format vllm`): the adapter directory vLLM 0.33 loads and the
command that serves it, and the adapters vLLM would refuse, refused here with its reason and the fix.
vLLM itself is a CUDA build: benchmarks/vllm_handoff.py runs it where there is a GPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from tiny_models import tiny_decoder_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    tiny_decoder_dir(root / "llama", "llama")
    tiny_decoder_dir(root / "qwen2", "qwen2")
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."} for i in range(16)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lora.yaml").write_text(
        f"method: sft\nmodel: {root / 'llama'}\noutput_dir: {root / 'run'}\n"
        f"data: {{train: {root / 'train.jsonl'}, max_length: 48}}\ntuning: {{mode: lora, lora: {{r: 4}}}}\n"
        "train: {max_steps: 2, batch_size: 4, lr: 1e-2, warmup_ratio: 0, precision: fp32}\n"
    )
    code, _, err = run_cli("train", str(root / "lora.yaml"))
    assert code == 0, err
    return root


def test_a_lora_run_exports_as_vllm_serves_it(workspace, tmp_path):
    """The adapter, tokenizer, chat template and model card, and a serve.sh whose `vllm serve` line names the
    base as the run named it, the adapter by an absolute path (vLLM takes a relative one for a Hub repo),
    the smallest --max-lora-rank that holds r (4 -> 8) and the run's chat template; run by a shell with a
    stand-in `vllm` on PATH that prints what it was given. The directory still loads in plain peft."""
    from peft import AutoPeftModelForCausalLM

    from tunelab.export.vllm import _tensor_names, problems

    out = tmp_path / "run-vllm"
    code, printed, err = run_cli("export", str(workspace / "run"), str(out), "--format", "vllm")
    assert code == 0, err
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert {"serve.sh", "README.md"} <= files
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == json.loads((workspace / "run" / "final" / "adapter_config.json").read_text())
    assert problems(config, _tensor_names(out / "adapter_model.safetensors"), "llama") == []

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (bin_dir / "vllm").chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        ["sh", str(out / "serve.sh"), "--port", "8001"],
        cwd=elsewhere,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    assert args[:2] == ["serve", str(workspace / "llama")] and "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == f"run={out}"
    assert args[args.index("--max-lora-rank") + 1] == "8"
    assert args[args.index("--chat-template") + 1] == str(out / "chat_template.jinja")
    assert args[-2:] == ["--port", "8001"]  # the operator's own flags pass on
    AutoPeftModelForCausalLM.from_pretrained(out)


def adapter(base: Path, folder: Path, **lora) -> Path:
    """A peft LoRA adapter on `base` saved to `folder` (its B matrices left at peft's zeros)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**{"r": 4, **lora}))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "base, lora, reason",
    [
        ("llama", {"target_modules": "all-linear", "use_dora": True}, "it does not support DoRA"),
        ("llama", {"target_modules": "all-linear", "bias": "lora_only"}, "adapter bias is not supported"),
        (
            "llama",
            {"target_modules": ["q_proj"], "r": 600},
            "LoRA rank 600 is greater than the largest max_lora_rank (512)",
        ),
        ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "not ['lm_head']"),
        ("qwen2", {"target_modules": ["q_proj", "embed_tokens"]}, "LoRA on embed_tokens loads only where"),
    ],
)
def test_what_vllm_would_refuse_is_refused_with_its_reason_and_the_fix(workspace, tmp_path, base, lora, reason):
    folder = adapter(workspace / base, tmp_path / "adapter", **lora)
    code, _, err = run_cli("export", str(folder), str(tmp_path / "out"), "--format", "vllm")
    assert code == 1 and reason in err and "--format safetensors" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_refused_export_leaves_what_was_there_even_with_force(workspace, tmp_path):
    folder = adapter(workspace / "llama", tmp_path / "adapter", target_modules="all-linear", use_dora=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    code, _, err = run_cli("export", str(folder), str(tmp_path / "out"), "--format", "vllm", "--force")
    assert code == 1 and "DoRA" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "kept"


def test_what_vllm_takes_is_taken(workspace, tmp_path):
    """Embedding LoRA where vLLM's model declares its embeddings (Llama), only some projections, a rank
    pattern: exported, with the rank that holds the largest."""
    folder = adapter(
        workspace / "llama",
        tmp_path / "adapter",
        target_modules=["q_proj", "embed_tokens"],
        rank_pattern={"q_proj": 12},
    )
    code, _, err = run_cli("export", str(folder), str(tmp_path / "out"), "--format", "vllm")
    assert code == 0, err
    assert "--max-lora-rank 16" in (tmp_path / "out" / "serve.sh").read_text()


def test_the_quickstarts_run_passes_vllms_rules(workspace, tmp_path):
    """configs/quickstart-gemma3.yaml as it ships (its tuning and data layout), on a tiny Gemma-3 with a few
    rows and steps: its final/ exports for vLLM, at the rank its r needs."""
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "quickstart-gemma3.yaml").read_text())
    tiny_decoder_dir(tmp_path / "gemma3", "gemma3")
    config.update(model=str(tmp_path / "gemma3"), output_dir=str(tmp_path / "run"))
    config["data"].update(train=str(workspace / "train.jsonl"), eval_split=4, max_examples=16)
    config["train"].update(max_steps=2, eval_every=2)
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli("train", str(tmp_path / "quickstart.yaml"))
    assert code == 0, err
    code, _, err = run_cli("export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "vllm")
    assert code == 0, err
    assert f"--max-lora-rank {config['tuning']['lora']['r']}" in (tmp_path / "out" / "serve.sh").read_text()


def test_a_model_that_is_no_adapter_says_what_to_do(workspace, tmp_path):
    code, _, err = run_cli("export", str(workspace / "llama"), str(tmp_path / "out"), "--format", "vllm")
    assert code == 1 and "is not a LoRA adapter" in err and "vllm serve OUT" in err
