"""Written-out decode steps (`infer.steps`; `tunelab serve` in bf16, and `--quantize int8`): unquantized, the same steps
compute transformers' logits for every family they cover, in a batch that rows join and leave; quantized,
they stay close; rows with a LoRA adapter and families they do not cover decode through the model; a live
server under `--quantize int8` answers the official `openai` client with them."""

from __future__ import annotations

import openai
import pytest
import torch
from helpers import IdsTokenizer, live
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


def test_a_server_decodes_in_int8_where_the_family_allows(tmp_path, capfd):
    """`--quantize int8`: a Llama answers through int8 steps (each token's log-probability is the int8 steps',
    not the model's), a Gemma-3 beside it through its own forward, and the log says why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.serve.app import create_app
    from tunelab.serve.store import ModelStore

    for family in ("llama", "gemma3"):
        tiny_decoder_dir(tmp_path / family, family)
    store = ModelStore([str(tmp_path / "llama"), str(tmp_path / "gemma3")], quantize="int8")
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
    assert isinstance(loaded["llama"].decoder, Decoder) and loaded["gemma3"].decoder is None
    assert "gemma3: int8 decoding covers the Llama family" in capfd.readouterr().out

    def decoded(model, tokenizer, decoder):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        batch = Batch(model, 1, decoder=decoder)
        batch.add(Row(0, ids, Sampling(10, 0.0, top_logprobs=0), tokenizer, {tokenizer.eos_token_id}))
        steps = []
        while batch.rows:
            steps += [s for _, s in batch.step() if s.token is not None]
        return "".join(s.text for s in steps), [s.logprob for s in steps]

    for family, reply in answers.items():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / family)
        served = [t.logprob for t in reply.choices[0].logprobs.content]
        text, logprobs = decoded(model, tokenizer, Decoder(model) if family == "llama" else None)
        assert reply.choices[0].message.content == text and served == pytest.approx(logprobs, abs=1e-5), family
        if family == "llama":  # not the unquantized model's
            assert served != pytest.approx(decoded(model, tokenizer, None)[1], abs=1e-5)


@pytest.mark.real
def test_smollm2_in_int8_keeps_its_answers_and_perplexity():
    """The real SmolLM2-135M-Instruct: its greedy answer through int8 steps still names Paris, and a
    paragraph fed token by token through them costs at most 5% more perplexity than through its own."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import pull

    folder = pull("smollm2-135m-instruct")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    decoder = Decoder(model)
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

    plain, int8 = perplexity(None), perplexity(decoder)
    assert int8 < plain * 1.05, (plain, int8)
    batch, row = Batch(model, 1, decoder=decoder), Row(0, question, Sampling(16, 0.0), tokenizer, set())
    batch.add(row)
    while batch.rows:
        batch.step()
    assert "Paris" in row.answer, row.answer


def test_the_model_forward_continues_a_cache_the_int8_steps_grew():
    """int8 steps run in inference mode, so a cache buffer they start is an inference tensor; the model's
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
        if step == 70:  # past the first buffer's spare room: the int8 steps made the one in use
            assert batch.cache.layers[0].key_room.is_inference()
            batch.decoder = None
        batch.step()
        plain.step()
    assert row.tokens == twin.tokens and len(row.tokens) == 80
