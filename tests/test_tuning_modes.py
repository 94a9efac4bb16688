"""Trained against frozen, for the preference methods: under `tuning.mode: freeze` (the last block) only the
last block and the final norm change, and under `lora` only the adapter trains (the base weights stay as
they were); checked on final/, the files a user takes away, against the starting weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import preference_pairs
from safetensors.torch import load_file
from tiny_models import tiny_llama_dir

RULE = "def short(prompts, responses):\n    return [-len(r) / 10 for r in responses]\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("modes")
    tiny_llama_dir(root / "llama")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(16, 0)))
    (root / "rewards.py").write_text(RULE)
    return root


def train(root: Path, run: Path, method: str, tuning: str) -> Path:
    extra = {
        "rlhf": f"rlhf: {{reward_model: '{root / 'rewards.py'}:short', samples_per_prompt: 2, max_new_tokens: 6}}\n",
        "dpo": "",
        "reward": "",
    }[method]
    config = run.with_suffix(".yaml")
    config.write_text(f"""method: {method}
model: {root / "llama"}
output_dir: {run}
data: {{train: {root / "pairs.jsonl"}, max_length: 64}}
tuning: {tuning}
train: {{max_steps: 3, batch_size: 4, lr: 1.0e-2, warmup_ratio: 0, precision: fp32}}
{extra}""")
    code, _, err = run_cli("train", str(config))
    assert code == 0, err
    return run / "final"


def changed(final: Path, base: dict[str, torch.Tensor]) -> set[str]:
    """The starting model's weights that final/ holds with other values."""
    weights = load_file(str(final / "model.safetensors"))
    assert base.keys() <= weights.keys()
    return {name for name, value in base.items() if not torch.equal(weights[name], value)}


@pytest.mark.parametrize("method", ["reward", "dpo", "rlhf"])
def test_freeze_trains_the_last_block_and_nothing_below_it(workspace, tmp_path, tunelab_home, method):
    final = train(workspace, tmp_path / "run", method, "{mode: freeze, train_last_layers: 1}")
    moved = changed(final, load_file(str(workspace / "llama" / "model.safetensors")))
    assert any(name.startswith("model.layers.1.") for name in moved)
    assert all(name.startswith("model.layers.1.") or name == "model.norm.weight" for name in moved), moved


@pytest.mark.parametrize("method", ["reward", "dpo", "rlhf"])
def test_lora_trains_the_adapter_and_leaves_the_base_weights(workspace, tmp_path, tunelab_home, method):
    final = train(workspace, tmp_path / "run", method, "{mode: lora, lora: {r: 4}}")
    base = load_file(str(workspace / "llama" / "model.safetensors"))
    if method == "reward":  # final/ is a plain classifier, the adapter merged: only the adapted layers moved
        moved = changed(final, base)
        assert moved and all(re.fullmatch(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj\.weight", n) for n in moved), (
            moved
        )
        return
    adapter = load_file(str(final / "adapter_model.safetensors"))  # final/ is the adapter, on the untouched base
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero: it trained
    checkpoint = sorted((final.parent / "checkpoints").glob("step-*"))[-1]
    assert all("lora_" in name for name in load_file(str(checkpoint / "trainable.safetensors")))


def test_neftune_noise_is_bounded_and_only_while_training(tmp_path):
    """NEFTune's embedding noise: uniform within alpha / sqrt(L x d) of the clean embeddings while the model
    trains, none in eval mode (evaluation and generation see the model as it is)."""
    from transformers import AutoModelForCausalLM

    from tunelab.models.tuning import add_neftune

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(tmp_path / "llama"))
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, 100, (2, 12))
    clean = embeddings(ids).detach()
    handle = add_neftune(model, 5.0)
    model.train()
    noisy, again = embeddings(ids).detach(), embeddings(ids).detach()
    bound = 5.0 / (12 * clean.shape[-1]) ** 0.5
    assert 0.5 * bound < (noisy - clean).abs().max() <= bound and not torch.equal(noisy, again)
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    handle.remove()
    model.train()
    assert torch.equal(embeddings(ids), clean)
