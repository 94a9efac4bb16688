"""The OpenAI API's request objects, typed, and its response objects, built as OpenAI documents them
(the official `openai` client parses every one: tests/test_serve.py checks that with the client itself).

Every field OpenAI (or vLLM, for its extras) defines either works or is refused with a 400 naming it
(`refused()`): nothing that would change the answer is silently ignored. Fields that change nothing here
(`user`, `store`, `metadata`, `service_tier`, ...) and unknown ones are accepted, as OpenAI-compatible
servers do. docs/serving.md has the table.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(Request):
    type: str
    text: str | None = None


class Message(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def rendered(self) -> dict:
        """The message as chat templates take it (developer is system; tool calls and results kept)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class StreamOptions(Request):
    include_usage: bool = False


class SamplingRequest(Request):
    """What both completion endpoints share; `to_sampling` makes it the decoder's `infer.sampling.Sampling`."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # vLLM's extras (its SamplingParams)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    top_k: int = Field(-1, ge=-1)  # -1 or 0: every token
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs {json | regex | choice | grammar}
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]

    def to_sampling(self, max_tokens: int, top_logprobs: int | None, prompt_logprobs: int | None = None):
        """The decoder's sampling parameters for this request (at most 4 stop sequences, as OpenAI allows)."""
        from tunelab.errors import RequestError
        from tunelab.infer.sampling import Sampling

        if len(self.stops()) > 4:
            raise RequestError(400, "stop: at most 4 stop sequences", param="stop")
        return Sampling(
            max_tokens,
            self.temperature,
            self.top_p,
            self.seed,
            self.stops(),
            top_logprobs,
            prompt_logprobs,
            top_k=max(self.top_k, 0),
            min_tokens=self.min_tokens,
            logit_bias=self._bias(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
        )

    def _bias(self) -> dict[int, float]:
        from tunelab.errors import RequestError

        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise RequestError(400, f"logit_bias: keys are token ids, got {key!r}", param="logit_bias")
            if not -100 <= value <= 100:
                raise RequestError(
                    400, f"logit_bias: {key}: a bias is from -100 to 100, got {value}", param="logit_bias"
                )
            bias[int(key)] = value
        return bias

    def constraint(self):
        """What the answer must match (`infer.constrain.Constraint`), or None; a 400 for a format it cannot be."""
        import json

        from tunelab.errors import RequestError
        from tunelab.infer.constrain import Constraint

        if self.response_format is not None and self.structured_outputs is not None:
            raise RequestError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        if self.structured_outputs is not None:
            given = {k: v for k, v in self.structured_outputs.items() if k in ("json", "regex", "choice", "grammar")}
            if len(given) != 1:
                raise RequestError(
                    400, "structured_outputs: give one of json, regex, choice, grammar", param="structured_outputs"
                )
            ((kind, value),) = given.items()
            param = "structured_outputs"
            if kind == "json":
                return Constraint("json_schema", value if isinstance(value, str) else json.dumps(value), param)
            if kind == "choice":
                return Constraint("choice", json.dumps([str(c) for c in value]), param)
            return Constraint("regex" if kind == "regex" else "grammar", str(value), param)
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return Constraint("json_object")
        if kind == "json_schema":
            schema = (self.response_format or {}).get("json_schema", {}).get("schema")
            return Constraint("json_schema", json.dumps(schema)) if schema else Constraint("json_object")
        raise RequestError(
            400, f"response_format: type {kind!r}: give text, json_object or json_schema", param="response_format"
        )

    def refused(self) -> list[tuple[str, str]]:
        """(parameter, why) for what this request asks and the server does not do."""
        return []


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # not done here: refused by name
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    def refused(self) -> list[tuple[str, str]]:
        out = []
        for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
            if getattr(self, name):
                out.append((name, "not supported by this server" + (" (give tools)" if "func" in name else "")))
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            out.append(("tool_choice", "names a tool choice, and the request gives no tools"))
        if self.modalities and set(self.modalities) != {"text"}:
            out.append(("modalities", "this server writes text only"))
        for i, m in enumerate(self.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                if part.type != "text" or part.text is None:
                    out.append((f"messages[{i}].content[{j}]", f"{part.type} parts are not supported (text only)"))
        return out


class CompletionRequest(SamplingRequest):
    """OpenAI's (legacy) completions, as evaluation harnesses use it: the prompt as text or token ids (one or
    a batch), `echo` to get the prompt back with its tokens' log-probabilities, `max_tokens: 0` to only score it."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI allows 5, vLLM 20
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]  # one prompt of token ids
        return list(p)  # type: ignore[arg-type]  # texts, or lists of token ids

    def refused(self) -> list[tuple[str, str]]:
        out = []
        if self.suffix:
            out.append(("suffix", "insertion (a suffix after the completion) is not supported"))
        if self.best_of is not None and self.best_of > 1:
            out.append(("best_of", "not supported: ask for n choices and pick among them"))
        if self.max_tokens == 0 and not self.echo:
            out.append(("max_tokens", "0 generates nothing; with echo: true it scores the prompt"))
        return out


class EmbeddingRequest(Request):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


# --- responses ----------------------------------------------------------------------------------------


def model_object(model_id: str, created: int, owned_by: str = "tunelab") -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
