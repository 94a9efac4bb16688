"""Which library constrains decoding: the CPU cost of filling and applying the token masks of a JSON schema.

    .venv/bin/pip install llguidance        # the candidate tunelab does not depend on
    .venv/bin/python benchmarks/grammar_backends.py

xgrammar (vLLM's default backend, what `infer.constrain` uses) and llguidance (llama.cpp's, vLLM's
"guidance") each follow 16 answers valid under the same JSON schema, token by token, with SmolLM2's 49k-token
vocabulary: every step fills each row's mask, applies it to the row's logits and takes the row's next token.
Three rounds of new answers (a library's lazily built caches are cold in the first); reported: milliseconds
a step for 1 row and for 16.
"""

from __future__ import annotations

import json
import time

import torch

MODEL = "smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def answers(tokenizer, round_: int) -> list[list[int]]:
    rows = [
        {"name": f"Person {round_} Q{i}", "age": 20 + i + round_, "tags": [f"t{i}", "reader" if i % 2 else "writer"]}
        for i in range(16)
    ]
    return [tokenizer(json.dumps(r), add_special_tokens=False).input_ids for r in rows]


def xgrammar_steps(tokenizer, vocab: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))

    def run(targets: list[list[int]]) -> float:
        matchers = [xgr.GrammarMatcher(compiled) for _ in targets]
        mask, logits = xgr.allocate_token_bitmask(len(targets), vocab), torch.randn(len(targets), vocab)
        steps = min(len(t) for t in targets)
        started = time.perf_counter()
        for s in range(steps):
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, i)
            xgr.apply_token_bitmask_inplace(logits, mask)
            for i, m in enumerate(matchers):
                assert m.accept_token(targets[i][s])
        return (time.perf_counter() - started) / steps * 1000

    return run


def llguidance_steps(tokenizer, vocab: int):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok = llguidance.hf.from_tokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))

    def run(targets: list[list[int]]) -> float:
        matchers = [llguidance.LLMatcher(lltok, grammar) for _ in targets]
        mask, logits = lt.allocate_token_bitmask(len(targets), lltok.vocab_size), torch.randn(len(targets), vocab)
        steps = min(len(t) for t in targets)
        started = time.perf_counter()
        for s in range(steps):
            for i, m in enumerate(matchers):
                lt.fill_next_token_bitmask(m, mask, i)
            lt.apply_token_bitmask_inplace(logits, mask)
            for i, m in enumerate(matchers):
                assert m.consume_token(targets[i][s])
        return (time.perf_counter() - started) / steps * 1000

    return run


def main() -> None:
    from transformers import AutoTokenizer

    from tunelab.models import pull

    tokenizer = AutoTokenizer.from_pretrained(pull(MODEL))
    vocab = 49152
    backends = {"xgrammar": xgrammar_steps(tokenizer, vocab)}
    try:
        backends["llguidance"] = llguidance_steps(tokenizer, vocab)
    except ImportError:
        print("llguidance is not installed: pip install llguidance to compare it")
    print(f"{MODEL} tokenizer, ms a step (fill + apply + accept), rounds 1 / 2 / 3\n")
    print("| Library | 1 row | 16 rows |\n|---|---|---|")
    for name, run in backends.items():
        one, sixteen = [], []
        for round_ in range(3):
            targets = answers(tokenizer, round_)
            one.append(run(targets[:1]))
            sixteen.append(run(targets))
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in one)} | {' / '.join(f'{x:.2f}' for x in sixteen)} |")


if __name__ == "__main__":
    main()
