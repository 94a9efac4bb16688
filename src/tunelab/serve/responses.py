"""OpenAI's Responses API (`POST /v1/responses`), stateless: a request becomes the chat completion it
means (input items as messages, `instructions` as the system turn, function tools, `text.format` as
`response_format`, `max_output_tokens`), decoded by the same serving path, and comes back as a Response
object, or as its typed stream of events (`response.created` ... `response.output_text.delta` ...
`response.completed`). Responses are not stored: `store` is accepted and nothing is kept, so
`previous_response_id` and `GET /v1/responses/{id}` answer that they are not (400, 404).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from tunelab.errors import RequestError
from tunelab.ids import new_id, now
from tunelab.serve.protocol import ChatCompletionRequest, Request


class ResponsesRequest(Request):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    metadata: dict[str, Any] | None = None

    def to_chat(self) -> ChatCompletionRequest:
        """The chat completion this request asks for (a 400 naming what the server does not do)."""
        if self.previous_response_id:
            raise RequestError(400, "previous_response_id: responses are not stored here", param="previous_response_id")
        for name in ("background", "conversation", "prompt"):
            if getattr(self, name):
                raise RequestError(400, f"{name}: not supported by this server", param=name)
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += _messages(self.input)
        chat: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_completion_tokens": self.max_output_tokens,
        }
        if self.tools:
            chat["tools"] = [_chat_tool(t, i) for i, t in enumerate(self.tools)]
            chat["parallel_tool_calls"] = self.parallel_tool_calls
        if self.tool_choice is not None:
            choice = self.tool_choice
            if isinstance(choice, dict):
                choice = {"type": "function", "function": {"name": choice.get("name")}}
            chat["tool_choice"] = choice
        fmt = (self.text or {}).get("format")
        if fmt and fmt.get("type") == "json_schema":
            schema = {"name": fmt.get("name", "output"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif fmt:
            chat["response_format"] = {"type": fmt.get("type")}
        try:
            return ChatCompletionRequest.model_validate(chat)
        except Exception as e:  # a message the chat API would refuse: said in the Responses API's terms
            raise RequestError(400, f"input: {str(e).splitlines()[0]}", param="input") from None

    def echo(self) -> dict:
        """The request's settings, as a Response object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": self.tools or [],
            "tool_choice": self.tool_choice or "auto",
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "text": self.text or {"format": {"type": "text"}},
            "metadata": self.metadata or {},
            "store": bool(self.store),
            "previous_response_id": None,
            "truncation": "disabled",
            "reasoning": None,
            "error": None,
        }


def _messages(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role", "user"), "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        else:
            raise RequestError(400, f"input[{i}]: {kind} items are not supported here", param="input")
    return out


def _text(content: Any, i: int) -> str:
    if isinstance(content, str) or content is None:
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise RequestError(
                400, f"input[{i}].content[{j}]: {part.get('type')} parts are not supported (text only)", param="input"
            )
        parts.append(part.get("text", ""))
    return "".join(parts)


def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise RequestError(
            400, f"tools[{i}]: {tool.get('type')} tools are not served here (function only)", param="tools"
        )
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


# --- the answer -----------------------------------------------------------------------------------------


def response_object(completion: dict, body: ResponsesRequest, response_id: str) -> dict:
    """The Response of a whole chat completion."""
    choice = completion["choices"][0]
    message, usage = choice["message"], completion["usage"]
    output: list[dict] = []
    if message.get("content") or not message.get("tool_calls"):
        output.append(_message_item(new_id("msg"), message.get("content") or "", "completed"))
    output += [_call_item(call) for call in message.get("tool_calls") or []]
    cut = choice["finish_reason"] == "length"
    return {
        "id": response_id,
        "object": "response",
        "created_at": completion["created"],
        "model": completion["model"],
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": output,
        "usage": _usage(usage),
        **body.echo(),
    }


def _usage(usage: dict) -> dict:
    """A chat completion's usage in the Responses API's terms."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _message_item(item_id: str, text: str, status: str) -> dict:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: dict) -> dict:
    function = call["function"]
    return {
        "type": "function_call",
        "id": new_id("fc"),
        "call_id": call["id"],
        "name": function["name"],
        "arguments": function["arguments"],
        "status": "completed",
    }


class EventStream:
    """A chat completion's chunks as the Responses API's typed events, numbered in order."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body, self.model, self.id, self.created = body, model, new_id("resp"), now()
        self.number = 0
        self.text: list[str] = []
        self.message_id: str | None = None
        self.items: list[dict] = []
        self.finish = "stop"

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def shell(self, status: str) -> dict:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": status,
            "incomplete_details": None,
            "output": [],
            "usage": None,
            **self.body.echo(),
        }

    def start(self) -> list[str]:
        return [
            self.event("response.created", response=self.shell("in_progress")),
            self.event("response.in_progress", response=self.shell("in_progress")),
        ]

    def chunk(self, chunk: dict) -> list[str]:
        """The events of one chat chunk: text deltas, whole function calls, the finish."""
        out = []
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.message_id is None:
                    self.message_id = new_id("msg")
                    item = _message_item(self.message_id, "", "in_progress")
                    out.append(self.event("response.output_item.added", output_index=0, item=item))
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    out.append(self._part("response.content_part.added", part))
                self.text.append(delta["content"])
                out.append(self._text_event("response.output_text.delta", delta=delta["content"]))
            for call in delta.get("tool_calls") or []:
                out += self._call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def _part(self, kind: str, part: dict) -> str:
        return self.event(kind, item_id=self.message_id, output_index=0, content_index=0, part=part)

    def _text_event(self, kind: str, **fields) -> str:
        return self.event(kind, item_id=self.message_id, output_index=0, content_index=0, logprobs=[], **fields)

    def _call(self, call: dict) -> list[str]:
        index = len(self.items) + (self.message_id is not None)
        item = _call_item(call)
        self.items.append(item)
        arguments = item["arguments"]
        return [
            self.event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            ),
            self.event(
                "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=arguments
            ),
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=arguments,
                name=item["name"],
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def end(self, usage: dict) -> list[str]:
        out, output = [], []
        if self.message_id is not None:
            text = "".join(self.text)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out.append(self._text_event("response.output_text.done", text=text))
            out.append(self._part("response.content_part.done", part))
            item = _message_item(self.message_id, text, "completed")
            out.append(self.event("response.output_item.done", output_index=0, item=item))
            output.append(item)
        cut = self.finish == "length"
        response = {
            **self.shell("incomplete" if cut else "completed"),
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": output + self.items,
            "usage": _usage(usage),
        }
        out.append(self.event("response.incomplete" if cut else "response.completed", response=response))
        return out
