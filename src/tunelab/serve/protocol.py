"""The OpenAI API's request objects, typed, and its response objects, built as OpenAI documents them
(the official `openai` client parses every one: tests/test_serve.py checks that with the client itself).

Unknown request fields are accepted and ignored, as OpenAI-compatible servers do (clients send fields
such as `user` or `presence_penalty` that change nothing here).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Request):
    type: Literal["text"]
    text: str


class Message(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Request):
    include_usage: bool = False


class SamplingRequest(Request):
    """What both completion endpoints share; `to_sampling` makes it the decoder's `infer.decode.Sampling`."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]

    def to_sampling(self, max_tokens: int, top_logprobs: int | None):
        """The decoder's sampling parameters for this request (at most 4 stop sequences, as OpenAI allows)."""
        from tunelab.errors import RequestError
        from tunelab.infer.decode import Sampling

        if len(self.stops()) > 4:
            raise RequestError(400, "stop: at most 4 stop sequences", param="stop")
        return Sampling(max_tokens, self.temperature, self.top_p, self.seed, self.stops(), top_logprobs)


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)


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
