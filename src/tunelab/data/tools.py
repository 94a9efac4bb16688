"""Tool-use data: OpenAI's function-calling rows, checked as they are read.

    {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                "parameters": {"type": "object", "properties": {...}, "required": [...]}}}],
     "parallel_tool_calls": false,
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
                  {"role": "assistant", "content": "21 degrees."}]}

A row is refused, by file and line, when a call's arguments are not JSON or do not match its tool's
parameter schema (checked with the `jsonschema` library), a call names a tool the row does not declare,
a tool message answers no earlier call, `parallel_tool_calls: false` is broken, or the conversation ends
on a tool message. In the canonical record a call's arguments are a mapping, as chat templates take
them (`{{ call.arguments | tojson }}`); `data convert` writes them back as OpenAI's JSON text.

The same data in other tools' layouts is converted on read: a tool given bare (`{name, description,
parameters}`, as LLaMA-Factory and Glaive write them), `tools` as a JSON string (LLaMA-Factory), arguments
as a mapping (Axolotl, transformers), and ShareGPT turns `function_call` / `observation` (LLaMA-Factory).
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.data.records import Invalid
from tunelab.data.records import kind_of as kind


def parse_tools(value: Any) -> list[dict]:
    """A row's `tools`: OpenAI's [{type: function, function: {name, description, parameters}}], also bare
    functions or a JSON string of either; each parameter schema checked as JSON Schema."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Invalid(f"tools: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, list):
        raise Invalid(f"tools: expected a list of functions, got {kind(value)}")
    tools, names = [], set()
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise Invalid(f"tools[{i}]: expected an object, got {kind(tool)}")
        function = tool.get("function") if "function" in tool else tool
        if "function" in tool and tool.get("type", "function") != "function":
            raise Invalid(f"tools[{i}]: type {tool.get('type')!r}: only function tools are trained")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise Invalid(f"tools[{i}]: a function needs a name: {{type: function, function: {{name, parameters}}}}")
        name = function["name"]
        if name in names:
            raise Invalid(f"tools[{i}]: {name!r} is declared twice")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        _check_schema(parameters, f"tools[{i}] ({name}): parameters")
        described = {"name": name}  # in OpenAI's order: what the template shows the model
        if isinstance(function.get("description"), str):
            described["description"] = function["description"]
        described["parameters"] = parameters
        tools.append({"type": "function", "function": described})
    return tools


def parse_calls(value: Any, where: str, tools: list[dict]) -> list[dict]:
    """An assistant turn's `tool_calls`, checked against the row's tools: canonical calls
    {id, type: function, function: {name, arguments: mapping}}."""
    if not isinstance(value, list) or not value:
        raise Invalid(f"{where}.tool_calls: expected a non-empty list of calls, got {kind(value)}")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls = []
    for k, call in enumerate(value):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise Invalid(f"{at}: expected an object, got {kind(call)}")
        function = call.get("function") if "function" in call else call  # {name, arguments} alone
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Invalid(f"{at}: a call is {{id, type: function, function: {{name, arguments}}}}")
        name = function["name"]
        if name not in schemas:
            declared = ", ".join(sorted(schemas)) or "none"
            raise Invalid(f"{at}: calls {name!r}, which the row's tools do not declare (declared: {declared})")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise Invalid(f"{at}.function.arguments: not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(arguments, dict):
            raise Invalid(f"{at}.function.arguments: expected a JSON object, got {kind(arguments)}")
        _check_arguments(arguments, schemas[name], f"{at}: arguments do not match {name}'s parameters")
        identifier = call.get("id")
        if identifier is not None and not isinstance(identifier, str):
            raise Invalid(f"{at}.id: expected a string, got {kind(identifier)}")
        calls.append({"id": identifier, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def check_flow(messages: list[dict], parallel: bool = True) -> None:
    """The order of calls and answers: every tool message answers an earlier call not yet answered (by
    its tool_call_id, or the oldest open one where the data gives no ids), calls are one at a time when
    `parallel_tool_calls` is false, and the conversation does not end on a tool message."""
    open_calls: list[str] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            if not parallel and len(m["tool_calls"]) > 1:
                raise Invalid(
                    f"messages[{i}]: {len(m['tool_calls'])} calls in one turn, but the row sets "
                    "parallel_tool_calls: false"
                )
            open_calls += [call["id"] for call in m["tool_calls"]]
        elif m["role"] == "tool":
            answered = m.get("tool_call_id")
            if answered is None and open_calls:
                answered = open_calls[0]
            if answered not in open_calls:
                earlier = f"open calls: {', '.join(map(str, open_calls))}" if open_calls else "no call is open"
                raise Invalid(f"messages[{i}] (tool): tool_call_id {answered!r} answers no earlier call ({earlier})")
            open_calls.remove(answered)
            m["tool_call_id"] = answered
    if messages and messages[-1]["role"] == "tool":
        raise Invalid("the conversation ends on a tool message: the assistant's turn after it is missing")


def number_calls(messages: list[dict]) -> None:
    """Give calls without an id one (call_0, call_1, ... in order), as templates that show ids expect."""
    taken = {call["id"] for m in messages for call in m.get("tool_calls") or [] if call["id"] is not None}
    n = 0
    for m in messages:
        for call in m.get("tool_calls") or []:
            while call["id"] is None:
                if f"call_{n}" not in taken:
                    call["id"] = f"call_{n}"
                n += 1


def openai_calls(calls: list[dict]) -> list[dict]:
    """Canonical calls as OpenAI writes them: arguments as JSON text."""
    return [
        {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
        for call in calls
    ]


def _check_schema(schema: Any, where: str) -> None:
    from jsonschema import SchemaError, validators

    if not isinstance(schema, dict):
        raise Invalid(f"{where}: expected a JSON Schema object, got {kind(schema)}")
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise Invalid(f"{where}: not a valid JSON Schema: {e.message}") from None


def _check_arguments(arguments: dict, schema: dict, where: str) -> None:
    from jsonschema import validators

    validator = validators.validator_for(schema)(schema)
    error = next(iter(sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        path = "".join(f"[{p!r}]" for p in error.absolute_path)
        raise Invalid(f"{where}: {error.message}" + (f" (at {path})" if path else ""))
