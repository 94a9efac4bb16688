"""A progress bar for work counted in items, with tokens/s and an ETA: on stderr, silent off a terminal
(a log file gets no bar), gone when the work is done."""

from __future__ import annotations

import time


class TokenProgress:
    """with TokenProgress("generating", total=len(prompts)) as bar: ... bar.advance(items, tokens)"""

    def __init__(self, description: str, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task(description, total=total, speed="")
        self.tokens, self.started = 0, time.perf_counter()

    def __enter__(self) -> TokenProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, items: int, tokens: int) -> None:
        self.tokens += tokens
        speed = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=items, speed=f"{speed:,.0f} tok/s")
