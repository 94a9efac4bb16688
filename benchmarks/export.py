"""`tunelab export` to GGUF: how long it takes and how large each type is, and what a user gains by running
the export in llama.cpp instead of `tunelab generate`.

    .venv/bin/python benchmarks/export.py                                   # SmolLM2 and Gemma-3, every type
    .venv/bin/python benchmarks/export.py --models smollm2-135m-instruct --types q8_0 --tokens 64

Export: the wall time of the whole `tunelab export MODEL OUT --type T` command (interpreter start, model
load, conversion, quantization, the write), as a user runs it, and the file's size. Generation: the same
chat prompt, greedy, a fixed number of new tokens (end-of-turn ignored, so every runtime decodes the same
count), one request, all cores; tokens/s of the decode after the model is loaded (the median of 3 runs after a
warm-up), and the load time apart.
`tunelab generate` is transformers' generate on the model in fp32 (its default) and in bf16
(`--precision auto` on a CPU with native bf16); llama.cpp (llama-cpp-python, built by `make install`) runs
the q8_0 and f16 exports in a child process, so a llama.cpp built for another CPU fails alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("smollm2-135m-instruct", "gemma3-270m")
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
PROMPT = "Give three tips for staying healthy."
REPEATS = 3  # timed decodes per runtime; the median is reported


def export_time(model: str, out: Path, kind: str) -> float:
    tunelab = Path(sys.executable).parent / "tunelab"
    started = time.perf_counter()
    subprocess.run(
        [str(tunelab), "export", model, str(out), "--type", kind, "--force"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - started


def prompt_ids(model: str) -> list[int]:
    from transformers import AutoTokenizer

    from tunelab.data.render import chat_template_for
    from tunelab.infer.prompts import encode_prompt
    from tunelab.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    if not tokenizer.chat_template:  # a base model: the Alpaca layout, as the quickstart asks it
        tokenizer.chat_template = chat_template_for(tokenizer, "alpaca")
    return encode_prompt(tokenizer, PROMPT)[0].tolist()


def tunelab_speed(model: str, ids: list[int], tokens: int, precision: str) -> dict:
    """What `tunelab generate MODEL PROMPT --precision P` runs, with end-of-turn ignored."""
    import torch

    from tunelab.models import resolve_model
    from tunelab.models.load import load_causal_lm, quiet_loading, weights_dtype

    quiet_loading()
    started = time.perf_counter()
    lm, tokenizer = load_causal_lm(resolve_model(model), weights_dtype(precision))
    loaded = time.perf_counter() - started
    prompt = torch.tensor([ids])
    walls = []
    with torch.no_grad():
        lm.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(REPEATS):
            started = time.perf_counter()
            out = lm.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            walls.append(time.perf_counter() - started)
            assert out.shape[1] - len(ids) == tokens
    return {"load_s": loaded, "tokens_per_s": tokens / statistics.median(walls)}


def llama_cpp_speed(gguf: str, ids: list[int], tokens: int) -> dict:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=len(ids) + tokens + 8, n_threads=os.cpu_count(), verbose=False)
    loaded = time.perf_counter() - started
    walls = []
    try:
        for count in [4] + [tokens] * REPEATS:  # a warm-up, then the timed runs
            started = time.perf_counter()
            for n, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):  # never stops on its own
                if n == count:
                    break
            walls.append(time.perf_counter() - started)
    finally:
        llm.close()
    return {"load_s": loaded, "tokens_per_s": tokens / statistics.median(walls[1:])}


def llama_cpp_child(gguf: Path, ids: list[int], tokens: int) -> dict | None:
    from child import json_from_child

    return json_from_child(__file__, "--llama-only", str(gguf), "--ids", json.dumps(ids), "--tokens", str(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens decoded per runtime")
    parser.add_argument("--llama-only", metavar="GGUF", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_only:
        print(json.dumps(llama_cpp_speed(args.llama_only, json.loads(args.ids), args.tokens)))
        return

    from tunelab.precision import resolve_precision

    native = resolve_precision("auto").name
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            print(f"\n{model}: tunelab export, whole command")
            print(f"{'type':<6} {'seconds':>8} {'MB':>8}")
            files = {}
            for kind in args.types:
                files[kind] = Path(tmp) / f"{model}-{kind}.gguf"
                seconds = export_time(model, files[kind], kind)
                print(f"{kind:<6} {seconds:>8.1f} {files[kind].stat().st_size / 1e6:>8.1f}", flush=True)
            ids = prompt_ids(model)
            print(f"{model}: {len(ids)}-token chat prompt, {args.tokens} new tokens, greedy, {os.cpu_count()} threads")
            rows = [
                (f"tunelab generate, {p}", tunelab_speed(model, ids, args.tokens, p))
                for p in dict.fromkeys(("fp32", native))
            ]
            rows += [
                (f"llama.cpp, {k} export", llama_cpp_child(files[k], ids, args.tokens))
                for k in ("f16", "q8_0")
                if k in files
            ]
            base = rows[0][1]["tokens_per_s"]
            print(f"{'':<28} {'load (s)':>9} {'tokens/s':>9} {'x tunelab fp32':>15}")
            for label, r in rows:
                if r is None:
                    print(f"{label:<28} {'failed':>9}")
                    continue
                print(
                    f"{label:<28} {r['load_s']:>9.2f} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>15.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
