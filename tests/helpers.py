"""What several test modules share: a free port, a live server, a run directory written by hand,
preference pairs with an obvious preference, a chat template that takes tools with a tool for it, and a
tokenizer whose text is the token ids (for the batcher on random models)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict
from tiny_models import WORDS

GOOD, BAD = WORDS[:6], WORDS[6:12]  # "good great fine ..." against "bad awful poor ..."


class Server:
    """`tunelab serve MODEL --data-dir DATA FLAGS` in a subprocess on a free port of 127.0.0.1, and the official
    `openai` client for it (with `key`); its log beside DATA."""

    def __init__(self, model: Path, data: Path, *flags: str, key: str = "unused"):
        self.port, self.data = free_port(), data
        tunelab = Path(sys.executable).parent / "tunelab"
        self.log = open(data.parent / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [str(tunelab), "serve", str(model), "--port", str(self.port), "--data-dir", str(data), *flags],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        )
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert self.process.poll() is None, (data.parent / f"server-{self.port}.log").read_text()
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.log.close()


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


class IdsTokenizer:
    """What the batcher needs of a tokenizer, the text being the token ids: a random model's answers compared
    token by token."""

    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def completion_text(stream, started: threading.Event | None = None) -> str:
    """The text of a streamed completion (the `openai` client's chunks); `started` is set at its first chunk."""
    text = ""
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        if started is not None:
            started.set()
    return text


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


def wandb_records(folder: Path) -> list:
    """The records of the one offline W&B run under `folder` (or of one .wandb file), read from its .wandb
    file: W&B's records
    (its protobuf schema, `wandb.proto`) in LevelDB's log framing (32 KiB blocks, a 7-byte header per
    chunk: CRC-32, length, type), after W&B's own 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    [path] = [folder] if folder.suffix == ".wandb" else folder.glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    chunks, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        left = 32768 - offset % 32768
        if left < 7:  # a block's tail too short for a header is padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL, or the LAST of FIRST/MIDDLE/LAST
            chunks.append(pending)
            pending = b""
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def wandb_history(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The numbers of an offline W&B run's history records, at the run's own step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in wandb_records(folder):
        if record.WhichOneof("record_type") != "history":
            continue
        values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = values.pop("train/global_step", None)
        for key, value in values.items():
            if step is not None and isinstance(value, (int, float)) and not key.startswith("_"):
                out.setdefault(key, []).append((step, float(value)))
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux: /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def running(pid: int) -> bool:
    """Whether process `pid` still runs: a zombie has ended (an orphan's is reaped by init, which here
    takes seconds)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
