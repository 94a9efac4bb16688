"""llama.cpp (llama-cpp-python) calls for the export tests, each in a child process: a llama.cpp built for
another CPU dies of an illegal instruction at its first token, which must fail the test that called it,
not end the whole test session. The children are spawned (a fresh interpreter: no torch, no fork)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import pytest


def in_child(fn, *args):
    """fn(*args) in a spawned child process; a child that dies fails the test with what to do."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result(timeout=600)
        except BrokenProcessPool:
            pytest.fail(
                "the llama.cpp child process died (a llama-cpp-python wheel built for another CPU dies of "
                "an illegal instruction: `pip cache remove llama_cpp_python` and `make install` again, "
                "docs/development.md)"
            )


def tokens_and_logits(
    path: str, prompts: list[str], lora: str | None = None
) -> list[tuple[list[int], list[list[float]]]]:
    """For each prompt: llama.cpp's tokens (BOS as the GGUF says) and its logits at every position (with
    the GGUF adapter `lora` applied on top)."""
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=256, verbose=False, logits_all=True, lora_path=lora)
    try:
        out = []
        for prompt in prompts:
            ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            llm.reset()
            llm.eval(ids)
            out.append((ids, [list(map(float, row)) for row in llm.scores[: len(ids)]]))
        return out
    finally:
        llm.close()


def greedy(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The first `n` greedy tokens after each prompt (end-of-turn not stopping them)."""
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=256, verbose=False)
    try:
        outs = []
        for ids in prompts:
            out = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                out.append(token)
                if len(out) == n:
                    break
            outs.append(out)
        return outs
    finally:
        llm.close()


def chat(path: str, messages: list[dict], max_tokens: int) -> dict:
    """The first choice of a greedy chat completion, rendered with the GGUF's chat template."""
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=512, verbose=False)
    try:
        return llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_tokens)["choices"][0]
    finally:
        llm.close()
