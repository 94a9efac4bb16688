"""The OpenAI protocol beyond plain chat, against the official `openai` client on a live server: completions
prompts as text or token ids (one or a batch), `echo` with the prompt's log-probabilities (checked against
plain transformers), `max_tokens: 0` scoring, the sampling controls (logit_bias, penalties, min_tokens,
top_k, each checked against what it must do to the logits), and a 400 naming every parameter the server
does not do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import openai
import pytest
import torch
from helpers import IdsTokenizer, live
from pydantic import BaseModel, Field
from tiny_models import tiny_llama_dir

from tunelab.serve.app import Limits, create_app
from tunelab.serve.store import ModelStore

TEXT = "the cat sat on the mat and it was good"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("protocol") / "llama")


@pytest.fixture(scope="module")
def client(llama):
    app = create_app(ModelStore([str(llama)], llama.parent / "runs"), limits=Limits(max_tokens=64, max_n=4))
    with live(app) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def plain(llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama).eval(), AutoTokenizer.from_pretrained(llama)


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probabilities of each next token after each position, by plain transformers."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def greedy(client, prompt, max_tokens=8, **extra) -> str:
    return client.completions.create(
        model="llama", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra or None
    ).choices[0]


def test_a_prompt_of_token_ids_answers_as_its_text_does(client, plain):
    _, tokenizer = plain
    ids = tokenizer(TEXT).input_ids
    as_text = greedy(client, TEXT)
    assert greedy(client, ids).text == as_text.text
    batch = client.completions.create(model="llama", prompt=[ids, ids[:4]], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == as_text.text
    assert batch.choices[1].text == greedy(client, ids[:4]).text
    assert batch.usage.prompt_tokens == len(ids) + 4


@pytest.mark.parametrize("chunked", [False, True])
def test_echo_scores_every_prompt_token_as_plain_transformers_does(client, plain, chunked, monkeypatch):
    """The prompt comes back first, each token with its log-probability given those before it (the first's
    null) and the k best there; the generated token follows. `chunked`: the prompt's logits computed 3
    positions at a time, the cache carried between chunks."""
    from tunelab.infer import decode

    model, tokenizer = plain
    if chunked:
        monkeypatch.setattr(decode, "SCORED_LOGITS", 3 * model.config.vocab_size)
    ids = tokenizer(TEXT).input_ids
    reply = client.completions.create(model="llama", prompt=[ids], max_tokens=1, temperature=0, logprobs=3, echo=True)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = plain_logprobs(model, ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-4)
        best = expected[t - 1].topk(3)
        assert sorted(lp.top_logprobs[t].values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    generated = int(expected[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(float(expected[-1, generated]), abs=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))  # greedy: the top one
    assert choice.text == tokenizer.decode(ids) + tokenizer.decode([generated])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_max_tokens_0_with_echo_scores_the_prompt_without_generating(client, plain):
    model, tokenizer = plain
    reply = client.completions.create(model="llama", prompt=TEXT, max_tokens=0, logprobs=0, echo=True)
    choice, ids = reply.choices[0], tokenizer(TEXT).input_ids
    assert choice.text == TEXT and reply.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == len(ids)
    expected = plain_logprobs(model, ids)
    total = sum(float(expected[t - 1, ids[t]]) for t in range(1, len(ids)))
    assert sum(choice.logprobs.token_logprobs[1:]) == pytest.approx(total, abs=1e-3)
    assert all(top == {} for top in choice.logprobs.top_logprobs[1:])
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0 generates nothing"):
        client.completions.create(model="llama", prompt=TEXT, max_tokens=0)


def test_echo_streams_the_prompt_first_and_joins_to_the_whole_answer(client):
    whole = client.completions.create(model="llama", prompt=TEXT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    chunks = list(
        client.completions.create(
            model="llama", prompt=TEXT, max_tokens=6, temperature=0, logprobs=2, echo=True, stream=True
        )
    )
    assert chunks[0].choices[0].text.startswith(TEXT)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    offsets = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset


def test_logit_bias_forces_and_bans_tokens(client, plain):
    _, tokenizer = plain
    token = tokenizer(" cat", add_special_tokens=False).input_ids[-1]
    forced = client.completions.create(
        model="llama", prompt=TEXT, max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    assert tokenizer(forced.choices[0].text, add_special_tokens=False).input_ids == [token] * 4
    first = tokenizer(greedy(client, TEXT, 1).text, add_special_tokens=False).input_ids[0]
    banned = client.completions.create(
        model="llama", prompt=TEXT, max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert banned.choices[0].text != greedy(client, TEXT, 1).text
    with pytest.raises(openai.BadRequestError, match="logit_bias: token id 99999 is outside"):
        client.completions.create(model="llama", prompt=TEXT, max_tokens=1, logit_bias={"99999": 5})


class City(BaseModel):
    name: Literal["Paris", "Rome", "Oslo"]
    rank: int = Field(ge=0, le=9)
    capital: bool


def test_structured_outputs_parse_even_from_a_random_model(client):
    """The grammar allows only what the schema does, so the openai client's `parse` gets a valid object from
    a tiny random model, every seed; vLLM's structured_outputs (regex, choice) on both endpoints."""
    for seed in range(3):
        reply = client.chat.completions.parse(
            model="llama",
            messages=[{"role": "user", "content": "A city?"}],
            response_format=City,
            max_tokens=64,
            seed=seed,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)
        assert City.model_validate_json(choice.message.content) == choice.message.parsed
    regex = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=32,
        seed=1,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-c]{2}"}},
    )
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", regex.choices[0].message.content)
    for seed in range(3):
        picked = client.completions.create(
            model="llama",
            prompt="x",
            max_tokens=8,
            seed=seed,
            extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
        )
        assert picked.choices[0].text in ("yes", "no")


def test_a_constrained_row_beside_free_ones_leaves_them_as_they_are(client):
    """Rows of one batch: the constrained one follows its grammar, the others answer what they answer alone."""
    from concurrent.futures import ThreadPoolExecutor

    def free(_):
        return greedy(client, TEXT, 12).text

    def constrained(_):
        return (
            client.chat.completions.create(
                model="llama",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=64,
                seed=2,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "City", "schema": City.model_json_schema()},
                },
            )
            .choices[0]
            .message.content
        )

    alone = free(0)
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(f, i) for i, f in enumerate([free, constrained, free, constrained])]
        results = [a.result() for a in answers]
    assert results[0] == results[2] == alone
    assert all(City.model_validate_json(r) for r in results[1::2])


def test_penalties_change_the_logits_as_openai_defines_them():
    """frequency and presence (on the answer's tokens), repetition (prompt and answer), min_tokens and top_k,
    on one row's logits."""
    from tunelab.infer.sampling import Sampling, reshaped

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    out = reshaped(logits, Sampling(frequency_penalty=0.5, presence_penalty=0.25), [4], [0, 0, 2], {3})
    assert out.tolist() == pytest.approx([2.0 - 1.0 - 0.25, -1.0, 0.5 - 0.5 - 0.25, 3.0, 1.0])
    out = reshaped(logits, Sampling(repetition_penalty=2.0), [1, 3], [0], set())
    assert out.tolist() == pytest.approx([1.0, -2.0, 0.5, 1.5, 1.0])
    assert reshaped(logits, Sampling(min_tokens=2), [], [0], {3})[3] == -torch.inf
    assert reshaped(logits, Sampling(min_tokens=2), [], [0, 1], {3})[3] == 3.0
    assert torch.isinf(reshaped(logits, Sampling(top_k=2), [], [], set())).tolist() == [False, True, True, False, True]


def test_min_tokens_holds_the_end_back_and_top_k_1_is_greedy(client, plain):
    _, tokenizer = plain
    end = {str(tokenizer.eos_token_id): 100}  # the end token first, unless min_tokens holds it back
    assert greedy(client, TEXT, 16, logit_bias=end).finish_reason == "stop"
    held = client.completions.create(
        model="llama", prompt=TEXT, max_tokens=16, temperature=0, logit_bias=end, extra_body={"min_tokens": 5}
    )
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"  # 5, then the end
    sampled = client.completions.create(
        model="llama", prompt=TEXT, max_tokens=8, temperature=1.5, seed=3, extra_body={"top_k": 1}
    )
    assert sampled.choices[0].text == greedy(client, TEXT).text


def test_what_the_server_does_not_do_is_refused_by_name(client):
    chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (client.chat.completions.create, {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (client.chat.completions.create, {**chat, "response_format": {"type": "xml"}}, "response_format"),
        (
            client.chat.completions.create,
            {
                **chat,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}},
            },
            "response_format",
        ),
        (
            client.completions.create,
            {"model": "llama", "prompt": "x", "extra_body": {"structured_outputs": {}}},
            "structured_outputs",
        ),
        (client.chat.completions.create, {**chat, "tool_choice": "required"}, "tool_choice"),
        (
            client.chat.completions.create,
            {
                **chat,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ],
            },
            "messages[0].content[0]",
        ),
        (client.completions.create, {"model": "llama", "prompt": "x", "suffix": "y"}, "suffix"),
        (client.completions.create, {"model": "llama", "prompt": "x", "best_of": 2}, "best_of"),
        (client.completions.create, {"model": "llama", "prompt": []}, "prompt"),
    ]
    for create, kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            create(**kwargs)
        assert e.value.body["param"] == param, (param, e.value.body)
    # what changes nothing is accepted
    reply = client.chat.completions.create(
        **chat, max_tokens=2, user="u", store=False, metadata={"a": "b"}, response_format={"type": "text"}
    )
    assert reply.choices[0].message.content is not None


def test_scored_prompts_in_chunks_are_right_under_a_sliding_window_and_continue_as_generate(monkeypatch):
    """Two prompts of different lengths scored together (left-padded, 3 positions of each a chunk) by
    Gemma-3, whose window (4) is shorter than both: every prompt token's score equals one plain forward
    pass of that prompt alone, and each answer decoded from the chunked prefill's cache equals `generate`."""
    from tiny_models import tiny_gemma3

    from tunelab.infer import decode
    from tunelab.infer.decode import Batch, Row
    from tunelab.infer.sampling import Sampling

    model = tiny_gemma3(vocab_size=300)
    monkeypatch.setattr(decode, "SCORED_LOGITS", 2 * 3 * 300)

    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (13, 8)]
    batch = Batch(model, 4)
    batch.add(*[Row(i, p, Sampling(6, 0.0, prompt_logprobs=1), IdsTokenizer(), set()) for i, p in enumerate(prompts)])
    steps: dict[int, list] = {0: [], 1: []}
    while batch.rows:
        for row, step in batch.step():
            steps[row.tag].append(step)
    for i, prompt in enumerate(prompts):
        expected, scored = plain_logprobs(model, prompt), steps[i][0].prompt
        assert [s.token for s in scored] == prompt and scored[0].logprob is None
        assert [s.logprob for s in scored[1:]] == pytest.approx(
            [float(expected[t - 1, prompt[t]]) for t in range(1, len(prompt))], abs=1e-4
        )
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
        assert [s.token for s in steps[i] if s.token is not None] == out[0, len(prompt) :].tolist()


class Place(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=100)


@pytest.mark.real
def test_a_real_model_fills_a_schema_with_what_it_knows(tmp_path):
    from tunelab.models import pull

    store = ModelStore([str(pull("smollm2-135m-instruct"))], tmp_path / "runs")
    (model,) = store.served()
    with live(create_app(store)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "Describe Paris."}],
            response_format=Place,
            max_tokens=100,
            temperature=0,
        )
    place = reply.choices[0].message.parsed
    assert reply.choices[0].finish_reason == "stop" and (place.city, place.country) == ("Paris", "France")
