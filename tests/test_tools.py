"""Tool calling against the official `openai` client: a tiny Llama whose chat template takes tools (Hermes /
Qwen's `<tool_call>` format, as Qwen2.5 writes it), a call forced by name or `required` (the grammar makes
even a random model's arguments valid), the tool's result sent back for the final answer, streamed deltas
that join to the same call; the parsers of the families' formats; a 400 for a template without tools."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from helpers import HERMES, TIME, WEATHER, WeatherArguments, live
from pydantic import BaseModel, Field
from tiny_models import tiny_llama_dir

from tunelab.infer.tool_calls import Hermes, Llama3, Mistral
from tunelab.serve.app import Limits, create_app
from tunelab.serve.store import ModelStore

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class TimeArguments(BaseModel):
    hour: int | None = Field(None, ge=0, le=23)


ARGUMENTS = {"get_weather": WeatherArguments, "get_time": TimeArguments}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    return tiny_llama_dir(root / "hermes", positions=2048, template=HERMES), tiny_llama_dir(root / "plain")


@pytest.fixture(scope="module")
def client(folders):
    store = ModelStore([str(f) for f in folders], folders[0].parent / "runs")
    with live(create_app(store, limits=Limits(max_tokens=96))) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_a_named_function_is_called_and_its_result_answered(client, folders):
    from transformers import AutoTokenizer

    reply = client.chat.completions.create(
        model="hermes",
        messages=QUESTION,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=96,
        seed=1,
    )
    message, choice = reply.choices[0].message, reply.choices[0]
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call")
    WeatherArguments.model_validate_json(call.function.arguments)
    assert message.content is None and choice.finish_reason == "stop"  # OpenAI's, for a named function
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    final = client.chat.completions.create(
        model="hermes", messages=conversation, tools=[WEATHER, TIME], tool_choice="none", max_tokens=8, temperature=0
    )
    assert final.choices[0].message.tool_calls is None and isinstance(final.choices[0].message.content, str)
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    for m in conversation[1]["tool_calls"]:  # the template reads the arguments as a mapping
        m["function"]["arguments"] = json.loads(m["function"]["arguments"])
    shown = tokenizer.apply_chat_template(
        conversation, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False
    )
    assert '<tool_response>\n{"temperature": 21}' in shown and '"name": "get_weather", "arguments": {' in shown
    assert final.usage.prompt_tokens == len(tokenizer(shown, add_special_tokens=False).input_ids)


def test_required_calls_are_valid_and_stream_as_deltas_that_join_to_the_same_calls(client):
    kwargs = {
        "model": "hermes",
        "messages": QUESTION,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "max_tokens": 96,
        "temperature": 0,
    }
    reply = client.chat.completions.create(**kwargs, parallel_tool_calls=False)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)
    chunks = list(client.chat.completions.create(**kwargs, parallel_tool_calls=False, stream=True))
    deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert {d.index for d in deltas} == {0} and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(d.function.name or "" for d in deltas) == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_auto_lets_the_model_answer_in_text(client):
    reply = client.chat.completions.create(
        model="hermes", messages=QUESTION, tools=[WEATHER], max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content


def test_a_template_without_tools_is_a_400_naming_tools(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="plain", messages=QUESTION, tools=[WEATHER], max_tokens=4)
    assert e.value.body["param"] == "tools" and "does not take tools" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="hermes",
            messages=QUESTION,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "x"}},
        )
    assert e.value.body["param"] == "tool_choice"


def test_each_familys_calls_are_parsed_from_its_own_format():
    args = {"city": "Paris", "unit": "celsius"}
    hermes = f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n</tool_call>'
    content, calls = Hermes().parse(hermes)
    assert content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
    content, calls = Llama3().parse(f'<|python_tag|>{{"name": "get_weather", "parameters": {json.dumps(args)}}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
    content, calls = Mistral().parse(f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {json.dumps(args)}}}]')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
    content, calls = Mistral().parse(f"[TOOL_CALLS]get_weather[ARGS]{json.dumps(args)}")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", args)]
    assert Hermes().parse("no call here") == ("no call here", [])
    assert Llama3().parse("The weather is fine.") == ("The weather is fine.", [])


def test_an_openai_agents_agent_calls_its_tool_and_answers(client, folders):
    """OpenAI's Agents SDK (openai-agents), chosen because it is OpenAI's own agent framework and speaks
    chat completions to any base URL: an agent with one Python function tool, forced to call it first
    (the SDK resets the choice after a call, so the second turn answers in text), against `tunelab serve`."""
    import asyncio

    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    asked = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"{city}: 21 degrees and sunny"

    model = OpenAIChatCompletionsModel(
        model="hermes", openai_client=AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0)
    )
    agent = Agent(
        name="weather",
        instructions="Answer with the weather.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(tool_choice="required", max_tokens=96, temperature=0),
    )
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert asked and asked[0] in ("Paris", "Rome")
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert isinstance(result.final_output, str)


def test_auto_streams_the_text_before_a_call_and_holds_what_may_begin_one():
    from tunelab.serve.tools import ToolUse

    use = ToolUse.of([WEATHER], "auto", None)
    use.check(HERMES)
    assert use.releasable("Let me look") == len("Let me look")
    assert use.releasable("Let me look <tool") == len("Let me look ")  # may begin <tool_call>
    assert use.releasable('Sure. <tool_call>\n{"name"') == len("Sure. ")
    forced = ToolUse.of([WEATHER], "required", None)
    forced.check(HERMES)
    assert forced.releasable("[{") == 0
    none = ToolUse.of([WEATHER], "none", None)
    none.check(HERMES)
    assert none.releasable("<tool_call>") == len("<tool_call>")


def test_streamed_text_with_tools_joins_to_the_whole_answer(client):
    kwargs = {"model": "hermes", "messages": QUESTION, "tools": [WEATHER], "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.message.content and whole.message.tool_calls is None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # it streamed, not all at the end
