"""The batched generation every evaluation uses: batches give what one prompt at a time gives, sampling
is repeatable under a seed, stop sequences cut, and max_new_tokens bounds the length."""

from __future__ import annotations

import pytest
from tiny_models import tiny_llama_dir

from tunelab.infer.generate import BatchRequest, generate_batch
from tunelab.infer.sampling import Sampling


def asked(max_new_tokens: int, temperature: float = 0.0, seed: int | None = None, stop=(), **batching) -> BatchRequest:
    return BatchRequest(Sampling(max_new_tokens, temperature, seed=seed, stop=list(stop)), **batching)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama_dir(tmp_path_factory.mktemp("gen") / "llama", chat=False)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _prompts(tokenizer):
    texts = ["the movie was", "a very good and lovely story about the world", "it"]
    return [tokenizer(t)["input_ids"] for t in texts]


def test_batches_give_what_one_prompt_at_a_time_gives(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    batched = generate_batch(model, tokenizer, prompts, asked(8, batch_size=3))
    alone = [generate_batch(model, tokenizer, [p], asked(8, batch_size=1))[0] for p in prompts]
    assert batched == alone and all(batched)


def test_the_continuous_batcher_writes_what_generate_writes(tiny):
    """Decoder prompts go through the server's continuous batcher (rows leave when they stop and the next
    prompt joins): greedy texts equal transformers' `generate`, with stop strings, in batches of 2 of 6
    prompts of different lengths."""
    model, tokenizer = tiny
    prompts = _prompts(tokenizer) + [tokenizer(t)["input_ids"] for t in ("good", "the plot was very dull but", "a")]
    options = {"max_new_tokens": 12, "batch_size": 2, "stop": ("sss", "itit")}
    engine = generate_batch(model, tokenizer, prompts, asked(**options))
    plain = generate_batch(model, tokenizer, prompts, asked(continuous=False, **options))
    assert engine == plain and len(set(engine)) > 3
    long = generate_batch(model, tokenizer, prompts, asked(12, batch_size=2))
    assert any(len(a) < len(b) for a, b in zip(engine, long))  # some stop string did cut


def test_sampling_is_repeatable_under_a_seed(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    first = generate_batch(model, tokenizer, prompts, asked(12, temperature=1.0, seed=1))
    assert generate_batch(model, tokenizer, prompts, asked(12, temperature=1.0, seed=1)) == first
    others = [generate_batch(model, tokenizer, prompts, asked(12, temperature=1.0, seed=s)) for s in (2, 3)]
    assert any(o != first for o in others)


def test_stop_sequences_cut_and_max_new_tokens_bounds(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)[:1]
    full = generate_batch(model, tokenizer, prompts, asked(10))[0]
    assert len(tokenizer(full, add_special_tokens=False)["input_ids"]) <= 10 and len(full) >= 5
    stop = full[3:5]
    cut = generate_batch(model, tokenizer, prompts, asked(10, stop=("never there", stop)))[0]
    assert cut == full[: full.index(stop)].strip() and len(cut) < len(full)


def test_a_shared_prefix_computed_once_gives_the_same_answers(tiny):
    """Prompts in groups that begin alike (a task's definition, then an instance): with the prefix cache
    each group's beginning is computed once; the greedy answers equal transformers' `generate` on the
    whole prompts, with stop strings, rows joining one at a time or two at a time as others leave."""
    model, tokenizer = tiny
    definitions = [
        "the story of a good movie about the world and a very lovely plot that was dull " * 2,
        "it was a story of the good world, and the movie was very dull but lovely " * 2,
    ]
    inputs = ["good", "the plot was", "a", "very good and lovely story", "it"]
    prompts, groups = [], []
    for g, definition in enumerate(definitions):
        for text in inputs:
            prompts.append(tokenizer(definition + text)["input_ids"])
            groups.append(g)
    prompts.append(tokenizer("a lone prompt")["input_ids"])
    groups.append(2)
    from tunelab.infer.decode import shared_prefixes

    shared = shared_prefixes(prompts, groups)
    assert min(shared[:10]) >= 16 and shared[10] == 0  # the two definitions are prefixes; the lone prompt has none
    options = {"max_new_tokens": 10, "batch_size": 3, "stop": ("sss",)}
    cached = generate_batch(model, tokenizer, prompts, asked(**options), groups=groups)
    plain = generate_batch(model, tokenizer, prompts, asked(continuous=False, **options))
    assert cached == plain and len(set(cached)) > 5
    assert generate_batch(model, tokenizer, prompts, asked(join_at=2, **options), groups=groups) == plain


def test_a_row_that_leaves_the_batch_lets_go_of_the_batch_logits(tiny):
    """Each row's logits are a view of its step's whole (rows x vocabulary) tensor: a finished row that kept
    them kept that tensor alive, one per step where a row ended (Gemma-3, 32 rows: 34 MB each; an SNI
    evaluation climbed to 6 GB). Rows ending at different steps, and a cancelled one, keep none."""
    from tunelab.infer.decode import Batch, Row, run_to_end
    from tunelab.infer.generate import stop_token_ids

    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    prompts = _prompts(tokenizer)
    rows = [Row(i, p, Sampling(2 + 3 * i), tokenizer, stops) for i, p in enumerate(prompts)]
    run_to_end(model, rows, max_rows=3)
    assert [len(r.tokens) for r in rows] == [2, 5, 8] and all(r.logits is None for r in rows)
    batch = Batch(model, max_rows=3)
    rows = [Row(i, p, Sampling(8), tokenizer, stops) for i, p in enumerate(prompts)]
    batch.add(*rows)
    batch.step(cancelled=lambda row: row.tag == 1)
    assert rows[1].logits is None and rows[0].logits is not None and len(batch.rows) == 2


def test_decode_steps_reuse_one_fp32_buffer_without_a_row_losing_its_logits(tmp_path):
    """In bf16 a decode step's logits are cast into one fp32 buffer the batch reuses (a fresh 34 MB cast
    every step was page faults: Gemma-3, 32 rows). Each row must have chosen from the last step's before the
    next overwrites them, also while rows join and leave: greedy, seeded and log-probability rows give what
    a fresh cast each step gives, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.infer.decode import Batch, Row
    from tunelab.infer.generate import stop_token_ids

    folder = tiny_llama_dir(tmp_path / "llama", chat=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stops = stop_token_ids(model, tokenizer)
    texts = ["the movie was", "a very good and lovely story", "it", "good", "the plot was very dull but", "a"]

    def decode() -> tuple[list, Batch]:
        params = [
            Sampling(4 + i, temperature=(0.0, 1.0, 0.7)[i % 3], seed=i, top_logprobs=(None, 2, 3)[i % 3])
            for i in range(len(texts))
        ]
        waiting = [
            Row(i, tokenizer(t)["input_ids"], p, tokenizer, stops) for i, (t, p) in enumerate(zip(texts, params))
        ]
        batch, seen = Batch(model, max_rows=2), []
        while waiting or batch.rows:
            if len(batch.rows) < 2 and waiting:
                batch.add(waiting.pop(0))  # rows join one at a time while the others decode
            seen += [(row.tag, step.token, step.logprob, step.top) for row, step in batch.step()]
        return seen, batch

    reused, batch = decode()
    assert batch.scores is not None and batch.scores.dtype == torch.float32  # the bf16 path was taken
    fresh_cast = Batch._fp32
    try:
        Batch._fp32 = lambda self, logits: logits.float()  # type: ignore[method-assign]
        fresh, _ = decode()
    finally:
        Batch._fp32 = fresh_cast  # type: ignore[method-assign]
    assert reused == fresh
    assert len({tag for tag, *_ in reused}) == len(texts) and any(logprob is not None for _, _, logprob, _ in reused)
