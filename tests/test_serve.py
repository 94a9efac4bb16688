"""`tunelab serve` against the official `openai` client, on a live server on 127.0.0.1 (a free port): a
tiny Llama, two LoRA runs on it and a tiny BERT. What a served answer is (the same as `tunelab generate`
and plain transformers), streaming, stop, n, seeds, usage, log-probabilities, embeddings, adapters sharing
a base, and every error status with the client's typed exception."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import run_cli
from helpers import IdsTokenizer, completion_text, live, wait_until
from tiny_models import DECODER_FAMILIES, tiny_bert_dir, tiny_decoder, tiny_llama_dir

from tunelab.serve.app import Limits, create_app
from tunelab.serve.store import ModelStore

QUESTION = "What is 2 plus 2?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    tiny_llama_dir(root / "llama")
    tiny_bert_dir(root / "bert")
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."} for i in range(48)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, lr in (("adder", "3e-2"), ("other", "1e-1")):
        (root / f"{name}.yaml").write_text(
            f"method: sft\nmodel: {root / 'llama'}\noutput_dir: {root / 'runs' / name}\n"
            f"data: {{train: {root / 'train.jsonl'}, max_length: 64}}\ntuning: {{mode: lora, lora: {{r: 4}}}}\n"
            f"train: {{max_steps: 6, batch_size: 8, lr: {lr}, warmup_ratio: 0, precision: fp32}}\n"
        )
        code, _, err = run_cli("train", str(root / f"{name}.yaml"))
        assert code == 0, err
    return root


@pytest.fixture(scope="module")
def server(workspace):
    store = ModelStore([str(workspace / "llama"), str(workspace / "bert")], workspace / "runs")
    app = create_app(store, limits=Limits(max_body_bytes=64 << 10, max_tokens=64, max_n=4))
    with live(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def plain_greedy(
    folder: Path, messages: list[dict], new_tokens: int, adapter: Path | None = None
) -> tuple[str, int, int]:
    """(the answer, prompt tokens, tokens generated: an end token included) of plain transformers (+ peft)
    greedy generation with the folder's template (the adapter's, for an adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter or folder)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    new = out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len(new)


def test_models_are_listed_and_looked_up(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"llama", "bert", "adder", "other"}
    assert client.models.retrieve("adder").id == "adder"
    for missing in ("nope", "../llama", "runs/adder"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(missing)


def test_a_chat_answer_is_plain_transformers_greedy_answer_with_real_usage(client, workspace):
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="llama", messages=messages, max_tokens=12, temperature=0)
    expected, prompt_tokens, generated = plain_greedy(workspace / "llama", messages, 12)
    choice = reply.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == generated  # every token written, the end token included
    assert choice.finish_reason in ("stop", "length") and (choice.finish_reason == "length") == (generated == 12)
    assert reply.object == "chat.completion" and reply.model == "llama" and reply.id.startswith("chatcmpl-")


def test_a_lora_run_answers_as_plain_peft_and_tunelab_generate_do(client, workspace):
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="adder", messages=messages, max_tokens=10, temperature=0)
    expected, _, _ = plain_greedy(workspace / "llama", messages, 10, adapter=workspace / "runs" / "adder" / "final")
    assert reply.choices[0].message.content.strip() and reply.choices[0].message.content == expected
    code, out, err = run_cli("generate", str(workspace / "runs" / "adder"), QUESTION, "--max-new-tokens", "10")
    assert code == 0, err
    assert out == reply.choices[0].message.content + "\n"


def test_a_bf16_server_answers_as_tunelab_generate_in_bf16(workspace):
    """`--precision` means the same to both: a greedy answer in bf16 is generate's in bf16."""
    store = ModelStore([str(workspace / "runs" / "adder")], precision="bf16")
    with live(create_app(store)) as url:
        reply = openai.OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
            model="adder", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0
        )
    code, out, err = run_cli(
        "generate", str(workspace / "runs" / "adder"), QUESTION, "--max-new-tokens", "10", "--precision", "bf16"
    )
    assert code == 0, err
    assert out == reply.choices[0].message.content + "\n"


def test_a_conversations_beginning_is_computed_once_and_answers_stay_the_same(workspace, monkeypatch):
    """With a prefix cache (the default in bf16; asked for here in fp32, to compare exactly), what a chat
    holds before its last message (here a system prompt) and each whole prompt are kept once computed:
    later requests that begin the same compute only the rest, a conversation's second turn from its first
    turn's prompt, and every answer is the one a server without the cache gives."""
    from transformers import AutoTokenizer

    from tunelab.infer.decode import Batch
    from tunelab.serve.serving import _chat_ids

    reused = []
    after = Batch._prefill_after
    monkeypatch.setattr(
        Batch, "_prefill_after", lambda self, key, rows: reused.append(len(key[1])) or after(self, key, rows)
    )
    system = {"role": "system", "content": "Answer with the sum and nothing else, please. " * 3}

    def conversation(client) -> list[str]:
        def ask(messages):
            reply = client.chat.completions.create(
                model="llama", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5
            )
            choice = reply.choices[0]
            assert choice.logprobs is not None
            scores.append([[t.logprob for t in token.top_logprobs] for token in choice.logprobs.content])
            return choice.message.content

        answers = [ask([system, {"role": "user", "content": f"What is {i} plus {i}?"}]) for i in (1, 2, 3)]
        first = [system, {"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": answers[0]}]
        return [*answers, ask([*first, {"role": "user", "content": "And 4 plus 4?"}])]

    got, scored = {}, {}
    for cache in (0, 1 << 20):
        store, scores = ModelStore([str(workspace / "llama")]), []
        with live(create_app(store, limits=Limits(prefix_cache=cache))) as url:
            got[cache] = conversation(openai.OpenAI(base_url=url, api_key="x", max_retries=0))
        scored[cache] = torch.tensor(scores)
    assert got[1 << 20] == got[0] and all(got[0])
    assert torch.allclose(scored[1 << 20], scored[0], atol=1e-5)  # every token's 5 best log-probabilities
    tokenizer = AutoTokenizer.from_pretrained(workspace / "llama")
    ids, _, (reusable, whole) = _chat_ids(tokenizer, [system, {"role": "user", "content": "What is 1 plus 1?"}])
    assert tokenizer.decode(ids[:reusable]).endswith("user\n") and "plus" not in tokenizer.decode(ids[:reusable])
    assert whole == len(ids)
    assert reused[:2] == [reusable, reusable]  # the second and third questions: the system prompt computed once
    assert reused[2] == len(ids)  # the second turn: after the whole of the first turn's prompt


def test_two_adapters_of_one_base_share_it_and_answer_differently(client, server, workspace):
    def ask(model):
        return (
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=10,
                temperature=0,
            )
            .choices[0]
            .message.content
        )

    adder, other, base = ask("adder"), ask("other"), ask("llama")
    assert len({adder, other, base}) == 3
    assert ask("adder") == adder  # switching adapters back and forth changes nothing
    store = server[1].state.store
    loaded = (
        store.loaded[(workspace / "llama").resolve()]
        if (workspace / "llama").resolve() in store.loaded
        else store.loaded[workspace / "llama"]
    )
    assert loaded.adapters == {"adder", "other"} and len([b for b in store.loaded if "llama" in str(b)]) == 1


def test_streamed_chunks_join_to_the_whole_answer_and_end_with_usage(client):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(model="adder", messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="adder",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_stop_cuts_the_answer_before_the_stop_text(client):
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model="adder", messages=messages, max_tokens=20, temperature=0).choices[0]
    start = len(full.message.content) - len(full.message.content.lstrip()) + 1
    stop = full.message.content[start : start + 3]
    assert len(stop.strip()) == 3
    cut = client.chat.completions.create(
        model="adder", messages=messages, max_tokens=20, temperature=0, stop=[stop]
    ).choices[0]
    assert (
        cut.message.content == full.message.content[: full.message.content.find(stop)] and cut.finish_reason == "stop"
    )


def test_n_choices_and_seeds_repeat(client):
    def ask(seed):
        return client.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            temperature=1.0,
            n=2,
            seed=seed,
        )

    first, again, other = ask(7), ask(7), ask(8)

    def texts(r):
        return [c.message.content for c in r.choices]

    assert [c.index for c in first.choices] == [0, 1] and texts(first) == texts(again)
    assert texts(first)[0] != texts(first)[1] and texts(first) != texts(other)


def test_log_probabilities_of_the_chosen_and_the_best_tokens(client):
    reply = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:  # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs)) and t.logprob <= 0
    assert "".join(t.token for t in content) == reply.choices[0].message.content


def test_completions_continue_raw_text(client, workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reply = client.completions.create(
        model="llama", prompt=["the cat sat on", "it was good"], max_tokens=6, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1] and reply.object == "text_completion"
    tokenizer = AutoTokenizer.from_pretrained(workspace / "llama")
    model = AutoModelForCausalLM.from_pretrained(workspace / "llama").eval()
    ids = tokenizer("the cat sat on", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert reply.choices[0].text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert reply.usage.prompt_tokens == ids.shape[1] + len(tokenizer("it was good").input_ids)


def test_embeddings_are_mean_pooled_and_normalised(client, workspace):
    from transformers import AutoModel, AutoTokenizer

    reply = client.embeddings.create(model="bert", input=["the movie was good", "bad plot"])
    tokenizer = AutoTokenizer.from_pretrained(workspace / "bert")
    model = AutoModel.from_pretrained(workspace / "bert").eval()
    batch = tokenizer(["the movie was good"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state[0].mean(0)
    expected = expected / expected.norm()
    got = torch.tensor(reply.data[0].embedding)
    assert torch.allclose(got, expected, atol=1e-5) and len(reply.data) == 2
    assert reply.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="llama", input="text")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="bert", messages=[{"role": "user", "content": "hi"}])


def test_simultaneous_requests_get_the_answers_they_get_alone(client, server):
    prompts = [f"What is {i} plus {i}?" for i in range(8)]
    alone = [
        client.chat.completions.create(
            model="adder", messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0
        )
        .choices[0]
        .message.content
        for p in prompts
    ]
    results = [None] * 8

    def ask(i):
        results[i] = (
            client.chat.completions.create(
                model="adder", messages=[{"role": "user", "content": prompts[i]}], max_tokens=8, temperature=0
            )
            .choices[0]
            .message.content
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == alone
    assert server[1].state.engine.peak_rows > 1  # they decoded together


def test_errors_are_openais_with_the_clients_typed_exceptions(client, server):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="missing", messages=messages)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama", messages=messages, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="at most 4 choices"):
        client.chat.completions.create(model="llama", messages=messages, n=5)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens; the prompt has"):
        client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "the cat " * 120}], max_tokens=60
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llama", messages=[])
    bad = httpx.post(
        f"{server[0]}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x" * (70 << 10)}])
    assert e.value.status_code == 413
    assert "Traceback" not in bad.text


def test_a_key_protects_the_api_and_is_compared_whole(workspace):
    store = ModelStore([str(workspace / "llama")])
    with live(create_app(store, api_key="s3cret")) as url:
        for key in ("wrong", "s3cre", "s3cret-and-more"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).models.list()] == ["llama"]
        assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_a_full_queue_answers_503(workspace):
    store = ModelStore([str(workspace / "llama")])
    release, loading, load = threading.Event(), threading.Event(), store.load

    def slow_load(served):
        loading.set()
        release.wait(30)
        return load(served)

    store.load = slow_load
    app = create_app(store, limits=Limits(max_queue=1))
    with live(app) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)

        def ask():
            return client.completions.create(model="llama", prompt="hi", max_tokens=2)

        first = threading.Thread(target=ask)
        first.start()  # the worker takes it and waits
        assert loading.wait(30)
        second = threading.Thread(target=ask)
        second.start()  # it waits in the queue, which is then full
        wait_until(lambda: app.state.engine.jobs.full(), 30, "a full queue")
        with pytest.raises(openai.InternalServerError) as e:
            ask()
        assert e.value.status_code == 503
        release.set()
        first.join(30)
        second.join(30)


def test_a_client_that_leaves_mid_stream_stops_its_generation(client, server):
    engine = server[1].state.engine
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": "Go on and on."}],
        "max_tokens": 64,
        "min_tokens": 64,  # sampled, the answer could end by itself (its end token) before the client has left
        "temperature": 1.0,
        "stream": True,
    }
    with httpx.stream("POST", f"{server[0]}/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content": ""' not in line:
                break  # one piece of text, then the client goes away
    deadline = time.time() + 10
    while not any(cancelled for _, _, cancelled in engine.history) and time.time() < deadline:
        time.sleep(0.05)
    model, tokens, cancelled = next(h for h in engine.history if h[2])
    assert model == "llama" and tokens < 64
    reply = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].message.content is not None  # the engine goes on serving


def test_a_client_that_leaves_while_its_long_prompt_is_computed_frees_its_place(workspace, monkeypatch):
    """A stream whose long prompt is still being computed in chunks, closed by its client: its row is
    dropped before it joins (nothing decoded, nothing left prefilling) and the engine goes on serving."""
    from tunelab.infer.decode import Prefill

    advance, chunks = Prefill.advance, []

    def slowly(self, whole=False):  # a chunk that takes 0.2 s: the client leaves while the prompt is computed
        time.sleep(0.2)
        chunks.append((self.computed, len(self.row.prompt_ids)))
        return advance(self)  # in chunks, even with nothing decoding beside it

    monkeypatch.setattr(Prefill, "advance", slowly)
    app = create_app(ModelStore([str(workspace / "llama")]), limits=Limits(max_prefill=4))
    with live(app) as url:
        engine = app.state.engine
        body = {"model": "llama", "prompt": "one two three four five six seven eight nine ten " * 3, "stream": True}
        with httpx.stream("POST", f"{url}/completions", json={**body, "max_tokens": 8}, timeout=30) as response:
            assert response.status_code == 200
            wait_until(lambda: engine.prefilling, 10, "a prompt computed in chunks")
        wait_until(lambda: any(h[2] for h in engine.history), 10, "the job to end cancelled")
        assert engine.history[-1] == ("llama", 0, True) and not engine.prefilling
        computed, length = chunks[-1]
        assert computed + 4 < length  # dropped before its last chunk, not decoded to the end
        reply = openai.OpenAI(base_url=url, api_key="x", max_retries=0).completions.create(
            model="llama", prompt="hi", max_tokens=2
        )
        assert reply.choices[0].text is not None  # the engine goes on serving
        wait_until(lambda: not engine.batches, 10, "no row left in a batch")


def test_serving_beyond_this_machine_needs_a_key(workspace):
    code, _, err = run_cli("serve", str(workspace / "llama"), "--host", "0.0.0.0")
    assert code == 1 and "needs an API key" in err
    code, _, err = run_cli("serve", str(workspace / "llama"), "--max-prefill-tokens", "0")
    assert code == 1 and "--max-prefill-tokens 0: expected a whole number of at least 1" in err
    code, _, err = run_cli("serve", str(workspace / "llama"), "--prefix-cache-mb", "-1")
    assert code == 1 and "--prefix-cache-mb -1: expected a whole number of MB, 0 for none" in err


@pytest.mark.parametrize("room", [64, 1])  # the KV cache's spare room: 1 makes it grow into a new buffer every step
def test_rows_that_join_a_running_batch_decode_as_they_do_alone(workspace, room, monkeypatch):
    """Continuous batching: rows of two adapters and the base, greedy and seeded sampling, prompts of
    different lengths, joining at different steps and leaving as they finish, each write what they write alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.infer.decode import Batch, Row, _roomy_layer_class
    from tunelab.infer.sampling import Sampling

    monkeypatch.setattr(_roomy_layer_class(), "room", room)
    model = AutoModelForCausalLM.from_pretrained(workspace / "llama").eval()
    model = PeftModel.from_pretrained(model, workspace / "runs" / "adder" / "final", adapter_name="adder").eval()
    model.load_adapter(workspace / "runs" / "other" / "final", adapter_name="other")
    tokenizer = AutoTokenizer.from_pretrained(workspace / "runs" / "adder" / "final")
    stop = {tokenizer.eos_token_id}
    rows = [
        (tokenizer(p).input_ids, adapter, params)
        for p, adapter, params in [
            ("What is 1 plus 1?", "adder", Sampling(12, 0.0)),
            ("the cat", None, Sampling(9, 1.0, seed=3)),
            ("What is 20 plus 20? Tell me.", "other", Sampling(7, 0.0)),
            ("it was", "adder", Sampling(12, 0.8, top_p=0.9, seed=5, top_logprobs=2)),
            ("the movie was very nice but the plot", None, Sampling(5, 0.0, stop=["a"])),
        ]
    ]

    def run(batch: Batch, joins: dict[int, list[int]]) -> dict[int, list]:
        out, step = {}, 0
        while step in joins or batch.rows or any(k > step for k in joins):
            joining = [Row(i, rows[i][0], rows[i][2], tokenizer, stop, rows[i][1]) for i in joins.get(step, [])]
            if joining:
                batch.add(*joining)  # prefilled together
            for row, s in batch.step():
                out.setdefault(row.tag, []).append((s.text, s.token, s.finish_reason, s.logprob))
            step += 1
        return out

    alone = {}
    for i in range(len(rows)):
        alone.update(run(Batch(model, 1), {0: [i]}))
    together = run(Batch(model, 8), {0: [0, 1], 2: [2], 3: [3, 4]})
    assert together.keys() == alone.keys() == set(range(len(rows)))
    for i in range(len(rows)):
        assert [s[:3] for s in together[i]] == [s[:3] for s in alone[i]], i
        assert [s[3] for s in together[i]] == pytest.approx([s[3] for s in alone[i]], abs=1e-4)


def generated_alone(model, prompt: list[int], tokens: int) -> list[int]:
    """transformers' greedy `generate` of one prompt alone: exactly `tokens` new token ids."""
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("shared", [0, 7])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_family_batches_and_answers_as_alone(family, shared):
    """Each decoder family in a left-padded batch that rows join and leave: each row's greedy tokens equal
    transformers' `generate` alone (fp32). Mistral's, Gemma-2's, Gemma-3's and Phi-3's sliding windows (4)
    are shorter than every answer, so the window is what the attention mask must draw right; Gemma-2's
    soft-capped attention runs eager. With `shared`, the prompts begin with the same 7 tokens, computed
    once in a prefix cache (longer than the window: the rest of each prompt must see the prefix at its
    true distance)."""
    from tunelab.infer.decode import Batch, PrefixCache, Row
    from tunelab.infer.sampling import Sampling

    model = tiny_decoder(family, 300)

    common = torch.randint(3, 300, (shared,)).tolist()
    prompts = [common + torch.randint(3, 300, (n,)).tolist() for n in (3, 9, 5, 14, 2)]
    alone = [generated_alone(model, p, 12) for p in prompts]
    prefixes = PrefixCache() if shared else None
    batch, together, step, joins = Batch(model, 8, prefixes), {}, 0, {0: [0, 1], 3: [2], 5: [3, 4]}
    head_rows = []  # logits the output layer computes per prefill: one a row, even where prompts end apart
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: head_rows.append(out.shape[:-1].numel()))
    while step <= max(joins) or batch.rows:
        if step in joins:
            head_rows.clear()
            batch.add(
                *[Row(i, prompts[i], Sampling(12, 0.0), IdsTokenizer(), set(), prefix=shared) for i in joins[step]]
            )
            assert max(head_rows) <= len(joins[step])  # (never 2 x 2 logits for two rests that end apart)
        for row, s in batch.step():
            if s.token is not None:
                together.setdefault(row.tag, []).append(s.token)
        step += 1
    assert [together[i] for i in range(len(prompts))] == alone
    assert len({tuple(a) for a in alone}) >= 4  # rows that write different answers: a mix-up would show
    if shared:  # computed once, at the first join; found by the two joins after it
        assert (prefixes.misses, prefixes.hits) == (1, 2)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_a_long_prompt_computed_in_chunks_between_decode_steps_answers_as_alone(family):
    """Chunked prefill: a 23-token prompt computed 5 tokens at a time while two rows go on decoding (a decode
    step between two chunks), then joining them, writes `generate`'s answer, and so do the rows beside it.
    The sliding windows (4) are shorter than a chunk: each chunk must see the ones before at their true
    distances."""
    from tunelab.infer.decode import Batch, Prefill, Row
    from tunelab.infer.sampling import Sampling

    model = tiny_decoder(family, 300)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (4, 7, 23)]
    alone = [generated_alone(model, p, 12) for p in prompts]
    passes = []  # (rows, positions) of each forward pass
    model.register_forward_pre_hook(lambda m, a, kw: passes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    batch, together = Batch(model, 8), {}
    batch.add(*[Row(i, prompts[i], Sampling(12, 0.0), IdsTokenizer(), set()) for i in (0, 1)])
    prefill = Prefill(batch, Row(2, prompts[2], Sampling(12, 0.0), IdsTokenizer(), set()), 5)
    joined = False
    while batch.rows:
        joined = joined or prefill.advance()
        for row, s in batch.step():
            if s.token is not None:
                together.setdefault(row.tag, []).append(s.token)
    assert [together[i] for i in range(3)] == alone
    # the prompt in chunks of 5 (the last 3), each followed by the two rows' decode step
    assert passes[1:9] == [(1, 5), (2, 1)] * 4 and passes[9] == (1, 3) and passes[10] == (3, 1)


def test_a_server_computes_a_long_prompt_in_chunks_and_answers_as_alone(workspace, monkeypatch):
    """Through the server, with `--max-prefill-tokens 4`: a long prompt arriving while a short one decodes
    is computed in chunks between its decode steps, alone in one pass; both answer as a server that computes
    prompts whole answers each alone."""
    from tunelab.infer.decode import Batch, Prefill

    chunks, advance, step = [], Prefill.advance, Batch.advance

    def recorded(self, whole=False):
        chunks.append((self.computed, whole))
        return advance(self, whole)

    monkeypatch.setattr(Prefill, "advance", recorded)
    monkeypatch.setattr(Batch, "advance", lambda self, riding=(): time.sleep(0.02) or step(self, riding))  # decoding
    prompts = ("it was", "What is 20 plus 20? Tell me the answer, and nothing else, please.")

    def ask(url: str, prompt: str, started: threading.Event | None = None) -> str:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(model="adder", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return completion_text(stream, started)

    with live(create_app(ModelStore([str(workspace / "runs" / "adder")]))) as url:
        alone = [ask(url, p) for p in prompts]
    assert not chunks and all(alone)
    app = create_app(ModelStore([str(workspace / "runs" / "adder")]), limits=Limits(max_prefill=4))
    with live(app) as url:
        assert ask(url, prompts[1]) == alone[1] and chunks == [(0, True)]  # nothing decoding: one pass
        chunks.clear()
        results: list = [None, None]
        decoding = threading.Event()
        short = threading.Thread(target=lambda: results.__setitem__(0, ask(url, prompts[0], decoding)))
        short.start()
        assert decoding.wait(30)
        results[1] = ask(url, prompts[1])
        short.join(60)
        assert not app.state.engine.prefilling  # every chunked prompt joined its batch
    assert results == alone
    assert chunks[:2] == [(0, False), (4, False)]  # 4 tokens at a time beside the decoding row
