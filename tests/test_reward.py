"""method: reward on a tiny Llama: it learns a separable preference (held-out pairwise accuracy 1.0),
final/ is a plain one-output sequence classifier that transformers loads alone, and resume continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import eval_entries, resume_from_an_earlier_checkpoint, run_cli
from helpers import preference_pairs
from tiny_models import tiny_llama_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reward")
    tiny_llama_dir(root / "llama")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(48, 0)))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(12, 1)))
    return root


def write_config(root: Path, run: Path) -> Path:
    path = run.with_suffix(".yaml")
    path.write_text(f"""method: reward
model: {root / "llama"}
output_dir: {run}
data: {{train: {root / "train.jsonl"}, eval: {root / "eval.jsonl"}, max_length: 64}}
train: {{epochs: 12, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0, eval_every: 12, save_every: 12, log_every: 6,
         best_metric: eval_accuracy, precision: fp32}}
""")
    return path


def test_a_reward_model_learns_a_separable_preference_and_loads_in_plain_transformers(
    workspace, tmp_path, tunelab_home
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "run"
    code, _, err = run_cli("train", str(write_config(workspace, run)))
    assert code == 0, err
    evals = eval_entries(run)
    assert {"loss", "accuracy", "margin", "chosen", "rejected"} <= evals[0].keys()
    final = json.loads((run / "eval_metrics.json").read_text())
    assert final["accuracy"] == 1.0 and final["margin"] > 0.5 and final["loss"] < evals[0]["loss"] / 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["accuracy"] == 1.0 and summary["train_examples"] == 48

    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.num_labels == 1
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "what was the film like"}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        for answer in ("it was great and lovely", "it was awful and dull")
    ]
    with torch.no_grad():
        good, bad = (model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts)
    assert good > bad


def test_a_reward_run_resumes_to_the_same_evaluations(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    assert run_cli("train", str(write_config(workspace, run)))[0] == 0
    whole = eval_entries(run)
    resumed = resume_from_an_earlier_checkpoint(run)
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in whole], abs=1e-6)
