"""Several training processes on this machine: `tunelab train --processes N CONFIG` is
`torchrun --standalone --nproc_per_node N -m tunelab train CONFIG`, through torch's own elastic launcher
(what torchrun runs), with a one-line error instead of torchrun's report when a process fails.

Each process learns its rank from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR...), as under
torchrun or `accelerate launch`; a process that torch's elastic agent started (this launcher, torchrun)
dies with it (`under_launcher`), so a launcher killed outright, or a job's launcher killed with its server,
leaves no process training on.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from pathlib import Path


def launch(processes: int, argv: list[str]) -> int:
    """Run `python -m tunelab ARGV` on `processes` local processes; returns the exit status (the first
    failed process's)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun's default is one thread per process; the cores shared out is what a CPU run wants
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    # the processes say what went wrong themselves; the launcher's own log would repeat it as a traceback
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port (torchrun --standalone)
        run_id=str(uuid.uuid4()),
        max_restarts=0,  # a failed run is resumed by the user (--resume), from its last checkpoint
        monitor_interval=0.5,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "tunelab", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the root cause: the others were stopped because of it
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        signaled = f" (signal {-failure.exitcode})" if failure.exitcode < 0 else ""
        print(
            f"tunelab: process {rank} of {processes} stopped with status {failure.exitcode}{signaled}", file=sys.stderr
        )
        return code
    return 0


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent exits, however it exits (Linux): a training
    process never goes on without what started it."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        sys.exit(1)


def under_launcher() -> None:
    """In a process that torch's elastic agent started (it sets TORCHELASTIC_RUN_ID): die with the agent."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(os.getppid())


def last_error(log: Path, code: int, what: str = "training") -> str:
    """What a tunelab command that wrote `log` said last ("error: ..." for a user error), else how it ended
    (`code`: its exit status, negative for a signal)."""
    try:
        lines = [
            line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        ]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    ending = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return f"{what} stopped ({ending}); the last line of its log: {lines[-1] if lines else '(empty)'}"
