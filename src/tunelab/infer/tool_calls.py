"""Tool calls as each model family writes them, read back into OpenAI's calls: Hermes / Qwen's
`<tool_call>{...}</tool_call>`, Llama 3's JSON (`{"name": ..., "parameters": ...}`, after `<|python_tag|>`
or alone), Mistral's `[TOOL_CALLS][...]`; the family told from its chat template. `tunelab serve` answers
with them (`serve.tools`) and `tunelab eval` scores them (`eval.tool_calls`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tunelab.ids import new_id


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict:
        return {"id": new_id("call"), "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class Format:
    """How one family writes tool calls: `start` marks where calls begin (what streaming holds back)."""

    name = ""
    start = ""

    @staticmethod
    def takes(template: str) -> bool:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        """(the text before the calls, or None; the calls) of an answer; no calls when it holds none."""
        raise NotImplementedError


class Hermes(Format):
    name, start = "hermes", "<tool_call>"
    pattern = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    @staticmethod
    def takes(template: str) -> bool:
        return "<tool_call>" in template

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        if self.start not in text:
            return text, []
        before = text[: text.index(self.start)].strip()
        calls = [c for body in self.pattern.findall(text) if (c := _call(body, "arguments"))]
        return (before or None, calls) if calls else (text, [])


class Llama3(Format):
    name, start = "llama3_json", "{"

    @staticmethod
    def takes(template: str) -> bool:
        return "<|start_header_id|>" in template

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = [c for part in body.split(";") if (c := _call(part, "parameters"))]
        return (None, calls) if calls else (text, [])


class Mistral(Format):
    name, start = "mistral", "[TOOL_CALLS]"

    @staticmethod
    def takes(template: str) -> bool:
        return "[TOOL_CALLS]" in template

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        if self.start not in text:
            return text, []
        before, _, body = text.partition(self.start)
        body, calls = body.strip(), []
        if body.startswith("["):
            try:
                items = json.loads(body)
            except json.JSONDecodeError:
                items = []
            calls = [c for item in items if isinstance(item, dict) and (c := _call(json.dumps(item), "arguments"))]
        else:  # name[ARGS]{...}, repeated
            for name, arguments in re.findall(
                r"([\w.-]+)\[ARGS\](\{.*?\})(?=\s*[\w.-]+\[ARGS\]|\s*$)", body, re.DOTALL
            ):
                calls.append(Call(name, json.dumps(json.loads(arguments))))
        return (before.strip() or None, calls) if calls else (text, [])


FORMATS: tuple[type[Format], ...] = (Hermes, Mistral, Llama3)


def _call(body: str, key: str) -> Call | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
    return Call(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))
