"""Load time of a registry LLM: straight from its GGUF (what transformers offers) vs tunelab's import.

    .venv/bin/python benchmarks/load_time.py            # both LLMs, 3 fresh processes per case

Each case runs in a fresh Python process, so nothing is cached in memory between them (the files
are in the OS page cache after the first run, as for any user loading a model twice). Reported:
seconds for `from_pretrained` of the model and of the tokenizer, after `import transformers`; the
first model load includes the import of the model's code, which transformers does lazily on first
use (about 3 s here, whatever the format), so a second load in the same process is shown too: that
one is the cost of the weights alone.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from tunelab.models import REGISTRY, pull

CASE = r"""
import json, sys, time
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, gguf = sys.argv[1], sys.argv[2] or None
kw = {"gguf_file": gguf} if gguf else {}
t0 = time.perf_counter(); model = AutoModelForCausalLM.from_pretrained(folder, **kw)
t1 = time.perf_counter(); tok = AutoTokenizer.from_pretrained(folder, **kw)
t2 = time.perf_counter(); AutoModelForCausalLM.from_pretrained(folder, **kw)
t3 = time.perf_counter()
print(json.dumps({"model": t1 - t0, "tokenizer": t2 - t1, "again": t3 - t2}))
"""


def measure(folder: str, gguf: str, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CASE, folder, gguf], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main(repeats: int = 3) -> None:
    print("| model | route | model load (s) | tokenizer load (s) | total (s) | model load again, same process (s) |")
    print("|---|---|---|---|---|---|")
    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        spec = REGISTRY[name]
        imported = pull(name)
        with spec.source(spec) as gguf_path:
            direct = measure(str(gguf_path.parent), gguf_path.name, repeats)
        ours = measure(str(imported), "", repeats)
        for route, t in (("GGUF via transformers", direct), ("tunelab import", ours)):
            total = t["model"] + t["tokenizer"]
            print(f"| {name} | {route} | {t['model']:.1f} | {t['tokenizer']:.1f} | {total:.1f} | {t['again']:.2f} |")
        speedup = (direct["model"] + direct["tokenizer"]) / (ours["model"] + ours["tokenizer"])
        print(f"| {name} | speed-up | | | {speedup:.1f}x | {direct['again'] / ours['again']:.0f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
