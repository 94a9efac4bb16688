"""OpenAI's inference routes: models, chat completions, completions, responses, embeddings (and /health)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from tunelab.errors import RequestError
from tunelab.serve import protocol
from tunelab.serve.http import openai_errors, parse
from tunelab.serve.responses import ResponsesRequest
from tunelab.serve.serving import Serving

router = APIRouter()


def serving(request: Request) -> Serving:
    return request.app.state.serving


async def body(request: Request, schema):
    return await parse(request, schema, serving(request).limits.max_body_bytes)


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request):
    served = await asyncio.to_thread(serving(request).store.served)
    return {"object": "list", "data": [protocol.model_object(s.id, s.created) for s in served.values()]}


@router.get("/v1/models/{model_id:path}")
@openai_errors
async def get_model(request: Request, model_id: str):
    served = await serving(request).model(model_id)
    return protocol.model_object(served.id, served.created)


@router.post("/v1/chat/completions")
@openai_errors
async def chat_completions(request: Request):
    return await serving(request).chat(request, await body(request, protocol.ChatCompletionRequest))


@router.post("/v1/completions")
@openai_errors
async def completions(request: Request):
    return await serving(request).completions(request, await body(request, protocol.CompletionRequest))


@router.post("/v1/embeddings")
@openai_errors
async def embeddings(request: Request):
    return await serving(request).embeddings(request, await body(request, protocol.EmbeddingRequest))


@router.post("/v1/responses")
@openai_errors
async def responses(request: Request):
    return await serving(request).responses(request, await body(request, ResponsesRequest))


@router.get("/v1/responses/{response_id}")
@openai_errors
async def get_response(request: Request, response_id: str):
    raise RequestError(
        404, "responses are not stored here: each answer comes back whole, or streamed", code="not_found"
    )
