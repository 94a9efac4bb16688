"""The vLLM handoff, checked by vLLM: a LoRA run exported with `--format vllm`, served by vLLM through the
export's own serve.sh, answers as `tunelab serve` answers the same run.

    .venv/bin/python benchmarks/vllm_handoff.py RUN                   # a LoRA run (its final/ adapter)
    .venv/bin/python benchmarks/vllm_handoff.py RUN --prompts 8 --max-tokens 32

Needs a CUDA GPU and vLLM installed beside tunelab (`pip install vllm`; PyPI's wheels are CUDA builds).
Without them it says what is missing and stops: vLLM does not run on a CPU-only machine. Both servers run
on 127.0.0.1, vLLM in bf16 as it serves by default and tunelab at the same precision; the same chat
prompts (the first held-out Alpaca instructions from ../shared/data) go to both through the `openai`
client, greedy, and the script reports how many answers are the same text and, where they differ, the
common prefix in characters (bf16 kernels differ between the engines, so a late divergence is rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALPACA = Path("../shared/data/instruct/alpaca_5000.json")


def missing() -> str | None:
    """Why vLLM cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine: vLLM's PyPI builds run on GPUs only"
    if shutil.which("vllm") is None:
        return "vLLM is not installed beside tunelab (`pip install vllm`)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, process: subprocess.Popen, seconds: float) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server on port {port} exited with code {process.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"the server on port {port} did not answer within {seconds:.0f} s")


def answers(port: int, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    out = []
    for prompt in prompts:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
        )
        out.append(reply.choices[0].message.content or "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a LoRA run directory")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        print(f"vllm_handoff: not run: {reason}", file=sys.stderr)
        return
    tunelab = str(Path(sys.executable).parent / "tunelab")
    rows = json.loads(ALPACA.read_text())[-args.prompts :]
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows]
    name = Path(args.run).name
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm"
        subprocess.run([tunelab, "export", args.run, str(out), "--format", "vllm"], check=True)
        servers, ports = [], {"vllm": free_port(), "tunelab": free_port()}
        try:
            servers.append(
                subprocess.Popen(["sh", str(out / "serve.sh"), "--host", "127.0.0.1", "--port", str(ports["vllm"])])
            )
            servers.append(
                subprocess.Popen(
                    [tunelab, "serve", args.run, "--port", str(ports["tunelab"]), "--precision", "bf16"],
                    env={**os.environ},
                )
            )
            for server, port in zip(servers, ports.values()):
                wait_for(port, server, 900)
            got = {engine: answers(port, name, prompts, args.max_tokens) for engine, port in ports.items()}
        finally:
            for server in servers:
                server.terminate()
                server.wait(60)
    same = sum(a == b for a, b in zip(got["vllm"], got["tunelab"]))
    print(
        f"\n{len(prompts)} Alpaca instructions, greedy, {args.max_tokens} tokens at most: {same} answers the same text"
    )
    for prompt, a, b in zip(prompts, got["vllm"], got["tunelab"]):
        if a != b:
            common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"- differs after {common} characters: {prompt[:60]!r}\n  vLLM:    {a!r}\n  tunelab: {b!r}")


if __name__ == "__main__":
    main()
