"""What the benchmarks against TRL (sft_vs_trl.py, grpo_vs_trl.py) share: their command-line options, and a
TRL run in a fresh process of its own (so that its peak RSS is its own)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def add_options(parser: argparse.ArgumentParser, example: str) -> None:
    """--no-trl, --sweep and --set KEY=VALUE (`example`: an override worth showing in the help)."""
    parser.add_argument("--no-trl", action="store_true", help="tunelab only (to check a change quickly)")
    parser.add_argument("--sweep", action="store_true", help="also the TRL settings that were not its best")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a tunelab config override ({example})",
    )


def run_trl(script: str, tmp: Path, setting: dict, *arguments, cwd: Path | None = None) -> dict:
    """`python -c script ARGUMENTS OUT SETTING` in a fresh process (OUT: a new folder under `tmp` for the
    trainer's output); the JSON object its last line prints. A failure ends the benchmark with its stderr."""
    out = tmp / f"trl-{len(list(tmp.glob('trl-*')))}"
    cmd = [sys.executable, "-c", script, *map(str, arguments), str(out), json.dumps(setting)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        sys.exit(f"TRL run {setting} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
