"""What several test modules share: a free port, a live server, a run directory written by hand,
preference pairs with an obvious preference, and a chat template that takes tools with a tool for it."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict
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


# Hermes / Qwen2.5's way of showing tools and writing calls (<tool_call>), for a tiny model's tokenizer
HERMES = (
    "{%- if tools %}<|im_start|>system\nYou may call functions:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}}},
    },
}


class WeatherArguments(BaseModel):  # WEATHER's parameters, to validate what the model wrote
    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Rome"]
    unit: Literal["celsius", "fahrenheit"]
