"""Formats: rows of any common layout become canonical records (see `records`).

    records, problems = load_records("train.jsonl")              # format detected from the rows
    records, problems = load_records("ag.csv", "labeled", columns={"label": 0, "text": [1, 2]})

One small function per format turns one row into one record, or raises `Invalid` with what is wrong
in the user's terms; `load_records` adds the file and line. Detection looks at the keys of the first
row that is a JSON object, so a file is read once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, overload

from tunelab.data import tools as tool_data
from tunelab.data.readers import Problem, read_rows
from tunelab.data.records import ROLES, Chat, Invalid, Labeled, Pair, Preference, Prompt, Record, message
from tunelab.data.records import kind_of as _kind


class Skip(Invalid):
    """A well-formed row that cannot serve as an example (an empty output): skipped with a warning.

    Real data has these (2 of Alpaca's 5,000 rows have an empty output; of HH-RLHF's 2,312 test pairs,
    4 have an empty response and 5 have dialogues that differ before their last turn); they should
    not stop a run the way a malformed file must.
    """


# --- instruction formats -> Chat ------------------------------------------------------------------


def from_alpaca(row: dict) -> Chat:
    instruction = _text(row, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise Invalid(f"'input' must be a string, got {_kind(extra)}")
    output = _string(row, "output")
    if not output.strip():
        raise Skip("empty output: 'output' is empty")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = [message("system", _text(row, "system"))] if row.get("system") else []
    return Chat(system + [message("user", prompt), message("assistant", output)])


def from_self_instruct(row: dict) -> list[Record]:
    """Self-Instruct's task records (its seed tasks, its user-oriented instructions): one instruction and its
    instances, each an (input, output) example: one Alpaca-style record per instance."""
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise Invalid("'instances' must be a non-empty list of {input, output} objects")
    chats: list[Record] = []
    for k, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise Invalid(f"instances[{k}]: expected an {{input, output}} object, got {_kind(instance)}")
        try:
            chats.append(from_alpaca({"instruction": row.get("instruction"), **instance}))
        except Invalid as e:
            raise type(e)(f"instances[{k}]: {e}") from None
    return chats


def from_messages(row: dict) -> Chat:
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise Invalid("'messages' must be a non-empty list of {role, content} objects")
    tools = _tools(row)
    messages = [_message(turn, i, tools) for i, turn in enumerate(turns)]
    _check_calls([messages], tools, row.get("parallel_tool_calls"), "parallel_tool_calls")
    trained = [m for m in messages if m["weight"] == 1]
    if not trained:
        raise Invalid("no assistant turn to learn from (none, or all of weight 0)")
    if any(not m["content"].strip() and not m.get("tool_calls") for m in trained):
        raise Skip("empty output: an assistant turn to learn from is empty")
    return Chat(messages, tools=tools)


def _tools(holder: dict) -> list[dict]:
    """The `tools` a row (or OpenAI's preference `input`) declares, checked; [] for none."""
    return tool_data.parse_tools(holder["tools"]) if holder.get("tools") not in (None, "", []) else []


def _check_calls(conversations: list[list[dict]], tools: list[dict], parallel: Any, key: str) -> None:
    """Where tools or calls appear: `parallel_tool_calls` (given under `key`) a boolean, and each
    conversation's calls numbered and in order (`data.tools.check_flow`)."""
    if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for c in conversations for m in c):
        return
    if parallel is not None and not isinstance(parallel, bool):
        raise Invalid(f"{key}: expected true or false, got {_kind(parallel)}")
    for messages in conversations:
        tool_data.number_calls(messages)
        tool_data.check_flow(messages, parallel is not False)


def _message(turn: Any, i: int, tools: list[dict] | None = None, key: str = "messages") -> dict:
    if not isinstance(turn, dict):
        raise Invalid(f"{key}[{i}] must be an object with role and content, got {_kind(turn)}")
    role = turn.get("role")
    if role not in ROLES:
        raise Invalid(f"{key}[{i}]: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise Invalid(f"{key}[{i}] ({role}): 'tool_calls' is only for assistant turns")
    content = turn.get("content")
    if content is None and calls:  # OpenAI: an assistant turn that only calls has no content
        content = ""
    if not isinstance(content, str):
        raise Invalid(f"{key}[{i}] ({role}): 'content' must be a string, got {_kind(content)}")
    weight = turn.get("weight")
    if weight is not None:
        if role != "assistant":
            raise Invalid(f"{key}[{i}] ({role}): 'weight' is only for assistant turns")
        if weight not in (0, 1) or isinstance(weight, bool):
            raise Invalid(f"{key}[{i}]: 'weight' must be 0 or 1, got {weight!r}")
    out = message(role, content, weight)
    if calls is not None:
        out["tool_calls"] = tool_data.parse_calls(calls, f"{key}[{i}]", tools or [])
    if role == "tool":
        answered = turn.get("tool_call_id")
        if answered is not None and not isinstance(answered, str):
            raise Invalid(f"{key}[{i}] (tool): 'tool_call_id' must be a string, got {_kind(answered)}")
        out["tool_call_id"] = answered
    return out


SHAREGPT_ROLES: dict[Any, str] = {  # looked up by whatever "from" holds
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


# LLaMA-Factory's tool turns: the assistant's calls (JSON {name, arguments}, or a list of them) and a
# tool's answer
SHAREGPT_TOOL_TURNS = ("function_call", "observation")


def _sharegpt_turns(turns: Any, key: str = "conversations") -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise Invalid(f"{key!r} must be a non-empty list of {{from, value}} objects")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Invalid(f"{key}[{i}] must be an object with from and value, got {_kind(turn)}")
        if turn.get("from") in SHAREGPT_TOOL_TURNS:
            out.append(_sharegpt_tool_turn(turn, f"{key}[{i}]"))
            continue
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise Invalid(
                f"{key}[{i}]: unknown speaker {turn.get('from')!r} (expected one of: "
                f"{', '.join(sorted([*SHAREGPT_ROLES, *SHAREGPT_TOOL_TURNS]))})"
            )
        if not isinstance(turn.get("value"), str):
            raise Invalid(f"{key}[{i}]: 'value' must be a string, got {_kind(turn.get('value'))}")
        out.append({"role": role, "content": turn["value"]})
    return out


def _sharegpt_tool_turn(turn: dict, where: str) -> dict:
    value = turn.get("value")
    if not isinstance(value, str):
        raise Invalid(f"{where}: 'value' must be a string, got {_kind(value)}")
    if turn["from"] == "observation":
        return {"role": "tool", "content": value}
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        raise Invalid(f"{where} (function_call): not valid JSON ({e.msg} at character {e.pos})") from None
    return {"role": "assistant", "content": "", "tool_calls": calls if isinstance(calls, list) else [calls]}


def from_sharegpt(row: dict) -> Chat:
    messages = _sharegpt_turns(row.get("conversations"))
    system = row.get("system")
    if isinstance(system, str) and system and messages[0]["role"] != "system":  # LLaMA-Factory's system column
        messages.insert(0, {"role": "system", "content": system})
    return from_messages({"messages": messages, "tools": row.get("tools")})


def from_prompt_completion(row: dict) -> Chat:
    prompt, completion = row.get("prompt"), row.get("completion")
    user = _as_messages(prompt, "prompt")
    if isinstance(completion, list):
        completion = _last_assistant(completion, "completion")
    if not isinstance(completion, str):
        raise Invalid(f"'completion' must be a string, got {_kind(completion)}")
    if not completion.strip():
        raise Skip("empty output: 'completion' is empty")
    return Chat(user + [message("assistant", completion)])


# --- labelled text and pairs ------------------------------------------------------------------------

TEXT_KEYS = ("text", "sentence", "sentence1", "premise", "question", "content")
PAIR_KEYS = ("text_pair", "sentence2", "hypothesis")
LABEL_KEYS = ("label", "labels", "class", "category")


def from_labeled(row: dict) -> Labeled:
    text = _first(row, TEXT_KEYS, "text")
    label = _first(row, LABEL_KEYS, "label", allow_int=True)
    pair = next((row[k] for k in PAIR_KEYS if k in row), None)
    if pair is not None and not isinstance(pair, str):
        raise Invalid(f"the text pair must be a string, got {_kind(pair)}")
    if isinstance(label, str):
        label = label.strip()
        if label.lstrip("-").isdigit():
            label = int(label)  # "0" / "1" in CSV and TSV are ids, as in GLUE
    return Labeled(text=text, label=label, text_pair=pair)


SOURCE_KEYS = ("source", "dialogue", "document", "article", "src")
TARGET_KEYS = ("target", "summary", "tgt", "translation", "answer", "output")
REFERENCE_KEY = re.compile(r"(?:summary|target|reference)(\d+)")  # summary1, summary2, ...


def from_pairs(row: dict) -> Pair:
    source = _first(row, SOURCE_KEYS, "source")
    refs = sorted((m for k in row if (m := REFERENCE_KEY.fullmatch(k))), key=lambda m: int(m[1]))
    if any(k in row for k in TARGET_KEYS):
        targets = [_first(row, TARGET_KEYS, "target")]
    elif refs:
        targets = [row[m.string] for m in refs]  # several references: DialogSum's test split has summary1..3
    else:
        raise Invalid(f"missing the target (one of: {', '.join(TARGET_KEYS)})")
    if not all(isinstance(t, str) and t.strip() for t in targets):
        raise Invalid("every target must be a non-empty string")
    return Pair(source=source, target=targets[0], references=targets)


def from_prompt(row: dict) -> Prompt:
    """`{prompt}` alone (a string, or a message list ending with a user turn): a prompt for online RL."""
    messages = _as_messages(row.get("prompt"), "prompt")
    if messages[-1]["role"] != "user":
        raise Invalid("the prompt must end with a user turn")
    return Prompt(
        [dict(m, weight=0) for m in messages],
        columns={k: v for k, v in row.items() if k != "prompt"},
        conversational=not isinstance(row.get("prompt"), str),
    )


def from_openai_rft(row: dict) -> Prompt:
    """OpenAI's reinforcement fine-tuning rows: `messages` ending with the user's turn, and the fields its
    grader reads (`{{ item.answer }}`) beside them. Read only when named (`data.format: openai_rft`): the
    same keys without an answer to grade are a chat."""
    messages = _as_messages(row.get("messages"), "messages")
    if messages[-1]["role"] != "user":
        raise Invalid("the messages must end with a user turn: the model's answer is what is graded")
    return Prompt([dict(m, weight=0) for m in messages], columns={k: v for k, v in row.items() if k != "messages"})


# --- preference formats -> Preference --------------------------------------------------------------


def from_preference(row: dict) -> Preference:
    """`{prompt, chosen, rejected}` (strings or message lists), or HH-RLHF's whole dialogues."""
    if "prompt" not in row:
        return _from_hh_dialogues(row)
    prompt = _as_messages(row["prompt"], "prompt")
    chosen, rejected = (message("assistant", _response(row, key)) for key in ("chosen", "rejected"))
    return _preference(prompt, chosen, rejected)


def from_openai_dpo(row: dict) -> Preference:
    """OpenAI's preference rows: `input` {messages, tools, parallel_tool_calls}, and a preferred and a
    non-preferred assistant output, either of which may call the tools."""
    given = row.get("input")
    if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
        raise Invalid("'input' must be an object with a 'messages' list")
    tools = _tools(given)
    prompt = [_message(m, i, tools, "input.messages") for i, m in enumerate(given["messages"])]
    chosen = _last_assistant_turn(row.get("preferred_output"), "preferred_output", tools)
    rejected = _last_assistant_turn(row.get("non_preferred_output"), "non_preferred_output", tools)
    conversations = [[*prompt, chosen], [*prompt, rejected]]
    _check_calls(conversations, tools, given.get("parallel_tool_calls"), "input.parallel_tool_calls")
    return _preference(prompt, chosen, rejected, tools)


def from_sharegpt_preference(row: dict) -> Preference:
    prompt = _sharegpt_turns(row.get("conversations"))
    responses = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if not isinstance(value, dict) or not isinstance(value.get("value"), str):
            raise Invalid(f"{key!r} must be an object {{from, value}}")
        responses.append(message("assistant", value["value"]))
    return _preference(prompt, responses[0], responses[1])


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def split_hh_dialogue(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> user and assistant messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise Invalid("expected a dialogue of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [message(roles[speaker], content.strip()) for speaker, content in zip(parts[1::2], parts[2::2])]


def _from_hh_dialogues(row: dict) -> Preference:
    chosen, rejected = (_text(row, key) for key in ("chosen", "rejected"))
    a, b = split_hh_dialogue(chosen), split_hh_dialogue(rejected)
    if a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        raise Invalid("each dialogue must end with an Assistant turn")
    if [(m["role"], m["content"]) for m in a[:-1]] != [(m["role"], m["content"]) for m in b[:-1]]:
        raise Skip("'chosen' and 'rejected' differ before their last Assistant turn, so they share no prompt")
    return _preference(a[:-1], a[-1], b[-1])


def _preference(prompt: list[dict], chosen: dict, rejected: dict, tools: list[dict] | None = None) -> Preference:
    """From the prompt's messages and the two responses' assistant messages."""
    after_tool = bool(tools) and bool(prompt) and prompt[-1]["role"] == "tool"
    if not prompt or (prompt[-1]["role"] != "user" and not after_tool):
        raise Invalid("the prompt must end with a user turn" + (" or a tool's answer" if tools else ""))
    calls = [
        [(c["function"]["name"], c["function"]["arguments"]) for c in r.get("tool_calls") or []]
        for r in (chosen, rejected)
    ]
    if chosen["content"] == rejected["content"] and calls[0] == calls[1]:
        raise Invalid("'chosen' and 'rejected' are identical: the pair teaches nothing")
    for key, response, called in (("chosen", chosen, calls[0]), ("rejected", rejected, calls[1])):
        if not response["content"].strip() and not called:
            raise Skip(f"empty response: {key} is empty")
    return Preference(
        prompt=[dict(m, weight=0) for m in prompt],
        chosen=chosen["content"],
        rejected=rejected["content"],
        tools=tools or [],
        chosen_calls=chosen.get("tool_calls") or [],
        rejected_calls=rejected.get("tool_calls") or [],
    )


def _response(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, list):
        return _last_assistant(value, key)
    return _string(row, key)  # an empty one is skipped by _preference, as an empty output is


def _last_assistant(value: Any, key: str) -> str:
    """The content of the last assistant message of a message list (or a lone string)."""
    if isinstance(value, str):
        return value
    return _last_assistant_turn(value, key)["content"]


def _last_assistant_turn(value: Any, key: str, tools: list[dict] | None = None) -> dict:
    """The last message of a message list (or a lone string), which must be the assistant's."""
    if isinstance(value, str):
        return message("assistant", value)
    if not isinstance(value, list) or not value:
        raise Invalid(f"{key!r} must be a string or a non-empty list of messages")
    turns = [_message(m, i, tools, key) for i, m in enumerate(value)]
    if turns[-1]["role"] != "assistant":
        raise Invalid(f"{key!r} must end with an assistant message")
    return turns[-1]


def _as_messages(value: Any, key: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise Invalid(f"{key!r} is empty")
        return [message("user", value)]
    if isinstance(value, list) and value:
        return [_message(m, i) for i, m in enumerate(value)]
    raise Invalid(f"{key!r} must be a string or a non-empty list of messages, got {_kind(value)}")


# --- detection and the loop --------------------------------------------------------------------------

Converter = Callable[[dict], Record | list[Record]]  # a row's record (a Self-Instruct row: one per instance)

FORMATS: dict[str, Converter] = {
    "alpaca": from_alpaca,
    "self_instruct": from_self_instruct,
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "prompt_completion": from_prompt_completion,
    "labeled": from_labeled,
    "pairs": from_pairs,
    "preference": from_preference,
    "openai_dpo": from_openai_dpo,
    "sharegpt_preference": from_sharegpt_preference,
    "prompt": from_prompt,
    "openai_rft": from_openai_rft,
}
# What `data.format: preference` covers: every preference layout, told apart row by row.
FAMILY = {"preference": ("preference", "openai_dpo", "sharegpt_preference")}


def detect_format(keys: Iterable[str]) -> str | None:
    """The format whose fields these are, or None."""
    keys = set(keys)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt_preference" if {"chosen", "rejected"} <= keys else "sharegpt"
    if {"preferred_output", "non_preferred_output"} <= keys:
        return "openai_dpo"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "instances"} <= keys:
        return "self_instruct"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt"
    if keys & set(LABEL_KEYS) and keys & set(TEXT_KEYS):
        return "labeled"
    if keys & set(SOURCE_KEYS) and (keys & set(TARGET_KEYS) or any(REFERENCE_KEY.fullmatch(k) for k in keys)):
        return "pairs"
    return None


def load_records(
    spec: str | Path, fmt: str = "auto", columns: dict[str, Any] | None = None, header: bool | None = None
) -> tuple[list[Record], list[Problem]]:
    """Every record of the file, and every problem found, each with file and line."""
    records: list[Record] = []
    problems: list[Problem] = []
    for item in iter_records(spec, fmt, columns, header):
        if isinstance(item, Problem):
            problems.append(item)
        else:
            records.append(item)
    if not records and not problems:
        problems.append(Problem(str(spec), None, "no examples in the file"))
    return records, problems


class Undetectable(Invalid):
    """The format cannot be told from the first row: nothing after it can be read either."""


def iter_records(
    spec: str | Path, fmt: str = "auto", columns: dict[str, Any] | None = None, header: bool | None = None
) -> Iterator[Record | Problem]:
    convert = None
    for row in read_rows(spec, header):
        if isinstance(row, Problem):
            yield row
            continue
        if not isinstance(row.value, dict):
            yield Problem(row.file, row.line, f"expected a JSON object per example, got {_kind(row.value)}")
            continue
        try:
            value = pick_columns(row.value, columns) if columns else row.value
            convert = convert or _converter(fmt, value)
            converted = convert(value)
        except Undetectable as e:
            yield Problem(row.file, row.line, str(e))
            return
        except Invalid as e:
            severity = "warning" if isinstance(e, Skip) else "error"
            text = f"{e} (record {row.record})" if row.record else str(e)
            yield Problem(row.file, row.line, text + ("; skipped" if severity == "warning" else ""), severity)
            continue
        for record in converted if isinstance(converted, list) else [converted]:  # a Self-Instruct row: its instances
            record.where = row.where
            yield record


def _converter(fmt: str, first: dict) -> Converter:
    if fmt in FAMILY:

        def convert(value: dict) -> Record | list[Record]:
            found = detect_format(value)
            return FORMATS[found if found in FAMILY[fmt] else fmt](value)

        return convert
    if fmt != "auto":
        return FORMATS[fmt]
    if set(first) == {"0", "1"}:
        # A headerless two-column file: text<TAB>label (or label<TAB>text); the label is the short side.
        columns = _two_column_guess(first)
        return lambda value: from_labeled(pick_columns(value, columns))
    detected = detect_format(first)
    if detected is None:
        raise Undetectable(
            f"cannot tell the format from the fields {sorted(first)}; set data.format "
            f"(one of: {', '.join(FORMATS)}) and, for CSV/TSV, data.columns"
        )
    return FORMATS[detected]


def _two_column_guess(first: dict) -> dict[str, int]:
    """Which of two unnamed columns is the label: the one without spaces, shorter (e.g. 'Sci/Tech', '1')."""
    a, b = first["0"].strip(), first["1"].strip()
    label_is_second = (" " not in b, -len(b)) >= (" " not in a, -len(a))
    return {"text": 0, "label": 1} if label_is_second else {"text": 1, "label": 0}


def pick_columns(value: dict, columns: dict[str, Any]) -> dict:
    """Rename columns to canonical fields: {"label": 0, "text": [1, 2]} joins columns 1 and 2 as the text."""
    out = {}
    for field, source in columns.items():
        sources = source if isinstance(source, list) else [source]
        missing = [str(s) for s in sources if str(s) not in value]
        if missing:
            raise Invalid(f"no column {', '.join(missing)} (for {field}) in this row; it has {sorted(value)}")
        cells = [value[str(s)] for s in sources]
        out[field] = " ".join(c.strip() for c in cells) if len(cells) > 1 else cells[0]
    return out


def _string(row: dict, key: str) -> str:
    """The string under `key`, possibly empty."""
    value = row.get(key)
    if value is None:
        raise Invalid(f"missing {key!r}")
    if not isinstance(value, str):
        raise Invalid(f"{key!r} must be a string, got {_kind(value)}")
    return value


def _text(row: dict, key: str) -> str:
    """The string under `key`, which must not be blank."""
    value = _string(row, key)
    if not value.strip():
        raise Invalid(f"{key!r} is empty")
    return value


@overload
def _first(row: dict, keys: tuple[str, ...], name: str) -> str: ...
@overload
def _first(row: dict, keys: tuple[str, ...], name: str, allow_int: bool) -> str | int: ...
def _first(row: dict, keys: tuple[str, ...], name: str, allow_int: bool = False) -> str | int:
    key = next((k for k in keys if k in row), None)
    if key is None:
        raise Invalid(f"missing the {name} (one of: {', '.join(keys)})")
    value = row[key]
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"{key!r} must be a non-empty string" + (" or an integer" if allow_int else ""))
    return value
