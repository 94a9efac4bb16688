"""The memory allocator a `tunelab` process runs on: jemalloc where the system has it, glibc's malloc otherwise.

A training step on the CPU allocates and frees hundreds of megabytes of activations per micro-batch.
glibc's malloc fragments under that pattern: its heap grows ~100 MB an optimizer step (SmolLM2-135M, LoRA,
512-token rows), so the loop has to hand free memory back (`train.memory.HeapCeiling`), and every page
handed back is faulted in and zeroed again by the next micro-batch: 1.7 million page faults an 8-row step,
2.8 s of system time in an 8 s step (machine C). jemalloc keeps same-sized blocks together and returns
memory by decay: on the same run, 701 against 529 tokens/s at 1,844 against 2,095 MB peak (machine C, one
run each, 12 steps; docs/instruction-tuning.md#against-trl). Intel's PyTorch-on-CPU guides recommend the
same for the same reason, and torch's own `torch.backends.xeon.run_cpu` launcher preloads it.

An allocator has to be in place before the process allocates anything, so the `tunelab` command starts
itself again with the library preloaded (`LD_PRELOAD`) when it is installed and not yet loaded (Debian
and Ubuntu: `apt-get install libjemalloc2`); every process it starts (training processes, torchrun's)
inherits it. `TUNELAB_ALLOCATOR=system` keeps glibc's malloc; `tunelab train` says which one it runs on.
"""

from __future__ import annotations

import functools
import os
import sys

LIBRARY = "libjemalloc.so.2"
FOLDERS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)
ENV = "TUNELAB_ALLOCATOR"  # "system": glibc's malloc; set to the library's path once the command restarted on it


def installed() -> str | None:
    """The path of the jemalloc library on this system, if there is one (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    for folder in FOLDERS:
        path = os.path.join(folder, LIBRARY)
        if os.path.isfile(path):
            return path
    return None


PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")  # allocators a user may preload (LD_PRELOAD) themselves


@functools.cache  # (what a process is preloaded with cannot change; an exec starts a new cache)
def running() -> str | None:
    """The preloaded allocator this process runs on ("jemalloc", or another a user preloaded), or None for
    the C library's malloc."""
    try:
        with open("/proc/self/maps") as f:
            mapped = f.read()
    except OSError:
        return None
    return next((name for name in PRELOADED if f"lib{name}" in mapped), None)


def described() -> str:
    """Which allocator this process runs on, in a few words (for a run's first lines)."""
    name = running()
    if name:
        return name
    why = "TUNELAB_ALLOCATOR=system" if os.environ.get(ENV) == "system" else "no libjemalloc2 installed"
    return f"the C library's malloc ({why})"


def restart_on_jemalloc() -> None:
    """Replace this process (`os.execve`, the same interpreter and command line) by one with jemalloc
    preloaded, where it is installed and the process runs on glibc's malloc; otherwise return. Call it
    first thing, before heavy imports: nothing of this process survives."""
    if os.environ.get(ENV) or running():  # asked for the system's, restarted already (never a loop), or preloaded
        return
    library = installed()
    if library is None:
        return
    env = dict(os.environ)
    env[ENV] = library
    env["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # (an interpreter that cannot be started again: run on as it is)
        return
