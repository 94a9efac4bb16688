"""The OpenAI protocol beyond plain chat, against the official `openai` client on a live server: completions
prompts as text or token ids (one or a batch), `echo` with the prompt's log-probabilities (checked against
plain transformers), `max_tokens: 0` scoring, the sampling controls (logit_bias, penalties, min_tokens,
top_k, each checked against what it must do to the logits), and a 400 naming every parameter the server
does not do."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
from helpers import live
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
        (client.chat.completions.create, {**chat, "response_format": {"type": "json_object"}}, "response_format"),
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


def test_a_scored_prompt_in_chunks_is_right_under_a_sliding_window_and_continues_as_generate(monkeypatch):
    """Gemma-3's window (4) is shorter than the 3-position chunks' prompt: every prompt token's score equals
    one plain forward pass, and the answer decoded from the chunked prefill's cache equals `generate`."""
    from tiny_models import tiny_gemma3

    from tunelab.infer import decode
    from tunelab.infer.decode import Batch, Row
    from tunelab.infer.sampling import Sampling

    model = tiny_gemma3(vocab_size=300)
    monkeypatch.setattr(decode, "SCORED_LOGITS", 3 * 300)

    class Ids:  # a tokenizer whose text is the token ids
        eos_token_id = 1

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    prompt = torch.randint(3, 300, (13,)).tolist()
    batch = Batch(model, 4)
    row = Row("a", prompt, Sampling(6, 0.0, prompt_logprobs=1), Ids(), set())
    batch.add(row)
    steps = []
    while batch.rows:
        steps += [s for _, s in batch.step()]
    expected = plain_logprobs(model, prompt)
    scored = steps[0].prompt
    assert [s.token for s in scored] == prompt and scored[0].logprob is None
    assert [s.logprob for s in scored[1:]] == pytest.approx(
        [float(expected[t - 1, prompt[t]]) for t in range(1, 13)], abs=1e-4
    )
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False
    )
    assert [s.token for s in steps if s.token is not None] == out[0, 13:].tolist()
