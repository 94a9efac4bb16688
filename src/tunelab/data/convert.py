"""`tunelab data convert IN OUT --to FORMAT`: canonical records written back in any format tunelab reads.

One small function per output format turns a record into a row, or raises `Invalid` when the format
cannot hold it (a three-turn chat as Alpaca); such rows are reported by file and line and not written.
Reading the output back gives the same records (`tests/test_data_convert.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tunelab.data.formats import Invalid, load_records
from tunelab.data.readers import Problem
from tunelab.data.records import Chat, Labeled, Pair, Preference, Prompt, Record, message
from tunelab.data.tools import openai_calls
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text

SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def to_messages(record: Record) -> dict:
    chat = _chat(record)
    row: dict = {"messages": [_plain(m) for m in chat.messages]}
    return {"tools": chat.tools, **row} if chat.tools else row


def to_alpaca(record: Record) -> dict:
    system, user, answer = _single_turn(_chat(record), "alpaca")
    row = {"instruction": user, "input": "", "output": answer}
    return {"system": system, **row} if system else row


def to_prompt_completion(record: Record) -> dict:
    system, user, answer = _single_turn(_chat(record), "prompt_completion")
    if system:
        return {
            "prompt": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "completion": answer,
        }
    return {"prompt": user, "completion": answer}


def to_sharegpt(record: Record) -> dict:
    """ShareGPT; tool use as LLaMA-Factory writes it (function_call and observation turns, `tools` as JSON
    text; the calls' ids are not kept)."""
    chat = _chat(record)
    if any(m["role"] == "assistant" and m["weight"] == 0 for m in chat.messages):
        raise Invalid("has assistant turns of weight 0, which ShareGPT cannot mark; use messages")
    turns = [_sharegpt_turn(m) for m in chat.messages]
    row: dict = {"conversations": turns}
    return {**row, "tools": json.dumps([t["function"] for t in chat.tools])} if chat.tools else row


def _sharegpt_turn(m: dict) -> dict:
    if m.get("tool_calls"):
        if m["content"]:
            raise Invalid("an assistant turn has text beside its tool calls, which ShareGPT cannot hold; use messages")
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        return {"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls)}
    if m["role"] == "tool":
        return {"from": "observation", "value": m["content"]}
    return {"from": SHAREGPT_FROM[m["role"]], "value": m["content"]}


def to_labeled(record: Record) -> dict:
    if not isinstance(record, Labeled):
        raise Invalid(f"a {_kind(record)} example has no label")
    row = {"text": record.text, "label": record.label}
    return {**row, "text_pair": record.text_pair} if record.text_pair is not None else row


def to_pairs(record: Record) -> dict:
    if isinstance(record, Pair):
        if len(record.references) > 1:
            return {"source": record.source, **{f"target{i}": t for i, t in enumerate(record.references, 1)}}
        return {"source": record.source, "target": record.target}
    _, user, answer = _single_turn(_chat(record), "pairs")
    return {"source": user, "target": answer}


def to_preference(record: Record) -> dict:
    pref = _preference(record)
    if pref.tools or any(m.get("tool_calls") for m in [*pref.prompt, *pref.responses()]):
        raise Invalid("preference ({prompt, chosen, rejected}) cannot hold tools and tool calls; use openai_dpo")
    return {"prompt": [_plain(m) for m in pref.prompt], "chosen": pref.chosen, "rejected": pref.rejected}


def to_openai_dpo(record: Record) -> dict:
    pref = _preference(record)
    given: dict = {"messages": [_plain(m) for m in pref.prompt]}
    if pref.tools:
        given["tools"] = pref.tools
    chosen, rejected = (_plain(m) for m in pref.responses())
    return {"input": given, "preferred_output": [chosen], "non_preferred_output": [rejected]}


WRITERS: dict[str, Callable[[Record], dict]] = {
    "messages": to_messages,
    "alpaca": to_alpaca,
    "sharegpt": to_sharegpt,
    "prompt_completion": to_prompt_completion,
    "labeled": to_labeled,
    "pairs": to_pairs,
    "preference": to_preference,
    "openai_dpo": to_openai_dpo,
}


def convert_file(
    source: str, out: str, to: str, fmt: str = "auto", columns=None, header=None, force: bool = False
) -> tuple[int, list[Problem]]:
    """Convert `source` into `out` (JSON Lines, or one JSON list if it ends in .json); atomic.

    Returns (rows written, problems). Errors while reading, or rows the format cannot hold, are
    problems; nothing is written if any error was found, so a converted file is never partial.
    """
    if to not in WRITERS:
        raise UserError(f"--to {to!r}: expected one of: {', '.join(WRITERS)}")
    target = Path(out)
    if target.exists() and not force:
        raise UserError(f"{out}: already exists; pass --force to overwrite it")
    records, problems = load_records(source, fmt, columns, header)
    rows = []
    for record in records:
        try:
            rows.append(WRITERS[to](record))
        except Invalid as e:
            problems.append(Problem.at(record.where, f"cannot be written as {to}: {e}"))
    if any(p.severity == "error" for p in problems):
        return 0, problems
    if target.suffix == ".json":
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(target, text)
    return len(rows), problems


def _chat(record: Record) -> Chat:
    if isinstance(record, Chat):
        return record
    if isinstance(record, Pair):
        return Chat([message("user", record.source), message("assistant", record.target)], record.where)
    raise Invalid(f"a {_kind(record)} example is not a conversation")


def _preference(record: Record) -> Preference:
    if not isinstance(record, Preference):
        raise Invalid(f"a {_kind(record)} example has no chosen/rejected pair")
    return record


def _single_turn(chat: Chat, to: str) -> tuple[str, str, str]:
    """(system, user, assistant) of a one-exchange chat; `to` cannot hold more."""
    roles = [m["role"] for m in chat.messages]
    if chat.tools or any(m.get("tool_calls") for m in chat.messages):
        raise Invalid(f"{to} cannot hold tools and tool calls; use messages (or sharegpt)")
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise Invalid(f"{to} holds one user turn and one answer; this conversation is {' -> '.join(roles)}")
    system = chat.messages[0]["content"] if roles[0] == "system" else ""
    return system, chat.messages[-2]["content"], chat.messages[-1]["content"]


def _plain(m: dict) -> dict:
    """A message as the messages format writes it: weight only where it is not the default."""
    out = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = openai_calls(m["tool_calls"])
    if m["role"] == "tool":
        out["tool_call_id"] = m["tool_call_id"]
    return {**out, "weight": 0} if m["role"] == "assistant" and m["weight"] == 0 else out


def _kind(record: Record) -> str:
    return {Chat: "chat", Labeled: "labelled", Pair: "source/target", Preference: "preference", Prompt: "prompt-only"}[
        type(record)
    ]
