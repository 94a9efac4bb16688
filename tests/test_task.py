"""method: task (generation): a tiny T5 and a tiny Llama learn (source, target) pairs, scored by generation;
and the metrics equal hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_llama_dir, tiny_t5_dir

from tunelab.cli import main
from tunelab.eval.metrics import classification_metrics, generation_metrics, normalize

PAIRS = [
    ("what is the capital of france", "paris"),
    ("and of spain", "madrid"),
    ("germany", "berlin"),
    ("write a short poem about the sea", "the sea is wide and blue"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task")
    tiny_t5_dir(root / "t5")
    tiny_llama_dir(root / "llama")
    rows = [{"source": s, "target": t} for s, t in PAIRS] * 8
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS))
    return root


def write_config(root: Path, model: str, run: Path, extra: str = "") -> Path:
    path = run.with_suffix(".yaml")
    path.write_text(f"""method: task
model: {root / model}
output_dir: {run}
data: {{train: {root / "train.jsonl"}, eval: {root / "eval.jsonl"}, max_length: 64, prompt: "Answer: {{source}}"}}
train: {{epochs: 30, batch_size: 8, lr: 5.0e-3, warmup_ratio: 0, eval_every: 30, log_every: 30, best_metric: eval_rougeL}}
generation: {{max_new_tokens: 12}}
{extra}""")
    return path


@pytest.mark.parametrize("model", ["t5", "llama"])
def test_a_task_model_learns_its_pairs_scored_by_generation(workspace, tmp_path, tunelab_home, model):
    run = tmp_path / "run"
    assert main(["train", str(write_config(workspace, model, run))]) == 0
    evals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["split"] == "eval"]
    assert evals[0]["step"] == 0 and {"loss", "rougeL", "chrf", "bleu", "exact_match"} <= evals[0].keys()
    assert evals[-1]["loss"] < evals[0]["loss"] / 2
    final = json.loads((run / "eval_metrics.json").read_text())
    assert final["exact_match"] == 100.0 and final["rougeL"] == 100.0, final
    predictions = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predictions] == [t for _, t in PAIRS]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["architecture"] == ("encoder-decoder" if model == "t5" else "decoder")
    assert summary["eval"]["exact_match"] == 100.0

    assert main(["eval", str(run), "--data", str(workspace / "eval.jsonl")]) == 0
    assert json.loads((run / "eval" / "eval.json").read_text())["metrics"]["exact_match"] == 100.0
    (tmp_path / "new.jsonl").write_text(json.dumps({"source": "germany"}) + "\n")
    assert main(["predict", str(run), "--data", str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["prediction"] == "berlin"


def test_zero_shot_eval_of_the_base_model_asks_as_the_config_says(workspace, tmp_path, tunelab_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(workspace, "llama", tmp_path / "unused")
    assert (
        main(["eval", str(workspace / "llama"), "--config", str(config), "--data", str(workspace / "eval.jsonl")]) == 0
    )
    result = json.loads((tmp_path / "eval-llama-eval.json").read_text())
    assert result["prompt"] == "Answer: {source}" and result["examples"] == 4
    assert result["metrics"]["exact_match"] == 0.0  # an untrained model
    lines = (tmp_path / "eval-llama-eval.predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_generation_metrics_match_hand_computed_values():
    # ROUGE-1 F1 of "the cat sat" against "the cat sat on the mat": P = 3/3, R = 3/6, F = 2/3.
    # Against two references the best one counts: "a cat sat" vs "a cat sat down": P 1, R 3/4, F 6/7.
    m = generation_metrics(["the cat sat", "a cat sat"], [["the cat sat on the mat"], ["a dog", "a cat sat down"]])
    assert m["rouge1"] == pytest.approx(100 * (2 / 3 + 6 / 7) / 2)
    assert m["exact_match"] == 0.0
    m = generation_metrics(["The Cat, sat!", "x"], [["the cat sat"], ["y"]])
    assert m["exact_match"] == 50.0  # case, punctuation and articles do not count
    assert normalize("An apple, the  pear.") == "apple pear"
    perfect = generation_metrics(["ein Hund läuft", "zwei Katzen"], [["ein Hund läuft"], ["zwei Katzen"]])
    assert perfect["chrf"] == pytest.approx(100.0) and perfect["bleu"] == pytest.approx(0.0)  # too short for 4-grams
    assert generation_metrics(["ein Hund läuft im Park heute"], [["ein Hund läuft im Park heute"]])[
        "bleu"
    ] == pytest.approx(100.0)


def test_classification_metrics_match_hand_computed_values():
    # truth a a a b b c, predicted a a b b c c: per class P/R: a 2/2, 2/3; b 1/2, 1/2; c 1/2, 1/1
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * p * r / (p + r) for p, r in ((1, 2 / 3), (1 / 2, 1 / 2), (1 / 2, 1))]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
