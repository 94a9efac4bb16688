"""Starts a job's `tunelab train` so that it dies with the server that started it.

    python -m tunelab.jobs.child SERVER_PID -- python -m tunelab train CONFIG

On Linux the kernel sends the child SIGKILL when the server's runner thread exits, however it exits
(a kill -9 included): a job never trains on without the server that watches it; the restarted server
resumes it from its last checkpoint. Then it replaces itself with the command (exec), keeping its pid.
"""

from __future__ import annotations

import os
import sys

from tunelab.launch import die_with_parent


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[argv.index("--") + 1 :]
    die_with_parent(parent)  # (kept across the exec)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
