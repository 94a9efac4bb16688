"""lm-evaluation-harness through `tunelab serve`, against lm-eval's own `hf` backend on the same model.

    .venv/bin/python benchmarks/lm_eval_serve.py                       # 200 SST-2 sentences, SmolLM2-135M
    .venv/bin/python benchmarks/lm_eval_serve.py --docs 100 --concurrent 1 8

The same multiple-choice task (SST-2 dev sentences from ../shared/data, "positive" or "negative" scored
by log-likelihood: two requests a sentence) runs with lm-eval 0.4.13's `hf` backend (what a user runs
without a server; batch size 1 and 8) and with `local-completions` against `tunelab serve` (a subprocess
on 127.0.0.1; token-id prompts, `echo` + `logprobs`, at lm-eval's defaults, with 1 and 8 concurrent
requests). Reported, all in one run on one machine: requests/s (log-likelihood requests over the
evaluation's wall time) and the accuracy, which must be the same for every row.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SST2 = Path("../shared/data/classify/sst2/dev.tsv")
MODEL = "smollm2-135m-instruct"
TASK = """\
task: sst2_bench
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
"""


def task_folder(docs: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tunelab-lm-eval-"))
    with SST2.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:docs]
    data = folder / "sst2.jsonl"
    data.write_text(
        "".join(json.dumps({"sentence": r["sentence"].strip(), "label": int(r["label"])}) + "\n" for r in rows)
    )
    (folder / "sst2.yaml").write_text(TASK.format(data=data))
    return folder


def evaluate(model: str, model_args: dict, tasks: Path, batch_size: int = 1) -> tuple[float, float, int]:
    """(seconds, accuracy, requests) of one lm-eval run."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["sst2_bench"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=batch_size,
        random_seed=0,
    )
    seconds = time.perf_counter() - started
    samples = out["results"]["sst2_bench"]["sample_len"]
    return seconds, out["results"]["sst2_bench"]["acc,none"], 2 * samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--concurrent", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hf-batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    from tunelab.models import pull

    folder, tasks = pull(MODEL), task_folder(args.docs)
    rows = []
    for size in args.hf_batch:
        seconds, acc, n = evaluate("hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu"}, tasks, size)
        rows.append((f"lm-eval `hf` backend, batch size {size}", seconds, acc, n))
    port = free_port()
    tunelab = Path(sys.executable).parent / "tunelab"
    server = subprocess.Popen(
        [str(tunelab), "serve", MODEL, "--port", str(port), "--precision", "fp32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ},
    )
    try:
        print(server.stdout.readline().strip(), file=sys.stderr)
        url = f"http://127.0.0.1:{port}/v1/completions"
        for concurrent in args.concurrent:
            model_args = {"model": MODEL, "base_url": url, "tokenizer": str(folder), "num_concurrent": concurrent}
            seconds, acc, n = evaluate("local-completions", model_args, tasks)
            rows.append((f"lm-eval `local-completions` -> `tunelab serve`, {concurrent} concurrent", seconds, acc, n))
    finally:
        server.terminate()
        server.wait(30)
    base = rows[0][3] / rows[0][1]
    print(f"\n{args.docs} SST-2 sentences ({rows[0][3]} log-likelihood requests), {MODEL}, fp32\n")
    print("| Run | Requests/s | vs hf batch 1 | Accuracy |\n|---|---:|---:|---:|")
    for name, seconds, acc, n in rows:
        print(f"| {name} | {n / seconds:.1f} | {n / seconds / base:.2f}x | {acc:.4f} |")


if __name__ == "__main__":
    main()
