"""`tunelab data convert`: what is written reads back as the same records; what cannot be, is named."""

import json

import pytest
from conftest import DATA, run_cli

from tunelab.data.formats import load_records


def strip(records):
    return [{k: v for k, v in vars(r).items() if k != "where"} for r in records]


@pytest.mark.parametrize(
    "to, suffix", [("messages", "jsonl"), ("sharegpt", "json"), ("prompt_completion", "jsonl"), ("alpaca", "json")]
)
def test_alpaca_converts_and_reads_back_as_the_same_conversations(tmp_path, to, suffix):
    source = DATA / "instruct" / "alpaca_5000.json"
    out = tmp_path / f"out.{suffix}"
    code, stdout, err = run_cli("data", "convert", str(source), str(out), "--to", to)
    assert code == 0, err
    assert "4,998 rows" in stdout and "skipped" in err  # the 2 empty outputs, as warnings
    assert strip(load_records(out)[0]) == strip(load_records(source)[0])


def test_preference_formats_round_trip(tmp_path):
    source = DATA / "preference" / "dpo_en_demo.json"
    for to in ("openai_dpo", "preference"):
        out = tmp_path / f"{to}.jsonl"
        assert run_cli("data", "convert", str(source), str(out), "--to", to)[0] == 0
        assert strip(load_records(out)[0]) == strip(load_records(source)[0])


def test_rows_a_format_cannot_hold_are_named_and_nothing_is_written(tmp_path):
    source = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    source.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": turns * 2}) + "\n")
    out = tmp_path / "out.json"
    code, _, err = run_cli("data", "convert", str(source), str(out), "--to", "alpaca")
    assert code == 1
    assert f"{source}:2: cannot be written as alpaca: alpaca holds one user turn and one answer" in err
    assert not out.exists()


def test_an_existing_output_is_kept_unless_forced(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text('{"instruction": "a", "output": "b"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    code, _, err = run_cli("data", "convert", str(source), str(out), "--to", "messages")
    assert code == 1 and "--force" in err and out.read_text() == "precious\n"
    assert run_cli("data", "convert", str(source), str(out), "--to", "messages", "--force")[0] == 0
    assert json.loads(out.read_text())["messages"][1] == {"role": "assistant", "content": "b"}


def test_weight_0_turns_survive_as_messages_and_pairs_keep_every_reference(tmp_path):
    source = tmp_path / "c.jsonl"
    source.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 0},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ]
            }
        )
        + "\n"
    )
    out = tmp_path / "m.jsonl"
    assert run_cli("data", "convert", str(source), str(out), "--to", "messages")[0] == 0
    assert strip(load_records(out)[0]) == strip(load_records(source)[0])
    assert run_cli("data", "convert", str(source), str(tmp_path / "s.jsonl"), "--to", "sharegpt")[0] == 1
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"dialogue": "x", "summary1": "a", "summary2": "b"}) + "\n")
    assert run_cli("data", "convert", str(pairs), str(tmp_path / "q.jsonl"), "--to", "pairs")[0] == 0
    assert strip(load_records(tmp_path / "q.jsonl")[0]) == strip(load_records(pairs)[0])
