"""A benchmark's measurement in a child process (a llama.cpp built for another CPU dies of an illegal
instruction, which must not take the other measurements of the run with it)."""

from __future__ import annotations

import json
import subprocess
import sys


def json_from_child(script: str, *args: str) -> dict | None:
    """`python SCRIPT ARGS...`'s last line of output, as JSON; None (and why, on stderr) if it failed."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"llama.cpp failed (exit {done.returncode}): {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])
