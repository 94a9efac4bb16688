"""Written-out decode steps (`infer.steps`; `tunelab serve` in bf16, and `--quantize int8`): unquantized, the same steps
compute transformers' logits for every family they cover, in a batch that rows join and leave; quantized,
they stay close; rows with a LoRA adapter and families they do not cover decode through the model; a live
server under `--quantize int8` answers the official `openai` client with them."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import torch
from helpers import IdsTokenizer, completion_text, live
from tiny_models import tiny_decoder, tiny_decoder_dir

from tunelab.infer.decode import Batch, Row
from tunelab.infer.sampling import Sampling
from tunelab.infer.steps import FAMILIES, NARROW, Decoder, unsupported

COVERED = ("llama", "llama3", "qwen2", "qwen3", "mistral")  # llama3: RoPE scaling; mistral: a window of 4


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (3, 9, 5, 14, 2)]


def lockstep(model, decoder, rows, joins=None, adapters=None):
    """Two batches, one decoding through the model and one through `decoder`, rows joining at the same steps;
    yields (step, [(row through the model, row through the decoder)]) after each step."""
    joins = joins or {0: [0, 1], 3: [2], 5: [3, 4]}
    adapters = adapters or [None] * len(rows)
    plain, fast, step = Batch(model, 8), Batch(model, 8, decoder=decoder), 0
    while step <= max(joins) or plain.rows:
        for batch in (plain, fast):
            if step in joins:
                batch.add(
                    *[Row(i, rows[i], Sampling(12, 0.0), IdsTokenizer(), set(), adapters[i]) for i in joins[step]]
                )
            batch.step()
        assert [r.tag for r in plain.rows] == [r.tag for r in fast.rows]
        yield step, list(zip(plain.rows, fast.rows))
        step += 1


@pytest.mark.parametrize("family", COVERED)
def test_unquantized_steps_compute_transformers_logits(family):
    """Every decode step's logits equal transformers' forward (fp32, to rounding) for each row of a batch
    that rows join and leave, left-padded; Mistral's window (4) is shorter than the answers."""
    model = tiny_decoder(family, 300)
    compared = 0
    for _, pairs in lockstep(model, Decoder(model, quantize=False), prompts()):
        for plain, fast in pairs:
            assert fast.tokens == plain.tokens
            torch.testing.assert_close(fast.logits, plain.logits, rtol=1e-4, atol=1e-4)
            compared += 1
    assert compared >= 40


@pytest.mark.parametrize("family", COVERED)
def test_unquantized_steps_in_bf16_stay_close_to_transformers(family):
    """A bf16 model's own weights (what `tunelab serve` runs in bf16): each decode step's logits within bf16's
    rounding of transformers' bf16 forward for each row of a batch that rows join and leave (all fed the
    same tokens: the forward's choices), and closer to the fp32 model's than that forward is, on the whole
    (the residual stream stays in fp32 here, transformers rounds it to bf16 after every layer)."""
    model = tiny_decoder(family, 300).to(torch.bfloat16)
    exact = tiny_decoder(family, 300)  # the same weights in fp32
    decoder = Decoder(model, quantize=False)
    assert decoder.layers[0].qkv.weight.dtype == torch.bfloat16 and decoder.layers[0].qkv.packed is None
    ours, theirs, compared = 0.0, 0.0, 0
    plain, fast, reference = Batch(model, 8), Batch(model, 8, decoder=decoder), Batch(exact, 8)
    rows, joins = prompts(), {0: [0, 1], 3: [2], 5: [3, 4]}
    for step in range(20):
        for batch in (plain, fast, reference):
            if step in joins:
                batch.add(*[Row(i, rows[i], Sampling(12), IdsTokenizer(), set()) for i in joins[step]])
        for p, f, r in zip(plain.rows, fast.rows, reference.rows):
            assert p.tag == f.tag == r.tag
            error = float((f.logits - p.logits).norm() / p.logits.norm())
            assert error < 0.03, (step, error)
            ours += float((f.logits - r.logits).norm())
            theirs += float((p.logits - r.logits).norm())
            compared += 1
        chosen = [int(row.logits.argmax()) for row in plain.rows]  # every batch is fed the forward's choices
        for batch in (plain, fast, reference):
            for row, token in zip(batch.rows, chosen):
                row.tokens.append(token)
                row.done = len(row.tokens) == 12
            batch.advance()
    assert compared >= 40 and ours < theirs, (ours, theirs)


def test_unquantized_steps_share_the_models_weights():
    """q/k/v and gate/up fused for the steps without a copy: the model's projections become views of the
    fused matrices, and its own forward computes what it computed before."""
    model = tiny_decoder("qwen2", 300).to(torch.bfloat16)  # Qwen2: q/k/v biases, fused too
    ids = torch.tensor([prompts()[3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    decoder = Decoder(model, quantize=False)
    attention, layer = model.model.layers[1].self_attn, decoder.layers[1]
    fused = layer.qkv.weight.untyped_storage().data_ptr()
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert projection.weight.untyped_storage().data_ptr() == fused
        assert projection.bias.untyped_storage().data_ptr() == layer.qkv.bias.untyped_storage().data_ptr()
    assert model.model.layers[1].mlp.up_proj.weight.untyped_storage().data_ptr() == (
        layer.gate_up.weight.untyped_storage().data_ptr()
    )
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def decode_with_prompts(model, decoder, rows: list[Row], join: list[int], ride: bool, budget: int = 6):
    """Decode `rows` on one batch, rows[0] joining first and each of the others (a `Prefill` of 4 tokens a
    chunk) at step `join[i]`, the oldest prompt a chunk a step: riding the decode steps (`ride`, at most
    `budget` prompt tokens a step) or in passes of their own between them; yields the batch before and after
    each step."""
    from tunelab.infer.decode import Prefill

    batch, prefills, step = Batch(model, 8, decoder=decoder), [], 0
    batch.add(rows[0])
    while batch.rows or prefills or step <= max(join):
        prefills += [Prefill(batch, row, 4) for row, at in zip(rows[1:], join) if at == step]
        if prefills and (not ride or not batch.rows):
            prefills[0].advance(whole=not batch.rows)
        prefills = [p for p in prefills if not p.joined]
        yield batch
        batch.choose()
        riding, left = [], budget
        for prefill in prefills if ride else []:
            if left:
                riding.append((prefill, min(prefill.left, left)))
                left -= riding[-1][1]
        batch.advance(riding)
        prefills = [p for p in prefills if not p.joined]
        yield batch
        step += 1


@pytest.mark.parametrize("family", COVERED)
def test_prompts_riding_the_steps_compute_what_passes_of_their_own_compute(family):
    """Chunked prefill inside the decode step: prompts of 23 and 9 tokens arriving while a row decodes ride its
    steps (6 prompt tokens a step, the older first, each carrying its own cache; Mistral's window of 4 is
    shorter than a chunk), and every row's logits at every position equal those of the same prompts computed
    in passes of their own through transformers' forward (fp32, to rounding): the same answers."""
    model = tiny_decoder(family, 300)
    decoder = Decoder(model, quantize=False)
    assert decoder.fuses and not Decoder(model).fuses  # int8 steps take no prompts
    generator = torch.Generator().manual_seed(3)
    texts = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 23, 9)]

    def decoded(ride: bool):
        rows = [Row(i, p, Sampling(16, 0.0), IdsTokenizer(), set()) for i, p in enumerate(texts)]
        logits = {}
        for batch in decode_with_prompts(model, decoder, rows, [2, 3], ride):
            logits.update({(row.tag, len(row.tokens)): row.logits for row in batch.rows if row.logits is not None})
        return [row.tokens for row in rows], logits

    apart, logits = decoded(ride=False)
    sizes, step = [], decoder.step

    def recorded(ids, positions, cache, mask, chunks=()):
        sizes.append([len(c.ids) for c in chunks])
        return step(ids, positions, cache, mask, chunks)

    decoder.step = recorded
    together, riding = decoded(ride=True)
    assert together == apart and all(len(tokens) == 16 for tokens in together)
    assert [s for s in sizes if s] == [[6], [6], [6], [5, 1], [6], [2]]  # the 23 tokens, then the 9
    assert logits.keys() == riding.keys() and len(logits) == 48  # 16 positions of 3 rows
    for key, expected in logits.items():
        torch.testing.assert_close(riding[key], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_steps_stay_close_to_the_model(family, rows):
    """int8 weights move a step's logits by about 1% (up to 4 rows, weight-only: the activations in bf16), int8
    activations beside them (5 rows) by up to 2% here: a random model's near-flat logits are the hard case
    (a real model's greedy agreement and perplexity are measured in docs/serving.md)."""
    model = tiny_decoder(family, 300)
    errors = []
    decoder = Decoder(model)
    for step, pairs in lockstep(model, decoder, prompts()[:rows], {0: list(range(rows))}):
        if step == 0:  # the same tokens fed to both: the first decode step after the prefill
            for plain, fast in pairs:
                errors.append(float((fast.logits - plain.logits).norm() / plain.logits.norm()))
    assert len(errors) == rows and max(errors) < (0.015 if rows <= NARROW else 0.03), errors
    assert all(layer.qkv.packed is not None for layer in decoder.layers) and decoder.head.packed is not None


def test_rows_with_an_adapter_decode_through_the_model():
    """A LoRA adapter's rows take the model's forward (peft applies the adapter), the base's rows beside
    them the decoder's steps; each row's tokens are its own alone."""
    from peft import LoraConfig, get_peft_model

    base = tiny_decoder("llama", 300)
    decoder = Decoder(base, quantize=False)
    torch.manual_seed(1)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False), "tuned"
    ).eval()
    assert "not a LoRA adapter's" in unsupported(model)  # a decoder of its own would drop the adapter
    rows, adapters = prompts(2), ["tuned", None, "tuned", None, None]
    last = {}
    for _, pairs in lockstep(model, decoder, rows, adapters=adapters):
        for plain, fast in pairs:
            assert fast.tokens == plain.tokens
            torch.testing.assert_close(fast.logits, plain.logits, rtol=1e-4, atol=1e-4)
            last[plain.tag] = plain.tokens
    with model.disable_adapter():  # the adapter changes the answers: the rows did not all take the base
        alone, row = Batch(model, 1), Row(0, rows[0], Sampling(12, 0.0), IdsTokenizer(), set())
        alone.adapters = False
        alone.add(row)
        while alone.rows:
            alone.step()
    assert len(last) == 5 and last[0] != row.tokens


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_families_not_covered_say_so(family):
    model = tiny_decoder(family, 300)
    reason = unsupported(model)
    assert reason and model.config.model_type in reason and all(f in reason for f in FAMILIES)
    with pytest.raises(ValueError, match="Llama family"):
        Decoder(model)


@pytest.mark.parametrize("quantize, precision", [("int8", "fp32"), ("none", "bf16"), ("none", "fp32")])
def test_a_server_decodes_through_the_steps_where_the_family_allows(tmp_path, capfd, quantize, precision):
    """`--quantize int8`: a Llama answers through int8 steps (each token's log-probability is the int8 steps',
    not the model's), a Gemma-3 beside it through its own forward, and the log says why. In bf16 the Llama
    answers through the steps with its own bf16 weights; in fp32 through its own forward (exactly `tunelab
    generate`'s answers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.serve.app import create_app
    from tunelab.serve.store import ModelStore

    for family in ("llama", "gemma3"):
        tiny_decoder_dir(tmp_path / family, family)
    store = ModelStore([str(tmp_path / "llama"), str(tmp_path / "gemma3")], precision=precision, quantize=quantize)
    messages = [{"role": "user", "content": "What is 2 plus 2?"}]
    with live(create_app(store)) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        answers = {
            family: client.chat.completions.create(
                model=family, messages=messages, max_tokens=10, temperature=0, logprobs=True
            )
            for family in ("llama", "gemma3")
        }
    loaded = {path.name: loaded for path, loaded in store.loaded.items()}
    stepped = quantize == "int8" or precision == "bf16"
    assert isinstance(loaded["llama"].decoder, Decoder) == stepped and loaded["gemma3"].decoder is None
    if stepped:
        assert (loaded["llama"].decoder.head.packed is not None) == (quantize == "int8")
    log = capfd.readouterr().out
    assert ("gemma3: int8 decoding covers the Llama family" in log) == (quantize == "int8")
    assert ("decode steps written out" in log) == stepped

    def decoded(model, tokenizer, decoder):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        batch = Batch(model, 1, decoder=decoder)
        batch.add(Row(0, ids, Sampling(10, 0.0, top_logprobs=0), tokenizer, {tokenizer.eos_token_id}))
        steps = []
        while batch.rows:
            steps += [s for _, s in batch.step() if s.token is not None]
        return "".join(s.text for s in steps), [s.logprob for s in steps]

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for family, reply in answers.items():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / family)
        served = [t.logprob for t in reply.choices[0].logprobs.content]
        own = decoded(model, tokenizer, None)[1]  # before the steps make its projections views: the same values
        steps = Decoder(model, quantize == "int8") if family == "llama" and stepped else None
        text, logprobs = decoded(model, tokenizer, steps)
        assert reply.choices[0].message.content == text and served == pytest.approx(logprobs, abs=1e-5), family
        if steps is not None:  # not the model's own forward's
            assert served != pytest.approx(own, abs=1e-5)


@pytest.mark.real
@pytest.mark.parametrize("quantize", [True, False])
def test_smollm2_through_the_steps_keeps_its_answers_and_perplexity(quantize):
    """The real SmolLM2-135M-Instruct: its greedy answer through int8 steps (through its own bf16 weights,
    what `tunelab serve` runs in bf16) still names Paris, and a paragraph fed token by token through them
    costs at most 5% (1%) more perplexity than through its own forward (fp32; bf16)."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import pull

    folder = pull("smollm2-135m-instruct")
    dtype = torch.float32 if quantize else torch.bfloat16
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(),
        AutoTokenizer.from_pretrained(folder),
    )
    decoder = Decoder(model, quantize)
    question = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    text = tokenizer(
        "The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many artists disliked it, "
        "but it soon became the symbol of the city, and millions of people now visit it every year."
    ).input_ids

    def perplexity(decoder) -> float:
        batch, row = Batch(model, 1, decoder=decoder), Row(0, text[:1], Sampling(len(text)), tokenizer, set())
        batch.add(row)
        nll = 0.0
        for token in text[1:]:
            nll -= float(row.logits.log_softmax(-1)[token])
            row.tokens.append(token)
            batch.advance()
        return math.exp(nll / (len(text) - 1))

    plain, steps = perplexity(None), perplexity(decoder)
    assert steps < plain * (1.05 if quantize else 1.01), (plain, steps)
    batch, row = Batch(model, 1, decoder=decoder), Row(0, question, Sampling(16, 0.0), tokenizer, set())
    batch.add(row)
    while batch.rows:
        batch.step()
    assert "Paris" in row.answer, row.answer


def test_the_model_forward_continues_a_cache_the_steps_grew():
    """The written-out steps run in inference mode, so a cache buffer they start is an inference tensor; the model's
    forward after them (outside it) starts a buffer of its own rather than write into that one."""
    model = tiny_decoder("llama", 300)
    batch, row = (
        Batch(model, 2, decoder=Decoder(model, quantize=False)),
        Row(0, prompts()[3], Sampling(80, 0.0), IdsTokenizer(), set()),
    )
    plain, twin = Batch(model, 2), Row(0, prompts()[3], Sampling(80, 0.0), IdsTokenizer(), set())
    batch.add(row)
    plain.add(twin)
    for step in range(80):
        if step == 70:  # past the first buffer's spare room: the steps made the one in use
            assert batch.cache.layers[0].key_room.is_inference()
            batch.decoder = None
        batch.step()
        plain.step()
    assert row.tokens == twin.tokens and len(row.tokens) == 80


def test_a_server_computes_arriving_prompts_inside_its_decode_steps_if_asked(tmp_path, monkeypatch):
    """`--prefill-in-decode-steps`, where the decode steps take prompts (the model's own weights): a prompt
    arriving while another request decodes rides its decode steps, `--max-prefill-tokens` (4) of its tokens
    a step, with no pass of its own; both requests answer what the model's forward answers each alone (fp32
    here, so that answers compare token for token; `tunelab serve` runs these steps in bf16). Without the
    flag the same prompt takes passes of its own."""
    from tunelab.infer.decode import Prefill
    from tunelab.serve.app import create_app
    from tunelab.serve.serving import Limits
    from tunelab.serve.store import ModelStore

    tiny_decoder_dir(tmp_path / "llama", "llama")
    texts = ("it was", "What is 20 plus 20? Tell me the answer, and nothing else, please.")

    def ask(url: str, prompt: str, started=None) -> str:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        tokens = 40 if prompt == texts[0] else 12  # the short one decodes on while the long one is computed
        stream = client.completions.create(
            model="llama",
            prompt=prompt,
            max_tokens=tokens,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": tokens},  # vLLM's parameter: no end token cuts it short
        )
        return completion_text(stream, started)

    with live(create_app(ModelStore([str(tmp_path / "llama")]))) as url:  # fp32: the model's forward
        alone = [ask(url, t) for t in texts]
    assert all(alone)

    monkeypatch.setattr(ModelStore, "_decoder", lambda self, model, served: Decoder(model, quantize=False))
    sizes, passes, step, advance = [], [], Decoder.step, Prefill.advance

    def recorded(self, ids, positions, cache, mask, chunks=()):
        time.sleep(0.02)  # the short request is still decoding when the long one arrives
        sizes.append([len(c.ids) for c in chunks])
        return step(self, ids, positions, cache, mask, chunks)

    monkeypatch.setattr(Decoder, "step", recorded)
    monkeypatch.setattr(Prefill, "advance", lambda self, whole=False: passes.append(whole) or advance(self, whole))
    for inside in (True, False):
        sizes.clear()
        app = create_app(ModelStore([str(tmp_path / "llama")]), limits=Limits(max_prefill=4, prefill_in_steps=inside))
        with live(app) as url:
            results: list = [None, None]
            decoding = threading.Event()
            short = threading.Thread(target=lambda r=results, e=decoding: r.__setitem__(0, ask(url, texts[0], e)))
            short.start()
            assert decoding.wait(30)
            results[1] = ask(url, texts[1])
            short.join(60)
            assert not app.state.engine.prefilling
        assert results == alone
        riding = [s for s in sizes if s]
        if inside:
            assert riding[:2] == [[4], [4]] and all(s == [4] for s in riding[:-1]) and 1 <= riding[-1][0] <= 4
            assert not passes  # no chunk in a pass of its own
        else:
            assert not riding and passes[:2] == [False, False]  # 4 tokens a pass between the steps
