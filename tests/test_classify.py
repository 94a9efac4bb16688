"""method: classify on a tiny BERT: it learns, saves a pipeline-ready model, and trains only what it should."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert_dir

from tunelab.cli import main

POSITIVE, NEGATIVE = ["good", "great", "lovely", "superb"], ["bad", "awful", "poor", "terrible"]
FILLER = ["the movie was", "this film is", "the plot was very", "it is", "the acting was"]


def toy_rows(n: int, seed: int) -> list[dict]:
    """Sentiment carried by one word: separable, so a working classifier reaches accuracy 1.0."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        rows.append({"text": f"{rng.choice(FILLER)} {word}", "label": "pos" if positive else "neg"})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classify")
    tiny_bert_dir(root / "bert")
    for name, n, seed in (("train", 96, 0), ("dev", 32, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed)))
    return root


def write_config(root: Path, run: Path, extra: str = "", mode: str = "full") -> Path:
    path = run.with_suffix(".yaml")
    path.write_text(f"""method: classify
model: {root / "bert"}
output_dir: {run}
data: {{train: {root / "train.jsonl"}, eval: {root / "dev.jsonl"}, max_length: 32}}
tuning: {{mode: {mode}}}
train: {{epochs: 6, batch_size: 16, lr: 3.0e-3, warmup_ratio: 0, eval_every: 6, log_every: 6, best_metric: eval_macro_f1}}
{extra}""")
    return path


def test_a_classifier_learns_a_separable_task_and_pipeline_returns_label_names(workspace, tmp_path, tunelab_home):
    from transformers import pipeline

    run = tmp_path / "run"
    assert main(["train", str(write_config(workspace, run))]) == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "eval_metrics.json",
        "confusion_matrix.png",
        "loss_curve.png",
        "final/config.json",
        "final/model.safetensors",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "eval_metrics.json").read_text())
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["labels"] == ["neg", "pos"] and metrics["confusion"] == [[16, 0], [0, 16]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trained_examples"] == 96 * 6 and summary["eval"]["accuracy"] == 1.0 and summary["warning"] is None
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    assert evals[0]["step"] == 0 and {"loss", "accuracy", "macro_f1"} <= evals[0].keys()
    assert evals[-1]["loss"] < evals[0]["loss"]
    classify = pipeline("text-classification", model=str(run / "final"), device="cpu")
    assert classify("the film is superb")[0]["label"] == "pos"
    assert classify("the plot was very poor")[0]["label"] == "neg"

    # eval and predict on the run directory
    assert main(["eval", str(run), "--data", str(workspace / "dev.jsonl")]) == 0
    result = json.loads((run / "eval" / "dev.json").read_text())
    assert result["metrics"]["accuracy"] == 1.0 and result["examples"] == 32
    assert result["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)  # the run reported final/'s weights
    assert (run / "eval" / "dev.confusion.png").is_file()
    assert main(["eval", str(run), "--data", str(workspace / "dev.jsonl")]) == 1  # no silent overwrite
    unlabeled = tmp_path / "new.jsonl"
    unlabeled.write_text('{"text": "the acting was lovely"}\n{"text": "this film is awful"}\n')
    assert main(["predict", str(run), "--data", str(unlabeled), "--out", str(tmp_path / "p.jsonl")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == ["pos", "neg"] and preds[0]["where"].endswith("new.jsonl:1")
    assert preds[0]["probabilities"]["pos"] == preds[0]["score"] > 0.5


def test_head_mode_trains_only_the_new_head(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    assert main(["train", str(write_config(workspace, run, mode="head"))]) == 0
    before = load_file(workspace / "bert" / "model.safetensors")
    after = load_file(run / "final" / "model.safetensors")
    changed = {
        k
        for k, v in after.items()
        if k.removeprefix("bert.") not in before or not torch.equal(v, before[k.removeprefix("bert.")])
    }
    # the pooler is part of the saved encoder here, so only the classifier is new
    assert changed == {"classifier.weight", "classifier.bias"}


def test_lora_classifier_is_saved_merged_for_plain_transformers(workspace, tmp_path, tunelab_home):
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    assert main(["train", str(write_config(workspace, run, mode="lora")), "train.epochs=2"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert not any("lora" in k for k in model.state_dict())
    before = load_file(workspace / "bert" / "model.safetensors")
    after = load_file(run / "final" / "model.safetensors")
    query = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(after["bert." + query], before[query])  # the adapter is folded into the weights
    assert torch.equal(after["bert.embeddings.word_embeddings.weight"], before["embeddings.word_embeddings.weight"])
    # the merged model scores as the trained one did at the end of the run
    assert main(["eval", str(run), "--data", str(workspace / "dev.jsonl")]) == 0
    trained = json.loads((run / "eval_metrics.json").read_text())
    merged = json.loads((run / "eval" / "dev.json").read_text())["metrics"]
    assert merged["confusion"] == trained["confusion"] and merged["loss"] == pytest.approx(trained["loss"], abs=1e-5)


def test_label_names_map_ids_and_an_unseen_eval_label_is_a_clear_error(workspace, tmp_path, tunelab_home, capsys):
    rows = [{"text": r["text"], "label": 1 if r["label"] == "pos" else 0} for r in toy_rows(32, 3)]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    path = write_config(workspace, run, extra="")
    text = path.read_text().replace(str(workspace / "train.jsonl"), str(tmp_path / "ids.jsonl"))
    path.write_text(text.replace("max_length: 32}", "max_length: 32, label_names: {0: neg, 1: pos}}"))
    assert main(["train", str(path), "train.epochs=1"]) == 0
    assert json.loads((run / "final" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "the movie", "label": "meh"}) + "\n")
    capsys.readouterr()
    assert main(["train", str(path), f"data.eval={tmp_path / 'odd.jsonl'}", f"output_dir={tmp_path / 'b'}"]) == 1
    err = capsys.readouterr().err
    assert "odd.jsonl:1" in err and "'meh' does not occur in the training data" in err


def test_balanced_class_weights_are_inverse_frequencies():
    from tunelab.data.render import Example
    from tunelab.recipes.classify import class_weights

    examples = [Example([1], [0], "")] * 6 + [Example([1], [1], "")] * 2
    assert class_weights("balanced", examples, ["a", "b"]).tolist() == pytest.approx([8 / 12, 8 / 4])
    assert class_weights({"b": 3}, examples, ["a", "b"]).tolist() == [1.0, 3.0]


def test_a_decoder_lm_gets_a_classification_head_and_reads_the_last_real_token(workspace, tmp_path, tunelab_home):
    from tiny_models import tiny_llama_dir
    from transformers import pipeline

    tiny_llama_dir(tmp_path / "llama")
    run = tmp_path / "run"
    path = write_config(workspace, run)
    path.write_text(path.read_text().replace(str(workspace / "bert"), str(tmp_path / "llama")))
    assert main(["train", str(path), "train.epochs=10"]) == 0
    assert json.loads((run / "eval_metrics.json").read_text())["accuracy"] == 1.0
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None
    classify = pipeline("text-classification", model=str(run / "final"), device="cpu")
    # batched with padding, the head still reads each text's last real token
    assert [r["label"] for r in classify(["the film is superb", "the plot was very poor and dull"], batch_size=2)] == [
        "pos",
        "neg",
    ]


def test_the_summary_warns_when_the_eval_metric_falls_while_the_train_loss_keeps_falling():
    from tunelab.train.logs import overfitting_warning

    def log(evals, trains):
        return [{"step": s, "split": "eval", "accuracy": a, "loss": 1 - a} for s, a in evals] + [
            {"step": s, "split": "train", "loss": v} for s, v in trains
        ]

    trains = [(10, 0.9), (20, 0.6), (30, 0.3), (40, 0.1)]
    warning = overfitting_warning(log([(0, 0.5), (20, 0.9), (40, 0.8)], trains), "eval_accuracy")
    assert warning.startswith("eval_accuracy was best at step 20 (0.9) and 0.8 at step 40")
    assert (
        overfitting_warning(log([(0, 0.5), (20, 0.8), (40, 0.9)], trains), "eval_accuracy") is None
    )  # still improving
    assert overfitting_warning(log([(0, 0.5), (20, 0.9), (40, 0.895)], trains), "eval_accuracy") is None  # noise
    flat = [(10, 0.5), (20, 0.5), (30, 0.6), (40, 0.7)]  # the train loss rose too: not overfitting
    assert overfitting_warning(log([(0, 0.5), (20, 0.9), (40, 0.8)], flat), "eval_accuracy") is None
    # a loss is better when lower
    assert "eval_loss was best at step 20" in overfitting_warning(
        log([(0, 0.5), (20, 0.9), (40, 0.8)], trains), "eval_loss"
    )


def test_layer_wise_lr_decay_scales_each_block_below_the_top(workspace, tmp_path, tunelab_home):
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.tuning import layer_lr_groups

    model = AutoModelForSequenceClassification.from_pretrained(workspace / "bert", num_labels=2)
    groups = layer_lr_groups(model, 1e-3, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == pytest.approx(1e-3)  # the top block
    assert lr_of[id(named["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(2.5e-4)
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert [len(g["params"]) for g in layer_lr_groups(model, 1e-3, None)] == [len(named)]

    run = tmp_path / "run"  # and a run trains with it, the groups' rates following the schedule
    assert main(["train", str(write_config(workspace, run, "", "full")), "train.layer_lr_decay=0.8"]) == 0
    assert json.loads((run / "eval_metrics.json").read_text())["accuracy"] == 1.0
