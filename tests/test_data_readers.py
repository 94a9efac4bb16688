"""Readers: every file layout becomes rows with the line they start on, or problems naming the line."""

import gzip
import json

import pytest
from conftest import DATA

from tunelab.data.readers import Problem, Row, parallel_paths, read_rows


def rows_and_problems(spec, **kw):
    items = list(read_rows(spec, **kw))
    return [i for i in items if isinstance(i, Row)], [i for i in items if isinstance(i, Problem)]


def test_json_list_keeps_each_elements_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2, "b": "x\ny"}, {"a": 3}], indent=2))
    rows, problems = rows_and_problems(path)
    assert problems == [] and [r.value["a"] for r in rows] == [1, 2, 3]
    lines = path.read_text().splitlines()
    for row in rows:
        assert lines[row.line - 1].strip() == "{"  # the line where the element starts
    assert [r.record for r in rows] == [1, 2, 3]


def test_json_wrapper_object_is_an_error_with_a_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"a": 1}]}))
    rows, problems = rows_and_problems(path)
    assert rows == [] and len(problems) == 1
    assert "found an object whose 'data' holds a list" in problems[0].message and "jq '.data'" in problems[0].message


def test_json_lines_in_a_json_file_are_read_as_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    rows, problems = rows_and_problems(path)
    assert problems == [] and [(r.line, r.value["a"]) for r in rows] == [(1, 1), (2, 2)]


def test_broken_json_list_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"a": 1},\n {"a": 2,,},\n {"a": 3}\n]')
    rows, problems = rows_and_problems(path)
    assert [r.value["a"] for r in rows] == [1]
    assert problems[0].line == 3 and problems[0].message.startswith("invalid JSON")


def test_jsonl_reports_every_bad_line_and_reads_the_rest(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"i": i}) for i in range(1, 13)]
    lines[6] = '{"i": 7,'  # line 7: broken JSON
    path.write_bytes(("\n".join(lines[:9]) + "\n\n").encode() + b'{"i": "\xff"}\n' + "\n".join(lines[10:]).encode())
    rows, problems = rows_and_problems(path)
    assert [(p.line, p.message.split(" (")[0]) for p in problems] == [
        (7, "invalid JSON: Expecting property name enclosed in double quotes"),
        (11, "invalid UTF-8"),
    ]
    assert [r.line for r in rows] == [1, 2, 3, 4, 5, 6, 8, 9, 12, 13]  # line 10 is blank


def test_gzipped_files_read_like_plain_ones(tmp_path):
    records = [{"x": "é"}, {"x": "東京"}]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        json.dump(records, f)
    for name in ("d.jsonl.gz", "d.json.gz"):
        rows, problems = rows_and_problems(tmp_path / name)
        assert problems == [] and [r.value for r in rows] == records


def test_csv_and_tsv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text('text,label\n"Hello, world",pos\n"Line\nbreak",neg\n')
    rows, problems = rows_and_problems(tmp_path / "h.csv")
    assert problems == [] and [r.value for r in rows] == [
        {"text": "Hello, world", "label": "pos"},
        {"text": "Line\nbreak", "label": "neg"},
    ]
    assert [r.line for r in rows] == [2, 3]
    (tmp_path / "n.tsv").write_text('a "quoted" word\t1\nnot "closed\t0\n')
    rows, problems = rows_and_problems(tmp_path / "n.tsv")
    assert (
        problems == [] and rows[0].value == {"0": 'a "quoted" word', "1": "1"} and rows[1].value["0"] == 'not "closed'
    )
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\nonly one column\n")
    _, problems = rows_and_problems(tmp_path / "bad.tsv")
    assert problems == [Problem(str(tmp_path / "bad.tsv"), 2, "expected 2 columns (sentence, label), found 1")]


def test_parallel_text_pairs_lines_and_reports_a_length_mismatch(tmp_path):
    (tmp_path / "t.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "t.de").write_text("eins\nzwei\n")
    assert parallel_paths(str(tmp_path / "t.{en,de}")) == (tmp_path / "t.en", tmp_path / "t.de")
    rows, problems = rows_and_problems(str(tmp_path / "t.{en,de}"))
    assert [r.value for r in rows] == [{"source": "one", "target": "eins"}, {"source": "two", "target": "zwei"}]
    assert problems == [Problem(str(tmp_path / "t.en"), None, "has 1 more lines than the other side of the pair")]


def test_missing_and_unknown_files(tmp_path):
    assert rows_and_problems(tmp_path / "nope.jsonl")[1][0].message == "no such file"
    (tmp_path / "d.parquet").write_text("x")
    assert "unknown file type" in rows_and_problems(tmp_path / "d.parquet")[1][0].message


@pytest.mark.parametrize(
    "spec, count",
    [
        ("instruct/alpaca_5000.json", 5000),
        ("instruct/seed_tasks.jsonl", 175),
        ("classify/sst2/dev.tsv", 872),
        ("classify/ag_news/test.csv", 7600),
        ("classify/ag_news/train_subset.tsv", 10001),
        ("summarize/dialogsum.dev.jsonl", 500),
        ("summarize/dialogsum.test.jsonl", 500),
        ("preference/hh-rlhf-harmless-base-test.jsonl.gz", 2312),
        ("preference/dpo_en_demo.json", 300),
        ("translate/multi30k-en-de/train.{en,de}.gz", 29000),
        ("translate/multi30k-en-de/test_2016_flickr.{en,de}.gz", 1000),
        ("translate/ko-en/korean-english-park.test.{ko,en}", 2000),
        ("translate/ko-en/jhe-koen-dev.{ko,en}", 720),
    ],
)
def test_every_shared_dataset_reads_in_its_upstream_form(spec, count):
    rows, problems = rows_and_problems(f"{DATA}/{spec}")
    assert problems == [] and len(rows) == count
