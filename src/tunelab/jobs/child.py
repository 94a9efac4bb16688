"""Starts a job's `tunelab train` so that it dies with the server that started it.

    python -m tunelab.jobs.child SERVER_PID -- python -m tunelab train CONFIG

On Linux the kernel sends the child SIGKILL when the server's runner thread exits, however it exits
(a kill -9 included): a job never trains on without the server that watches it; the restarted server
resumes it from its last checkpoint. Then it replaces itself with the command (exec), keeping its pid.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[argv.index("--") + 1 :]
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the server died before the line above: nothing is watching
        sys.exit(1)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
