"""What every route shares: a request body read as a schema, and errors as OpenAI's error objects with the
status the official client maps to its typed exceptions."""

from __future__ import annotations

import functools
import json

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tunelab.errors import RequestError
from tunelab.serve import protocol


def openai_errors(route):
    """A route whose RequestError (raised anywhere in it) becomes OpenAI's error object with its status."""

    @functools.wraps(route)
    async def answered(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except RequestError as e:
            return error(e)

    return answered


def error(e: RequestError) -> JSONResponse:
    return JSONResponse(protocol.error_body(e.message, e.kind, e.param, e.code), status_code=e.status)


def too_large(max_bytes: int) -> RequestError:
    return RequestError(
        413, f"the request body is over the server's limit of {max_bytes:,} bytes", code="request_too_large"
    )


async def parse(request: Request, schema, max_bytes: int):
    """The JSON body as `schema`: 400 naming the first bad field (and up to five problems), 413 past `max_bytes`."""
    body = await request.body()
    if len(body) > max_bytes:
        raise too_large(max_bytes)
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise RequestError(400, message, param=param) from None
