"""Scoring tool use (`tunelab eval MODEL --data tools.jsonl`): every trained assistant turn of the file's
tool-call rows is asked of the model (the conversation before it, with the row's tools, through the
template it trained with), its answer read back as calls the way `tunelab serve` reads them (the
template's format: Hermes `<tool_call>`, Llama 3 JSON, Mistral `[TOOL_CALLS]`), and compared with the
reference turn.

    turns whose reference calls tools:
        function_accuracy       the functions called, in order, are the reference's
        arguments_exact_match   of those turns, the ones whose every call's arguments are JSON-equal to
                                the reference's (how well it fills arguments once it picks right)
        full_call_exact_match   functions and arguments both right (the product of the two above)
        missed_call_rate        no call at all
    turns whose reference answers in text:
        false_call_rate         a call where none was due
    every turn:
        malformed_rate          a call begun (the format's marker) that cannot be read, or one naming a
                                tool the row does not declare, or arguments that are not a JSON object

Each prediction is kept beside its reference (`.predictions.jsonl`), with its per-turn scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.records import Chat
from tunelab.errors import UserError
from tunelab.eval.stats import bootstrap_interval

# The scores that rise as a model gets better and are a mean over the call turns, so that two models'
# turns pair up (what `tunelab compare` can take as an arm's in-task metric, with paired intervals)
PER_TURN = {"full_call_exact_match": "full_call", "function_accuracy": "function"}


def per_turn_rows(predictions: list[dict]) -> list[dict]:
    """Each call turn's PER_TURN scores (0 or 100), keyed by its position: rows `eval.stats.paired_scores`
    pairs between two models scored on the same file."""
    calling = [row for row in predictions if "calls" in row["reference"]]
    return [
        {"id": str(i), **{key: 100.0 * row[field] for key, field in PER_TURN.items()}} for i, row in enumerate(calling)
    ]


@dataclass
class Turn:
    """One assistant turn to ask for: the conversation before it, the row's tools, and the reference."""

    where: str
    messages: list[dict]
    tools: list[dict]
    calls: list[tuple[str, dict]]  # the reference's (name, arguments); empty: it answers in text
    text: str


def tool_turns(records: list) -> list[Turn]:
    """The trained assistant turns of the tool-call rows among `records` (a row without tools: none)."""
    turns = []
    for record in records:
        if not isinstance(record, Chat) or not record.tools:
            continue
        for i, m in enumerate(record.messages):
            if m["role"] == "assistant" and m["weight"] == 1:
                calls = [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]
                turns.append(Turn(record.where, record.messages[:i], record.tools, calls, m["content"]))
    return turns


def score(turns: list[Turn], answers: list[str], fmt) -> tuple[dict, list[dict]]:
    """(metrics, one prediction row per turn) of the model's answers, read with the template's format."""
    rows = []
    for turn, answer in zip(turns, answers):
        declared = {t["function"]["name"] for t in turn.tools}
        _, parsed = fmt.parse(answer)
        calls, malformed = [], fmt.start in answer and not parsed
        for call in parsed:
            try:
                arguments = json.loads(call.arguments)
            except json.JSONDecodeError:
                arguments = None
            if call.name not in declared or not isinstance(arguments, dict):
                malformed = True
            calls.append((call.name, arguments))
        names = [name for name, _ in calls] == [name for name, _ in turn.calls]
        rows.append(
            {
                "where": turn.where,
                "reference": {"calls": _shown(turn.calls), "text": turn.text} if turn.calls else {"text": turn.text},
                "prediction": answer,
                "calls": _shown(calls),
                "function": bool(turn.calls) and names,
                "full_call": bool(turn.calls) and calls == turn.calls,
                "malformed": malformed,
            }
        )
    return _metrics(turns, rows), rows


def _metrics(turns: list[Turn], rows: list[dict]) -> dict:
    calling = [row for turn, row in zip(turns, rows) if turn.calls]
    answering = [row for turn, row in zip(turns, rows) if not turn.calls]

    def rate(part: list[dict], hit) -> float | None:
        return round(100 * sum(map(hit, part)) / len(part), 2) if part else None

    exact = [100.0 * r["full_call"] for r in calling]
    return {
        "turns": len(rows),
        "call_turns": len(calling),
        "function_accuracy": rate(calling, lambda r: r["function"]),
        "arguments_exact_match": rate([r for r in calling if r["function"]], lambda r: r["full_call"]),
        "full_call_exact_match": rate(calling, lambda r: r["full_call"]),
        # its 95% percentile-bootstrap interval over the call turns
        "full_call_exact_match_interval": [round(x, 2) for x in bootstrap_interval(exact)] if exact else None,
        "missed_call_rate": rate(calling, lambda r: not r["calls"]),
        "false_call_rate": rate(answering, lambda r: bool(r["calls"])),
        "malformed_rate": rate(rows, lambda r: r["malformed"]),
    }


def _shown(calls: Sequence[tuple[str, dict | None]]) -> list[dict]:
    return [{"name": name, "arguments": arguments} for name, arguments in calls]


def call_format(template: str):
    """The way the template writes calls, as `tunelab serve` reads them."""
    from tunelab.infer.tool_calls import FORMATS

    found = next((f() for f in FORMATS if f.takes(template)), None)
    if found is None:
        raise UserError(
            "the model's chat template writes tool calls in no format tunelab reads (Hermes <tool_call>, "
            "Llama 3 JSON, Mistral [TOOL_CALLS])"
        )
    return found


def evaluate_tools(folder: Path, records: list, max_new_tokens: int, precision: str = "fp32") -> tuple[dict, list]:
    """Ask `folder`'s model every tool turn of `records`; (result, prediction rows). A model whose own
    template takes no tools is asked through tunelab's Hermes-style ChatML template (`data.template:
    hermes`), as a job or run on tool data trains it."""
    from tunelab.data.render import Renderer
    from tunelab.infer.generate import BatchRequest, generate_batch
    from tunelab.infer.sampling import Sampling
    from tunelab.models.load import inference_dtype, load_generator

    turns = tool_turns(records)
    if not turns:
        raise UserError("no tool-call rows to score: the file's rows declare no tools")
    model, tokenizer, encoder_decoder = load_generator(folder, inference_dtype(precision), merged=True)
    if encoder_decoder:
        raise UserError("tool calls are scored on decoder-only chat models")
    own = "tools" in (tokenizer.chat_template or "")
    renderer = Renderer(tokenizer, "chat" if own else "hermes", max_length=1 << 30)
    prompts = [renderer.generation_prompt_ids(turn.messages, turn.tools) for turn in turns]
    request = BatchRequest(Sampling(max_new_tokens, temperature=0.0), description="asking for tool calls")
    answers = generate_batch(model, tokenizer, prompts, request)
    metrics, rows = score(turns, answers, call_format(renderer.template))
    template = "the model's own" if own else "hermes (the model's own takes no tools)"
    return {"method": "tools", "examples": len(turns), "template": template, "metrics": metrics}, rows
