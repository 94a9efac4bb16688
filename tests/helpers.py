"""What several test modules share: a free port, a live server, a run directory written by hand, and
preference pairs with an obvious preference."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from tiny_models import WORDS

GOOD, BAD = WORDS[:6], WORDS[6:12]  # "good great fine ..." against "bad awful poor ..."


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live(app):
    """The app served by uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def write_run(folder: Path, method: str, model: str, lr: float, losses: list[float], finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    config = {
        "method": method,
        "model": model,
        "output_dir": str(folder),
        "data": {"train": "train.jsonl"},
        "tuning": {"mode": "lora"},
        "train": {"lr": lr, "epochs": 1},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {"step": i + 1, "split": "train", "loss": loss, "lr": lr, "tokens": 100 * (i + 1), "tokens_per_s": 50.0}
        for i, loss in enumerate(losses)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (folder / "summary.json").write_text(
            json.dumps(
                {
                    "steps": len(losses),
                    "planned_steps": len(losses),
                    "best_eval_loss": min(losses),
                    "tokens_per_s": 50.0,
                    "wall_seconds": 12.0,
                }
            )
        )
    return folder


def preference_pairs(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [
        {
            "prompt": f"what was the {rng.choice(['movie', 'film', 'plot'])} like",
            "chosen": f"it was {rng.choice(GOOD)} and {rng.choice(GOOD)}",
            "rejected": f"it was {rng.choice(BAD)} and {rng.choice(BAD)}",
        }
        for _ in range(n)
    ]


def wait_until(condition, seconds: float = 60.0, what: str = "the condition", every: float = 0.1):
    """`condition()`'s first true value, polled every `every` seconds; an AssertionError after `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} did not come within {seconds} s")


def accelerate_train(config: Path, *overrides: str, processes: int = 2) -> list[str]:
    """The command that runs `tunelab train CONFIG` under `accelerate launch` on `processes` CPU processes (gloo)."""
    import sys

    launcher = Path(sys.executable).parent / "accelerate"
    return [str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "tunelab", "train", str(config), *overrides]  # fmt: skip
