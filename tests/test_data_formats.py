"""Formats: every common layout becomes canonical records; bad rows are named by file and line."""

import json

import pytest
from conftest import DATA

from tunelab.data.formats import detect_format, load_records
from tunelab.data.records import Chat, Labeled, Pair, Preference, Prompt


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def one(tmp_path, row, fmt="auto"):
    records, problems = load_records(write_jsonl(tmp_path, [row]), fmt)
    assert problems == [], problems
    return records[0]


def test_alpaca_becomes_a_user_and_an_assistant_turn(tmp_path):
    rec = one(tmp_path, {"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    assert rec.messages == [
        {"role": "user", "content": "Translate.\n\nHallo", "weight": 0},
        {"role": "assistant", "content": "Hello", "weight": 1},
    ]
    assert one(tmp_path, {"instruction": "Say hi.", "input": "", "output": "Hi"}).messages[0]["content"] == "Say hi."


def test_self_instruct_tasks_give_one_example_per_instance(tmp_path):
    row = {
        "id": "seed_task_1",
        "instruction": "Classify the sentiment.",
        "is_classification": True,
        "instances": [{"input": "I loved it", "output": "positive"}, {"input": "", "output": "neutral"}],
    }
    records, problems = load_records(write_jsonl(tmp_path, [row, {**row, "instances": [{"input": "x"}]}]))
    assert [r.messages[0]["content"] for r in records] == [
        "Classify the sentiment.\n\nI loved it",
        "Classify the sentiment.",
    ]
    assert [r.messages[1]["content"] for r in records] == ["positive", "neutral"]
    assert [r.where for r in records] == [f"{tmp_path / 'd.jsonl'}:1"] * 2
    assert [str(p) for p in problems] == [f"{tmp_path / 'd.jsonl'}:2: instances[0]: missing 'output'"]


def test_messages_keep_roles_and_weights(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    rec = one(tmp_path, {"messages": turns})
    assert [(m["role"], m["weight"]) for m in rec.messages] == [
        ("system", 0),
        ("user", 0),
        ("assistant", 0),
        ("user", 0),
        ("assistant", 1),
    ]


def test_sharegpt_and_prompt_completion(tmp_path):
    rec = one(tmp_path, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert [(m["role"], m["content"]) for m in rec.messages] == [("user", "q"), ("assistant", "a")]
    rec = one(tmp_path, {"prompt": "2+2=", "completion": "4"})
    assert [(m["role"], m["content"], m["weight"]) for m in rec.messages] == [
        ("user", "2+2=", 0),
        ("assistant", "4", 1),
    ]


def test_labeled_text_with_names_ids_and_pairs(tmp_path):
    assert one(tmp_path, {"text": "good", "label": "pos"}) == Labeled("good", "pos", where=f"{tmp_path}/d.jsonl:1")
    rec = one(tmp_path, {"sentence1": "A", "sentence2": "B", "label": 1})
    assert (rec.text, rec.text_pair, rec.label) == ("A", "B", 1)


def test_pairs_with_one_or_several_references(tmp_path):
    rec = one(tmp_path, {"dialogue": "d", "summary": "s"})
    assert (rec.source, rec.target, rec.references) == ("d", "s", ["s"])
    rec = one(tmp_path, {"dialogue": "d", "summary2": "b", "summary1": "a", "summary3": "c"})
    assert rec.target == "a" and rec.references == ["a", "b", "c"]


def test_every_preference_layout(tmp_path):
    rec = one(tmp_path, {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert rec == Preference([{"role": "user", "content": "q", "weight": 0}], "good", "bad", where=rec.where)
    rec = one(
        tmp_path,
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
    )
    assert (rec.chosen, rec.rejected) == ("good", "bad")
    rec = one(
        tmp_path,
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}],
        },
    )
    assert (rec.prompt[-1]["content"], rec.chosen, rec.rejected) == ("q", "good", "bad")
    hh = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun.",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No.",
    }
    rec = one(tmp_path, hh)
    assert [(m["role"], m["content"]) for m in rec.prompt] == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "joke?"),
    ]
    assert (rec.chosen, rec.rejected) == ("A pun.", "No.")
    rec = one(
        tmp_path,
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
    )
    assert (rec.prompt[0]["content"], rec.chosen, rec.rejected) == ("q", "good", "bad")


def test_prompt_only_rows_for_online_rl(tmp_path):
    rec = one(tmp_path, {"prompt": "Write a haiku.", "answer": 17, "tests": ["a", "b"]})
    assert rec == Prompt(
        [{"role": "user", "content": "Write a haiku.", "weight": 0}],
        where=rec.where,
        columns={"answer": 17, "tests": ["a", "b"]},  # what GRPO's reward functions get beside the completions
        conversational=False,  # a string prompt: TRL's "standard" format
    )
    rec = one(tmp_path, {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
    assert [m["role"] for m in rec.messages] == ["system", "user"] and rec.conversational and rec.columns == {}
    records, problems = load_records(write_jsonl(tmp_path, [{"prompt": [{"role": "assistant", "content": "x"}]}]))
    assert not records and "d.jsonl:1: the prompt must end with a user turn" in str(problems[0])


def test_bad_rows_are_named_by_line_and_the_rest_is_read(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [good] * 13
    rows[6] = '{"messages": [oops'  # line 7: broken JSON
    rows[11] = {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows[2] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}
    rows[3] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    rows[4] = {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}
    records, problems = load_records(write_jsonl(tmp_path, rows))
    assert len(records) == 8
    found = {p.line: p.message for p in problems}
    assert found[7].startswith("invalid JSON")
    assert found[12] == "messages[0]: unknown role 'robot' (expected one of: system, user, assistant, tool)"
    assert found[3] == "messages[1]: 'weight' must be 0 or 1, got 2"
    assert found[4] == "no assistant turn to learn from (none, or all of weight 0)"
    assert found[5] == "messages[0] (user): 'weight' is only for assistant turns"
    assert all(p.severity == "error" for p in problems)


def test_identical_pairs_are_errors_and_empty_outputs_are_skipped(tmp_path):
    records, problems = load_records(
        write_jsonl(
            tmp_path,
            [
                {"prompt": "q", "chosen": "same", "rejected": "same"},
                {"prompt": "q", "chosen": "", "rejected": "bad"},
                {"prompt": "q", "chosen": "good", "rejected": "bad"},
            ],
        )
    )
    assert len(records) == 1
    assert [(p.line, p.severity) for p in problems] == [(1, "error"), (2, "warning")]
    assert "identical" in problems[0].message and problems[1].message.endswith("; skipped")


def test_an_explicit_format_that_does_not_fit_says_what_is_missing(tmp_path):
    path = write_jsonl(tmp_path, [{"messages": [{"role": "user", "content": "q"}]}])
    _, problems = load_records(path, "alpaca")
    assert problems[0].message == "missing 'instruction'"
    _, problems = load_records(write_jsonl(tmp_path, [{"foo": 1}], "f.jsonl"))
    assert "cannot tell the format from the fields ['foo']; set data.format" in problems[0].message
    _, problems = load_records(write_jsonl(tmp_path, [], "empty.jsonl"))
    assert problems[0].message == "no examples in the file"


def test_detection_by_fields():
    assert detect_format({"instruction", "input", "output"}) == "alpaca"
    assert detect_format({"conversations", "chosen", "rejected"}) == "sharegpt_preference"
    assert detect_format({"chosen", "rejected"}) == "preference"
    assert detect_format({"fname", "dialogue", "summary", "topic"}) == "pairs"
    assert detect_format({"sentence", "label"}) == "labeled"


@pytest.mark.parametrize(
    "spec, fmt, columns, kind, count, skipped",
    [
        ("instruct/alpaca_5000.json", "auto", None, Chat, 4998, 2),  # 2 rows have an empty output
        ("instruct/seed_tasks.jsonl", "auto", None, Chat, 175, 0),  # Self-Instruct's layout
        ("classify/sst2/dev.tsv", "auto", None, Labeled, 872, 0),
        ("classify/ag_news/test.csv", "labeled", {"label": 0, "text": [1, 2]}, Labeled, 7600, 0),
        ("classify/ag_news/train_subset.tsv", "auto", None, Labeled, 10001, 0),
        ("summarize/dialogsum.dev.jsonl", "auto", None, Pair, 500, 0),
        ("summarize/dialogsum.test.jsonl", "auto", None, Pair, 500, 0),
        ("translate/multi30k-en-de/val.{en,de}.gz", "auto", None, Pair, 1014, 0),
        ("translate/ko-en/korean-english-park.dev.{ko,en}", "auto", None, Pair, 1000, 0),
        ("preference/hh-rlhf-harmless-base-test.jsonl.gz", "auto", None, Preference, 2303, 9),
        ("preference/dpo_en_demo.json", "auto", None, Preference, 300, 0),
    ],
)
def test_shared_datasets_become_records(spec, fmt, columns, kind, count, skipped):
    records, problems = load_records(DATA / spec if "{" not in spec else f"{DATA}/{spec}", fmt, columns)
    assert all(p.severity == "warning" for p in problems), problems[:3]
    assert len(records) == count and len(problems) == skipped
    assert all(isinstance(r, kind) for r in records)


def test_shared_label_columns_are_found():
    sst, _ = load_records(DATA / "classify/sst2/dev.tsv")
    assert {r.label for r in sst} == {0, 1}
    ag, _ = load_records(DATA / "classify/ag_news/train_subset.tsv")  # headerless: the label is the short side
    assert {r.label for r in ag} == {"World", "Sports", "Business", "Sci/Tech"}
    ag_test, _ = load_records(DATA / "classify/ag_news/test.csv", "labeled", {"label": 0, "text": [1, 2]})
    assert {r.label for r in ag_test} == {1, 2, 3, 4}
    dialogsum, _ = load_records(DATA / "summarize/dialogsum.test.jsonl")
    assert all(len(r.references) == 3 for r in dialogsum)
