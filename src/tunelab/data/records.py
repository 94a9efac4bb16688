"""Canonical records: what every data format is normalised into, one type per family.

Messages are plain dicts `{"role", "content", "weight"}` (roles system / user / assistant / tool), as chat
templates take them; `weight` is 1 for an assistant turn the loss should see, 0 otherwise. Tool use adds
`tool_calls` to an assistant turn ({id, type: function, function: {name, arguments: a mapping}}) and
`tool_call_id` to a tool message (`data.tools`).
Every record keeps `where` ("file:line"), so that any later problem can be traced to the user's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class Invalid(ValueError):
    """One row's problem, stated for the user; `formats.load_records` adds where it is."""


def kind_of(value: Any) -> str:
    """What a JSON value is, in the user's words: an object, a list, a string..."""
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


@dataclass
class Chat:
    """An instruction or chat example: the loss looks at assistant turns of weight 1 only; `tools`: the
    functions the conversation may call (OpenAI's tool objects), shown to the model by its template."""

    messages: list[dict]
    where: str = ""
    tools: list[dict] = field(default_factory=list)


@dataclass
class Labeled:
    """A text (or text pair) with a class label, given as a name or an integer id."""

    text: str
    label: str | int
    text_pair: str | None = None
    where: str = ""


@dataclass
class Pair:
    """A source and its target for generation tasks; several references where the data has them."""

    source: str
    target: str
    references: list[str] = field(default_factory=list)  # every acceptable target, `target` first
    where: str = ""


@dataclass
class Preference:
    """A prompt (as messages) with a preferred and a dispreferred assistant response; with tools, either
    response may call them (`chosen_calls` / `rejected_calls`, canonical as in `Chat`)."""

    prompt: list[dict]
    chosen: str
    rejected: str
    where: str = ""
    tools: list[dict] = field(default_factory=list)
    chosen_calls: list[dict] = field(default_factory=list)
    rejected_calls: list[dict] = field(default_factory=list)

    def responses(self) -> tuple[dict, dict]:
        """The chosen and the rejected response as assistant messages."""
        chosen, rejected = message("assistant", self.chosen), message("assistant", self.rejected)
        if self.chosen_calls:
            chosen["tool_calls"] = self.chosen_calls
        if self.rejected_calls:
            rejected["tool_calls"] = self.rejected_calls
        return chosen, rejected


@dataclass
class Prompt:
    """A prompt alone (as messages, ending with a user turn): what online RL samples responses to; its
    row's other columns (a reference answer, tests) go to GRPO's reward functions."""

    messages: list[dict]
    where: str = ""
    columns: dict = field(default_factory=dict)
    conversational: bool = True  # False: the row's prompt was a string (TRL's "standard" format)


Record = Chat | Labeled | Pair | Preference | Prompt


def message(role: str, content: str, weight: int | None = None) -> dict:
    """A message dict; the default weight trains assistant turns and nothing else."""
    return {"role": role, "content": content, "weight": (1 if role == "assistant" else 0) if weight is None else weight}
