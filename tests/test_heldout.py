"""Held-out instruction evaluation: the suites read, the prompts as Tk-Instruct writes them, the scores
as Super-NaturalInstructions computes them (hand-computed), and `tunelab eval --suite` on a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, run_cli
from tiny_models import tiny_llama_dir

from tunelab.errors import UserError
from tunelab.eval.heldout import (
    HeldOutTask,
    Instance,
    aggregate,
    encode,
    instance_scores,
    normalize_answer,
    read_suite,
)

SUITES = DATA / "eval"


def test_sni_normalisation_keeps_articles_and_drops_punctuation():
    assert normalize_answer("  The Cat,  sat! ") == "the cat sat"
    assert instance_scores("Yes!", ["yes"])["exact_match"] == 100.0
    assert instance_scores("the answer", ["answer"])["exact_match"] == 0.0  # SQuAD would drop "the": SNI does not


def test_scores_match_hand_computed_values():
    # stemmed tokens: prediction [cat, sit, on, mat], reference [the, cat, sat, on, the, mat];
    # LCS = cat on mat = 3: precision 3/4, recall 3/6, F1 = 2 * 0.75 * 0.5 / 1.25 = 0.6
    assert instance_scores("cats sitting on mat", ["the cat sat on the mat"]) == {"exact_match": 0.0, "rougeL": 60.0}
    # the best reference counts, for each metric on its own
    scores = instance_scores("paris", ["Paris.", "the city of paris"])
    assert scores["exact_match"] == 100.0 and scores["rougeL"] == 100.0
    rows = [
        {"task": "a", "category": "X", "exact_match": 100.0, "rougeL": 100.0},
        {"task": "a", "category": "X", "exact_match": 0.0, "rougeL": 60.0},
        {"task": "b", "category": "Y", "exact_match": 0.0, "rougeL": 20.0},
    ]
    result = aggregate(rows)
    assert result["overall"] == {"exact_match": 33.3333, "rougeL": 60.0, "instances": 3}
    assert result["per_task"]["a"] == {"exact_match": 50.0, "rougeL": 80.0, "instances": 2}
    assert result["per_category"]["Y"] == {"exact_match": 0.0, "rougeL": 20.0, "instances": 1}


def test_prompt_is_tk_instructs_definition_and_positive_examples():
    task = HeldOutTask("t", "c", "Answer the question", [("2+2?", "4"), ("3+3?", "6")], [])
    instance = Instance("1", "1+1", ["2"])
    assert encode(task, instance) == (
        "Definition: Answer the question.\n\nNow complete the following example -\nInput: 1+1.\nOutput:"
    )
    assert encode(task, instance, shots=1) == (
        "Definition: Answer the question.\n\n Positive Example 1 -\nInput: 2+2?\n Output: 4.\n\n"
        "Now complete the following example -\nInput: 1+1.\nOutput:"
    )


def test_the_shared_suites_read_in_all_three_formats():
    kind, tasks = read_suite(SUITES / "super-natural-instructions" / "tasks")
    assert kind == "sni" and len(tasks) == 22 and sum(len(t.instances) for t in tasks) == 325
    assert len({t.category for t in tasks}) == 14 and all(t.demos and t.definition for t in tasks)
    assert all(len(i.references) >= 1 for t in tasks for i in t.instances)
    kind, tasks = read_suite(SUITES / "natural-instructions-v1")
    assert kind == "ni-v1" and len(tasks) == 6 and sum(len(t.instances) for t in tasks) == 3059
    assert tasks[0].definition.startswith("Definition: ") and "\nPrompt: " in tasks[0].definition
    kind, tasks = read_suite(SUITES / "self-instruct" / "user_oriented_instructions.jsonl")
    assert kind == "self-instruct" and len(tasks) == 252 and tasks[0].category == "Grammarly"


def test_bad_suites_are_named_in_one_line(tmp_path):
    (tmp_path / "broken.json").write_text('{"Definition": ["x"],\n "Instances": [}')
    with pytest.raises(UserError, match=r"broken.json:2: not valid JSON"):
        read_suite(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text('{"messages": []}')
    with pytest.raises(UserError, match="not a task file"):
        read_suite(tmp_path / "other.json")
    with pytest.raises(UserError, match="no such file"):
        read_suite(tmp_path / "missing")


def test_eval_suite_on_a_tiny_model_writes_scored_predictions(tmp_path, tunelab_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_llama_dir(tmp_path / "llama", chat=False)
    suite = SUITES / "super-natural-instructions" / "tasks"
    code, out, err = run_cli(
        "eval", str(model), "--suite", str(suite), "--max-instances", "2", "--max-new-tokens", "4", "--shots", "1"
    )
    assert code == 0, err
    result = json.loads((tmp_path / "eval-llama-suite-tasks.json").read_text())
    assert result["format"] == "sni" and result["prompt"] == "raw" and result["shots"] == 1
    assert len(result["predictions"]) == 44 and result["scores"]["overall"]["instances"] == 44
    assert len(result["scores"]["per_task"]) == 22
    for row in result["predictions"]:  # every stored score is the scorer's, on the stored prediction
        assert {k: row[k] for k in ("exact_match", "rougeL")} == instance_scores(row["prediction"], row["references"])
    assert "ROUGE-L" in out
    code, _, err = run_cli("eval", str(model), "--suite", str(suite), "--max-instances", "1")
    assert code == 1 and "already exists" in err and "--force" in err
    code, _, err = run_cli("eval", str(model))
    assert code == 1 and "--data FILE" in err and "--suite PATH" in err
    # a flag the mode does not read is refused, not ignored
    code, _, err = run_cli("eval", str(model), "--suite", str(suite), "--config", "run.yaml", "--force")
    assert code == 1 and "tunelab eval --suite: --config is for --data" in err and "Traceback" not in err
    code, _, err = run_cli("eval", str(model), "--data", "d.jsonl", "--shots", "2", "--batch-size", "8")
    assert code == 1 and "tunelab eval --data: --shots, --batch-size are for --suite" in err
    code, _, err = run_cli("eval", str(model), "--data", str(DATA / "summarize" / "dialogsum.dev.jsonl"), "--max-new-tokens", "8")  # fmt: skip
    assert code == 1 and "--max-new-tokens: for --suite and tool-call rows" in err


@pytest.mark.parametrize(
    "suite, kind, count",
    [("natural-instructions-v1", "ni-v1", 6), ("self-instruct/user_oriented_instructions.jsonl", "self-instruct", 252)],
)
def test_eval_suite_reads_and_scores_the_other_formats(tmp_path, tunelab_home, suite, kind, count):
    model = tiny_llama_dir(tmp_path / "llama")  # with a chat template: the prompt goes through it
    out = tmp_path / "result.json"
    code, _, err = run_cli(
        "eval",
        str(model),
        "--suite",
        str(SUITES / suite),
        "--max-instances",
        "1",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
        "--precision",
        "bf16",
        "--batch-size",
        "5",
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["format"] == kind and result["prompt"] == "chat template" and result["tasks"] == count
    assert result["precision"] == "bf16" and result["options"]["batch_size"] == 5
    assert result["scores"]["overall"]["instances"] == count == len(result["predictions"])
