"""Tool calling on chat completions, as vLLM serves it: the tools rendered by the model's own chat template
(`apply_chat_template(tools=...)`), and the answer turned into OpenAI's `message.tool_calls`.

- `tool_choice: auto` (the default with tools): the model decides; its answer is parsed in the format its
  template's family writes, told from the template: Hermes / Qwen's `<tool_call>{...}</tool_call>`,
  Llama 3's JSON (`{"name": ..., "parameters": ...}`, after `<|python_tag|>` or alone), Mistral's
  `[TOOL_CALLS][...]`. A template that takes tools but writes none of these: a 400 saying to name a function
  or ask for `required`.
- `required`: the answer is constrained by a grammar to a JSON list of calls (at least one; one with
  `parallel_tool_calls: false`), each a tool's name and arguments valid under its parameters' schema.
- a named function: the answer is constrained to that function's arguments.
- `none`: the tools are shown, the answer is text.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from tunelab.errors import RequestError
from tunelab.infer.constrain import Constraint
from tunelab.infer.tool_calls import FORMATS, Call, Format, Llama3


@dataclass
class ToolUse:
    """What a chat request with tools asks: the tools (as the template takes them), the choice, and how the
    answer becomes calls."""

    tools: list[dict]
    choice: str | dict  # "auto" | "required" | "none" | {"type": "function", "function": {"name": ...}}
    parallel: bool = True
    format: Format | None = None

    @classmethod
    def of(cls, tools: list[dict], choice, parallel: bool | None) -> ToolUse:
        for i, tool in enumerate(tools):
            if tool.get("type") != "function" or not isinstance((tool.get("function") or {}).get("name"), str):
                raise RequestError(
                    400, f"tools[{i}]: a tool is {{type: function, function: {{name, ...}}}}", param="tools"
                )
        names = {t["function"]["name"] for t in tools}
        choice = "auto" if choice is None else choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in names:
                raise RequestError(400, f"tool_choice: no tool named {name!r} in tools", param="tool_choice")
        elif choice not in ("auto", "required", "none"):
            raise RequestError(400, "tool_choice: give none, auto, required or a function", param="tool_choice")
        return cls(tools, choice, parallel is not False)

    def check(self, template: str | None) -> None:
        """Against the model's chat template, once it is loaded: a 400 when it takes no tools, or writes calls
        in no format known here while the model is left to decide."""
        if not template or "tools" not in template:
            raise RequestError(400, "tools: this model's chat template does not take tools", param="tools")
        self.format = next((f() for f in FORMATS if f.takes(template)), None)
        if self.choice == "auto" and self.format is None:
            raise RequestError(
                400,
                "tool_choice: auto needs to read this model's tool calls, and its chat template writes them in "
                "no format known here; name a function or ask for required",
                param="tool_choice",
            )

    def finish_reason(self, calls: list[Call], reason: str) -> str:
        """OpenAI's: tool_calls when the model called (stop when the function was named), else as it ended."""
        if not calls or reason == "length":
            return reason
        return "stop" if self.named is not None else "tool_calls"

    @property
    def named(self) -> str | None:
        return self.choice["function"]["name"] if isinstance(self.choice, dict) else None

    def constraint(self) -> Constraint | None:
        """The grammar the answer must follow: a named function's arguments, or (required) a JSON list of
        calls; None when the model decides."""
        schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}
        if self.named is not None:
            return Constraint("json_schema", json.dumps(schemas[self.named]), "tool_choice")
        if self.choice != "required":
            return None
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in schemas.items()
        ]
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": call}, **({} if self.parallel else {"maxItems": 1})}
        return Constraint("json_schema", json.dumps(calls), "tool_choice")

    def calls(self, text: str) -> tuple[str | None, list[Call]]:
        """(the content left, the calls) of a whole answer."""
        if self.named is not None:
            return None, [Call(self.named, text)]
        if self.choice == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:  # cut by max_tokens
                return text, []
            return None, [Call(i["name"], json.dumps(i["parameters"])) for i in items]
        if self.choice == "auto" and self.format is not None:
            return self.format.parse(text)
        return text, []

    def releasable(self, text: str) -> int:
        """How much of an answer's text so far may stream as content: none of a forced call; with `auto`,
        what comes before the family's call marker (a suffix that may begin one waits); all with `none`."""
        if self.choice == "none":
            return len(text)
        if self.choice != "auto" or self.format is None:
            return 0
        if isinstance(self.format, Llama3):  # a call is the whole answer: a JSON object, perhaps after the tag
            head = text.lstrip()
            tag = "<|python_tag|>"
            return 0 if not head or head.startswith("{") or tag.startswith(head[: len(tag)]) else len(text)
        marker = self.format.start
        if marker in text:
            return text.index(marker)
        waiting = next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-k:])), 0)
        return len(text) - waiting


def rendered(message: dict) -> dict:
    """A conversation message as chat templates take it: an assistant's calls with their arguments as a
    mapping (templates write them with `tojson`), as vLLM passes them."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function") or {})
        with contextlib.suppress(json.JSONDecodeError, TypeError):  # not JSON: passed on as it is
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}
