"""`tunelab serve` under concurrent clients, against what a user would run without it.

    .venv/bin/python benchmarks/serve_throughput.py                      # 64 prompts, 64 new tokens
    .venv/bin/python benchmarks/serve_throughput.py --prompts 32 --clients 1 4 16 --precision fp32

The server (`tunelab serve smollm2-135m-instruct`, a subprocess on 127.0.0.1; then again with `--quantize
int8`, its decode steps in int8; with `--prefill-in-decode-steps`, a third computing arriving prompts inside
its decode steps) answers the same Alpaca instructions, greedy, with 1, 4 and 16 concurrent
clients, each the official `openai` client streaming its requests one after another; reported: aggregate
output tokens/s (all tokens of all answers over the wall time) and the median time to first token. The
baselines, in the same run: the same prompts answered one at a time by plain transformers `generate` (what a
user writes without a server), in the server's precision, and llama.cpp (llama-cpp-python: `pip install llama-cpp-python`, built from its source distribution, about
13 minutes; `make install` builds it) on a q8_0 GGUF of the same model (`--gguf`, written by
`tunelab export smollm2-135m-instruct smollm2-135m-instruct-q8_0.gguf`), one request at a time; each
baseline runs before and after the servers, and the mean of the two is the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALPACA = Path("../shared/data/instruct/alpaca_5000.json")
MODEL = "smollm2-135m-instruct"


def prompts(count: int) -> list[str]:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    return [r["instruction"] for r in rows if not r["input"]][:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int, precision: str, quantize: str, *options: str) -> subprocess.Popen:
    tunelab = Path(sys.executable).parent / "tunelab"
    server = subprocess.Popen(
        [str(tunelab), "serve", MODEL, "--port", str(port), "--precision", precision, "--quantize", quantize, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    print(server.stdout.readline().strip(), file=sys.stderr)
    deadline = time.time() + 120  # the banner comes before uvicorn listens
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"tunelab serve did not start listening on 127.0.0.1:{port}") from None
            time.sleep(0.2)


def one_request(client, prompt: str, tokens: int) -> tuple[float, int, float]:
    """(time to first token, output tokens, seconds) of one streamed request."""
    started, first, count = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return first or 0.0, count, time.perf_counter() - started


def clients_run(url: str, texts: list[str], clients: int, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    one_request(client, "Hello", 4)  # the model loads on its first request: not timed
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(client, p, tokens), texts))
    wall = time.perf_counter() - started
    out = sum(r[1] for r in results)
    return {
        "clients": clients,
        "tokens_per_s": out / wall,
        "ttft_median_s": statistics.median(r[0] for r in results),
        "output_tokens": out,
        "seconds": wall,
    }


def generate_one(model, tokenizer, text: str, tokens: int, precision: str):
    """(prompt ids, output ids) of one greedy `generate` of the chat prompt."""
    import torch

    from tunelab.precision import autocast

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad(), autocast(precision):
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return ids, new


def transformers_serial(texts: list[str], tokens: int, precision: str) -> dict:
    """Plain transformers, one prompt at a time: apply_chat_template + generate, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import pull

    folder = pull(MODEL)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text in texts[:2]:  # warm-up, as llama.cpp's below: a fresh process's first bf16 generations run at half speed
        generate_one(model, tokenizer, text, 8, precision)
    out, started = 0, time.perf_counter()
    for text in texts:
        ids, new = generate_one(model, tokenizer, text, tokens, precision)
        out += new.shape[1] - ids.shape[1]
    wall = time.perf_counter() - started
    return {"tokens_per_s": out / wall, "output_tokens": out, "seconds": wall}


def llama_cpp_serial(gguf: str, texts: list[str], tokens: int) -> dict:
    """llama.cpp, one chat completion at a time, greedy, all cores."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}], max_tokens=4)  # warm-up
    out, firsts, started = 0, [], time.perf_counter()
    for text in texts:
        began, first = time.perf_counter(), None
        for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": text}], max_tokens=tokens, temperature=0.0, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - began
                out += 1  # one chunk per token
        firsts.append(first or 0.0)
    wall = time.perf_counter() - started
    return {
        "tokens_per_s": out / wall,
        "ttft_median_s": statistics.median(firsts) if firsts else 0.0,
        "output_tokens": out,
    }


def _mean(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) / 2 for k in a}


def llama_cpp_child(args) -> dict | None:
    """The llama.cpp baseline in a child process: a llama.cpp built for another CPU dies of an illegal
    instruction, which must not take the measurements above with it. None without --gguf."""
    if not args.gguf:
        return None
    from child import json_from_child

    return json_from_child(
        __file__,
        "--llama-only",
        "--gguf",
        args.gguf,
        "--tokens",
        str(args.tokens),
        "--baseline-prompts",
        str(args.baseline_prompts),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument(
        "--quantize", nargs="+", default=["none", "int8"], choices=("none", "int8"), help="the servers measured"
    )
    parser.add_argument(
        "--prefill-in-decode-steps",
        action="store_true",
        help="also a server with --prefill-in-decode-steps (its arriving prompts inside the decode steps)",
    )
    parser.add_argument("--baseline-prompts", type=int, default=16, help="prompts the serial baselines answer")
    parser.add_argument("--gguf", help="a q8_0 GGUF of the model, for the llama.cpp baseline")
    parser.add_argument("--llama-only", action="store_true", help=argparse.SUPPRESS)  # the child process below
    args = parser.parse_args()
    if args.llama_only:
        print(json.dumps(llama_cpp_serial(args.gguf, prompts(args.baseline_prompts), args.tokens)))
        return

    from tunelab.precision import resolve_precision

    precision = resolve_precision(args.precision).name
    texts = prompts(args.prompts)
    # the baselines before and after the servers, their mean the reference: a shared machine's speed drifts
    # over the minutes the servers take (llama.cpp read 78.5 and 102.9 tokens/s in two runs here)
    before = (transformers_serial(texts[: args.baseline_prompts], args.tokens, precision), llama_cpp_child(args))
    rows = []
    servers = [(quantize, ()) for quantize in args.quantize]
    servers += [("none", ("--prefill-in-decode-steps",))] if args.prefill_in_decode_steps else []
    for quantize, options in servers:
        port = free_port()
        server = serve(port, args.precision, quantize, *options)
        try:
            for n in args.clients:
                measured = clients_run(f"http://127.0.0.1:{port}/v1", texts, n, args.tokens)
                rows.append({**measured, "quantize": quantize, "options": " ".join(options)})
                print(rows[-1], file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(30)
    after = (transformers_serial(texts[: args.baseline_prompts], args.tokens, precision), llama_cpp_child(args))
    serial = _mean(before[0], after[0])
    llama = _mean(before[1], after[1]) if before[1] and after[1] else None
    print(f"baselines before the servers: {before}\nand after: {after}", file=sys.stderr)
    print(f"\n{MODEL}, {args.prompts} prompts, {args.tokens} new tokens, greedy, precision {precision}")
    base = llama["tokens_per_s"] if llama else None
    print(f"{'':<56} {'tokens/s':>10} {'median TTFT (s)':>16} {'x transformers':>15} {'x llama.cpp':>12}")
    print(
        f"{'transformers generate, 1 at a time':<56} {serial['tokens_per_s']:>10.1f} {'':>16} {1.0:>15.2f}"
        f"{'' if base is None else format(serial['tokens_per_s'] / base, '>13.2f')}"
    )
    if llama:
        print(
            f"{'llama.cpp q8_0, 1 at a time':<56} {base:>10.1f} {llama['ttft_median_s']:>16.3f} "
            f"{base / serial['tokens_per_s']:>15.2f} {1.0:>12.2f}"
        )
    for r in rows:
        print(
            f"{_served(r):<56} {r['tokens_per_s']:>10.1f} "
            f"{r['ttft_median_s']:>16.3f} {r['tokens_per_s'] / serial['tokens_per_s']:>15.2f}"
            f"{'' if base is None else format(r['tokens_per_s'] / base, '>13.2f')}"
        )
    if not llama:
        print("llama.cpp: not measured (give --gguf with a q8_0 GGUF, and pip install llama-cpp-python)")


def _served(row: dict) -> str:
    options = (" --quantize int8" if row["quantize"] == "int8" else "") + (
        f" {row['options']}" if row["options"] else ""
    )
    return f"tunelab serve{options}, {row['clients']} client{'s' if row['clients'] > 1 else ''}"


if __name__ == "__main__":
    main()
