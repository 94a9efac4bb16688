"""Decode-step time of the server's batcher, the model's own forward against int8 steps (`--quantize int8`).

    .venv/bin/python benchmarks/decode_steps.py [--model smollm2-135m-instruct] [--rows 1 4 8 16]

In one process, for each batch width: that many rows of the same chat prompt decode 64 greedy tokens on one
`infer.decode.Batch`, once through the model's forward (in `--precision`, bf16 where the CPU has it) and
once with an `Int8Decoder`, each after a warm-up; reported: milliseconds a decode step (`Batch.step`, its
token choice included) and the ratio. No HTTP: what `benchmarks/serve_throughput.py` measures end to end.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from tunelab.infer.decode import Batch, Row
from tunelab.infer.prompts import encode_prompt
from tunelab.infer.sampling import Sampling
from tunelab.infer.steps import Decoder
from tunelab.models import resolve_model
from tunelab.models.load import load_generator, weights_dtype
from tunelab.precision import resolve_precision


def ms_per_step(model, tokenizer, prompt: list[int], rows: int, decoder, tokens: int = 64) -> float:
    batch = Batch(model, rows, decoder=decoder)
    batch.add(*[Row(i, prompt, Sampling(tokens, 0.0), tokenizer, set()) for i in range(rows)])
    started, steps = time.perf_counter(), 0
    while batch.rows:
        batch.step()
        steps += 1
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    precision = resolve_precision(args.precision)
    model, tokenizer = load_generator(resolve_model(args.model), weights_dtype(precision.name))[:2]
    started = time.perf_counter()
    decoder = Decoder(model)
    packed = time.perf_counter() - started
    own = Decoder(model, quantize=False)  # its projections become views of the fused matrices: the same values
    prompt = encode_prompt(tokenizer, "Give three tips for staying healthy.")[0].tolist()
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{args.model}, {machine}; the int8 weights packed in {packed:.1f} s\n")
    name = precision.name
    print(f"| rows | {name} forward, ms a step | {name} steps | speed-up | int8 steps | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        times = {}
        for arm, d in (("forward", None), ("steps", own), ("int8", decoder)):
            ms_per_step(model, tokenizer, prompt, rows, d, tokens=4)  # warm-up
            times[arm] = ms_per_step(model, tokenizer, prompt, rows, d)
        base = times["forward"]
        print(
            f"| {rows} | {base:.1f} | {times['steps']:.1f} | {base / times['steps']:.2f}x "
            f"| {times['int8']:.1f} | {base / times['int8']:.2f}x |"
        )


if __name__ == "__main__":
    main()
