"""How the job runner starts a job's training: `tunelab train` in a subprocess, on one process (the
default), on N processes of this machine (`tunelab serve --job-processes N`: `tunelab train --processes N`),
or through a launch command the operator sets (`--job-launch TEMPLATE`), so that the jobs API hands its
work to what a cluster already runs: Slurm's `srun`, torchrun with a rendezvous endpoint across machines.

A template is a shell command line (run by /bin/sh, as the operator wrote it) with these placeholders:

    {python}      this server's Python interpreter
    {processes}   --job-processes: the training processes the command starts, in all
    {args}        tunelab's arguments (`train CONFIG` or `train --resume RUN`), quoted for the shell

    --job-launch 'exec {python} -m torch.distributed.run --standalone --nproc_per_node {processes} -m tunelab {args}'

The runner stops a job by signalling the command's process group; with `exec`, the launcher is the
process the runner started and dies with the server, as a one-process job does.
"""

from __future__ import annotations

import shlex
import string
import sys
from dataclasses import dataclass

from tunelab.errors import UserError

PLACEHOLDERS = ("python", "processes", "args")


@dataclass(frozen=True)
class JobLaunch:
    processes: int = 1
    template: str | None = None

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise UserError(f"--job-processes {self.processes}: expected a whole number of at least 1")
        if self.template is None:
            return
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(self.template) if field is not None]
        except ValueError as e:
            raise UserError(f"--job-launch: {e} (write a literal brace as {{{{ or }}}})") from None
        unknown = sorted({field for field in fields if field not in PLACEHOLDERS})
        if unknown:
            raise UserError(
                f"--job-launch: unknown placeholder {{{unknown[0]}}}; the template may use "
                + ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
            )
        if "args" not in fields:
            raise UserError("--job-launch: the template must pass {args} (the job's `tunelab train` arguments) on")

    def command(self, args: list[str]) -> list[str]:
        """The command line that runs `tunelab ARGS` as this launch says."""
        if self.template is None:
            processes = ["--processes", str(self.processes)] if self.processes > 1 else []
            return [sys.executable, "-m", "tunelab", *args, *processes]
        line = self.template.format(python=shlex.quote(sys.executable), processes=self.processes, args=shlex.join(args))
        return ["/bin/sh", "-c", line]
