"""OpenAI's Responses API against the official `openai` client: text input and messages with
`instructions` (the same answer as the chat completion they mean), `text.format` through
`responses.parse`, function tools and their outputs sent back, the typed stream of events, and what is
not stored (`previous_response_id`, GET) said as such."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from helpers import HERMES, WEATHER, WeatherArguments, live
from pydantic import BaseModel, Field
from tiny_models import tiny_llama_dir

from tunelab.serve.app import Limits, create_app
from tunelab.serve.store import ModelStore


class City(BaseModel):
    name: Literal["Paris", "Rome", "Oslo"]
    rank: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    folder = tiny_llama_dir(root / "llama", positions=2048, template=HERMES)
    with live(create_app(ModelStore([str(folder)], root / "runs"), limits=Limits(max_tokens=96))) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_a_response_is_the_chat_completion_it_means(client):
    response = client.responses.create(
        model="llama", instructions="Be brief.", input="What is 2 plus 2?", max_output_tokens=12, temperature=0
    )
    chat = client.chat.completions.create(
        model="llama",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}],
        max_tokens=12,
        temperature=0,
    )
    assert response.object == "response" and response.id.startswith("resp")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if cut else "completed")
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "What is 2 plus 2?"}]}]
    again = client.responses.create(
        model="llama", instructions="Be brief.", input=messages, max_output_tokens=12, temperature=0
    )
    assert again.output_text == response.output_text


def test_parse_gets_a_valid_object(client):
    for _ in range(2):
        response = client.responses.parse(
            model="llama", input="A city?", text_format=City, max_output_tokens=64, temperature=1.0
        )
        assert isinstance(response.output_parsed, City)


def test_a_function_call_and_its_output_sent_back(client):
    tool = {"type": "function", **WEATHER["function"]}
    response = client.responses.create(
        model="llama",
        input="The weather in Paris?",
        tools=[tool],
        tool_choice="required",
        max_output_tokens=96,
        temperature=0,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    WeatherArguments.model_validate_json(call.arguments)
    follow = client.responses.create(
        model="llama",
        input=[
            {"role": "user", "content": "The weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature": 21})},
        ],
        tools=[tool],
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,
    )
    assert [item.type for item in follow.output] == [
        "message"
    ] and follow.usage.input_tokens > response.usage.input_tokens


def test_the_stream_is_typed_events_that_join_to_the_whole_response(client):
    kwargs = {"model": "llama", "input": "Tell me a story.", "max_output_tokens": 16, "temperature": 0}
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text


def test_what_is_not_stored_is_said(client):
    with pytest.raises(openai.BadRequestError, match="not stored"):
        client.responses.create(model="llama", input="x", previous_response_id="resp_123")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_123")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="llama", input="x", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools"
