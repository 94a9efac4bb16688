"""Canonical records: what every data format is normalised into, one type per family.

Messages are plain dicts `{"role", "content", "weight"}` (roles system / user / assistant), as chat
templates take them; `weight` is 1 for an assistant turn the loss should see, 0 otherwise.
Every record keeps `where` ("file:line"), so that any later problem can be traced to the user's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Chat:
    """An instruction or chat example: the loss looks at assistant turns of weight 1 only."""

    messages: list[dict]
    where: str = ""


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
    """A prompt (as messages) with a preferred and a dispreferred assistant response."""

    prompt: list[dict]
    chosen: str
    rejected: str
    where: str = ""


@dataclass
class Prompt:
    """A prompt alone (as messages, ending with a user turn): what online RL samples responses to."""

    messages: list[dict]
    where: str = ""


Record = Chat | Labeled | Pair | Preference | Prompt


def message(role: str, content: str, weight: int | None = None) -> dict:
    """A message dict; the default weight trains assistant turns and nothing else."""
    return {"role": role, "content": content, "weight": (1 if role == "assistant" else 0) if weight is None else weight}
