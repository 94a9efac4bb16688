"""What a long prompt arriving at a busy `tunelab serve` costs the streams already running, with chunked
prefill (the prompt computed `--max-prefill-tokens` at a time between decode steps, the default 256) and
without it (`--max-prefill-tokens 8192`: the whole prompt in one pass, as before chunking).

    .venv/bin/python benchmarks/serve_long_prompt.py                      # a prompt of about 2,000 tokens

Four clients stream answers (the official `openai` client, greedy, 96 new tokens) to Alpaca instructions;
once they are decoding, a fifth sends a long prompt (Alpaca records joined, then a question about them).
Reported for each server: the running streams' longest gap between two tokens while the long prompt is
computed (their median gap outside it for scale), the long request's time to first token, and the
aggregate output tokens/s of the running streams.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

from serve_throughput import ALPACA, MODEL, free_port, prompts, serve


def long_prompt(words: int) -> str:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    text, count = [], 0
    for r in rows:
        piece = f"{r['instruction']} {r['output']}"
        text.append(piece)
        count += len(piece.split())
        if count >= words:
            break
    return "\n\n".join(text) + "\n\nWhich of the tasks above is about cooking? Answer in one sentence."


def stream(client, content: str, tokens: int, stamps: list[float]) -> None:
    for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=tokens, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())


def one_server(options: list[str], texts: list[str], long_text: str, tokens: int, precision: str) -> dict:
    from openai import OpenAI

    port = free_port()
    server = serve(port, precision, "none", *options)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        stream(client, "Hello", 4, [])  # the model loads on its first request: not timed
        stream(client, long_text, 1, [])  # nor are the first passes of each new shape (oneDNN builds its kernels)
        runs = [[] for _ in texts]
        threads = [threading.Thread(target=stream, args=(client, t, tokens, s)) for t, s in zip(texts, runs)]
        for t in threads:
            t.start()
        while min(len(s) for s in runs) < 8:  # every stream decoding
            time.sleep(0.01)
        sent, first = time.perf_counter(), []
        stream(client, long_text, 8, first)
        answered = first[0]
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(30)
    gaps_during, gaps_outside = [], []
    for stamps in runs:
        for a, b in zip(stamps, stamps[1:]):
            (gaps_during if b > sent and a < answered else gaps_outside).append(b - a)
    start, end = min(s[0] for s in runs), max(s[-1] for s in runs)
    return {
        "longest_gap_s": max(gaps_during, default=0.0),
        "longest_gaps_s": sorted(round(g, 3) for g in gaps_during)[-4:],
        "median_gap_s": statistics.median(gaps_outside),
        "long_ttft_s": answered - sent,
        "tokens_per_s": sum(len(s) for s in runs) / (end - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=1400, help="words of Alpaca text in the long prompt")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per running answer")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tunelab.models import pull

    texts, long_text = prompts(args.clients), long_prompt(args.words)
    length = len(AutoTokenizer.from_pretrained(pull(MODEL))(long_text).input_ids)
    results = {}
    for label, options in (("chunked (256)", []), ("whole prompt (8192)", ["--max-prefill-tokens", "8192"])):
        results[label] = one_server(options, texts, long_text, args.tokens, args.precision)
        print(label, results[label], file=sys.stderr, flush=True)
    print(f"\n{MODEL}, a {length}-token prompt arriving beside {args.clients} streams of {args.tokens} tokens")
    print(f"{'':<22} {'longest gap (s)':>16} {'median gap (s)':>15} {'long TTFT (s)':>14} {'tokens/s':>9}")
    for label, r in results.items():
        print(
            f"{label:<22} {r['longest_gap_s']:>16.3f} {r['median_gap_s']:>15.3f} {r['long_ttft_s']:>14.3f} "
            f"{r['tokens_per_s']:>9.1f}"
        )


if __name__ == "__main__":
    main()
