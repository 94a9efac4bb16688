"""Tokenised data is cached by content: a second run is instant, any change makes a new entry."""

import json

import pytest
from tiny_tokenizer import chat_tokenizer

from tunelab.data.dataset import DataOptions, cache_dir, tokenize_file
from tunelab.errors import UserError


def write_alpaca(path, n=20):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"The number is {i}."} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def test_a_second_run_reads_the_same_examples_from_the_cache(tmp_path, tunelab_home):
    data = write_alpaca(tmp_path / "a.json")
    first = tokenize_file(data, chat_tokenizer())
    again = tokenize_file(data, chat_tokenizer())
    assert not first.cached and again.cached
    assert again.examples == first.examples and len(first.examples) == 20
    assert len(list(cache_dir().iterdir())) == 1
    stored = next(cache_dir().iterdir())
    assert {p.name for p in stored.iterdir()} == {"examples.safetensors", "meta.json"}  # no pickle


def test_new_bytes_or_options_make_a_fresh_entry(tmp_path, tunelab_home):
    data = write_alpaca(tmp_path / "a.json")
    tokenize_file(data, chat_tokenizer())
    assert not tokenize_file(data, chat_tokenizer(), DataOptions(max_length=8)).cached
    write_alpaca(data, n=21)
    changed = tokenize_file(data, chat_tokenizer())
    assert not changed.cached and len(changed.examples) == 21


def test_warnings_survive_the_cache_and_errors_are_never_cached(tmp_path, tunelab_home):
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n')
    assert [p.line for p in tokenize_file(data, chat_tokenizer()).problems] == [2]
    assert [p.line for p in tokenize_file(data, chat_tokenizer()).problems] == [2]  # from the cache
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    assert tokenize_file(broken, chat_tokenizer()).errors
    assert not tokenize_file(broken, chat_tokenizer()).cached


def test_preference_data_is_not_instruction_data(tmp_path, tunelab_home):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go"}\n')
    with pytest.raises(UserError, match="holds Preference records"):
        tokenize_file(data, chat_tokenizer())
