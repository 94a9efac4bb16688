"""GGUF tensor types against the f16 export, as llama.cpp computes them: file size and top-1 agreement.

    .venv/bin/python benchmarks/k_quants.py                      # SmolLM2-135M and Gemma-3-270M
    .venv/bin/python benchmarks/k_quants.py --models smollm2-135m-instruct --types q8_0 q4_k_m

Each model is exported (`tunelab export`) as f16 and as each type; llama.cpp (llama-cpp-python) reads the
first DialogSum test dialogue (its first 256 tokens) with each file, and the table gives the share of
positions where the type's top token is the f16 file's, and the file's size. q8_0 and q4_0 are written by
tunelab; q6_k, q5_k_m and q4_k_m by llama.cpp's own quantizer from the f16 file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DIALOGSUM = Path("../shared/data/summarize/dialogsum.test.jsonl")


def top_tokens(path: str, text: str) -> list[int]:
    """llama.cpp's top token at each of the text's first 256 positions."""
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=512, verbose=False, logits_all=True)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)[:256]
        llm.eval(ids)
        return [max(range(len(row)), key=row.__getitem__) for row in llm.scores[: len(ids)]]
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--types", nargs="+", default=["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"])
    args = parser.parse_args()
    from tunelab.export.model import export

    text = json.loads(DIALOGSUM.read_text().splitlines()[0])["dialogue"]
    print("| Model | Type | Size (MiB) | Top-1 agreement with f16 |\n|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            f16 = export(name, Path(folder) / f"{name}-f16.gguf", kind="f16")
            reference = top_tokens(str(f16), text)
            print(f"| {name} | f16 | {f16.stat().st_size / 2**20:.1f} | 1.000 |", flush=True)
            for kind in args.types:
                path = export(name, Path(folder) / f"{name}-{kind}.gguf", kind=kind)
                tops = top_tokens(str(path), text)
                agree = sum(a == b for a, b in zip(tops, reference)) / len(reference)
                print(f"| {name} | {kind} | {path.stat().st_size / 2**20:.1f} | {agree:.3f} |", flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
