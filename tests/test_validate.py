"""`tunelab data validate`: errors by line, warnings, statistics, exit codes, never a traceback."""

import json

import pytest
from conftest import DATA, run_cli

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def numbered(i):
    return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"{i}."}]}


def test_a_broken_line_7_and_an_unknown_role_on_line_12_exit_1_naming_both(tmp_path):
    lines = [numbered(i) for i in range(1, 16)]
    lines[6] = '{"messages": [{"role": "user", "content": "Hi"'  # line 7: cut short
    lines[11] = {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = jsonl(tmp_path / "chat.jsonl", lines)
    code, out, err = run_cli("data", "validate", path)
    assert code == 1
    assert f"error: {path}:7: invalid JSON" in out
    assert f"error: {path}:12: messages[0]: unknown role 'robot'" in out
    assert "Traceback" not in out + err
    code, out, _ = run_cli("data", "validate", path, "--json")
    report = json.loads(out)
    assert code == 1 and [e["line"] for e in report["errors"]] == [7, 12]
    assert report["stats"]["train"]["examples"] == 13


def test_a_clean_file_exits_0_and_warnings_do_not_fail_it(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", [numbered(1), numbered(2), numbered(1)])
    code, out, _ = run_cli("data", "validate", path)
    assert code == 0
    assert f"warning: {path}:3: exact duplicate of the example at {path}:1" in out
    assert "0 errors, 1 warnings: usable" in out


def test_train_eval_leakage_is_found(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [numbered(i) for i in range(5)])
    held_out = jsonl(
        tmp_path / "eval.jsonl",
        [numbered(7), {"messages": numbered(3)["messages"][:1] + [{"role": "assistant", "content": "another answer"}]}],
    )
    code, out, _ = run_cli("data", "validate", train, "--eval", held_out, "--json")
    report = json.loads(out)
    assert code == 0
    [leak] = report["warnings"]
    assert leak["file"] == held_out and leak["line"] == 2 and "leakage" in leak["message"]
    assert report["stats"]["eval"]["examples"] == 2


def test_missing_user_turns_and_uneven_system_turns_are_warnings(tmp_path):
    no_user = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Hi!"}]}
    path = jsonl(tmp_path / "chat.jsonl", [numbered(1), no_user])
    code, out, _ = run_cli("data", "validate", path, "--json")
    messages = [w["message"] for w in json.loads(out)["warnings"]]
    assert code == 0
    assert any("no user turn" in m for m in messages)
    assert any("1 of 2 examples have a system turn" in m for m in messages)


def test_label_imbalance_and_labels_unseen_in_training(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [{"text": f"text {i}", "label": "pos" if i < 8 else "neg"} for i in range(10)])
    held_out = jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": "neutral"}])
    code, out, _ = run_cli("data", "validate", train, "--eval", held_out, "--json")
    report = json.loads(out)
    assert code == 0
    assert report["stats"]["train"]["labels"] == {"neg": 2, "pos": 8}
    messages = " | ".join(w["message"] for w in report["warnings"])
    assert "label imbalance: 'pos' has 8 examples, 'neg' only 2" in messages
    assert "labels never seen in training: neutral" in messages


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "no examples in the file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "invalid"),
        (b'{"data": [1, 2]}', "jq"),
        (b'[{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}]', "'weight' must be 0 or 1"),
    ],
)
def test_any_bad_file_is_an_error_line_never_a_traceback(tmp_path, content, expected):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    code, out, err = run_cli("data", "validate", str(path))
    assert code == 1 and expected in out and "Traceback" not in out + err and "internal error" not in err


def test_token_statistics_and_truncation_with_a_tokenizer(tmp_path, monkeypatch):
    from tiny_tokenizer import chat_tokenizer

    from tunelab.data.dataset import DataOptions
    from tunelab.data.validate import validate

    long = {
        "messages": [{"role": "user", "content": "the sea is wide " * 30}, {"role": "assistant", "content": "Yes."}]
    }
    path = jsonl(tmp_path / "chat.jsonl", [GOOD, long])
    report = validate(path, tokenizer=chat_tokenizer(), options=DataOptions(max_length=32))
    stats = report.stats["train"]
    assert stats["tokens"]["max"] == 32 and stats["tokens"]["min"] < 32
    assert stats["truncated"] == 1 and stats["trained_tokens"]["total"] > 0
    assert [w.line for w in report.warnings] == [2] and "max_length 32" in report.warnings[0].message


@pytest.mark.real
@pytest.mark.slow
def test_alpaca_5000_with_smollm2_prints_statistics_and_exits_0():
    code, out, err = run_cli(
        "data", "validate", str(DATA / "instruct" / "alpaca_5000.json"), "--model", "smollm2-135m-instruct"
    )
    assert code == 0, out + err
    assert "4,998 chat examples (2 skipped)" in out
    assert "tokens per example (smollm2-135m-instruct): min" in out and "trained tokens:" in out
    assert "0 errors" in out


def test_validate_takes_the_data_options_of_a_run_config(tmp_path):
    config = tmp_path / "ag.yaml"
    config.write_text(
        f"method: classify\nmodel: minilm-l6\ndata:\n  train: {DATA / 'classify' / 'ag_news' / 'test.csv'}\n"
        "  format: labeled\n  columns: {label: 0, text: [1, 2]}\n"
    )
    code, out, err = run_cli("data", "validate", "--config", str(config), "--json")  # data.train, model from it
    assert code == 0, err
    stats = json.loads(out)["stats"]["train"]
    assert stats["labels"] == {"1": 1900, "2": 1900, "3": 1900, "4": 1900}
    assert stats["examples"] == 7600 and stats["tokens"]["max"] <= 1024  # counted by MiniLM's tokenizer
