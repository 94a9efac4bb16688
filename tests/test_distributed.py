"""Training on several processes (CPU, gloo): FSDP and DDP through `tunelab train --processes N`, against
one process with the same global batch; a kill -9 mid-run resumed; memory; two simulated hosts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import preference_pairs
from safetensors.torch import load_file
from test_classify import toy_rows
from tiny_models import tiny_bert_dir, tiny_llama_dir, tiny_t5_dir

CONFIG = """\
method: sft
model: {model}
output_dir: {run}
data:
  train: {data}/train.jsonl
  eval: {data}/eval.jsonl
  max_length: 64
train:
  epochs: 1
  batch_size: 2
  grad_accum: 2
  lr: 3e-3
  warmup_ratio: 0
  log_every: 1
  eval_every: 4
  save_every: 4
  precision: fp32  # exact comparisons below
"""
LORA = "tuning:\n  mode: lora\n  lora:\n    r: 4\n    target_modules: all-linear\n"


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}  # (as the tunelab_home fixture has set it)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    tiny_llama_dir(root / "model")  # tied embeddings: the head is the embedding table
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."} for i in range(60)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    return root


def config(workspace: Path, run: Path, extra: str = "") -> Path:
    path = run.parent / f"{run.name}.yaml"
    path.write_text(CONFIG.format(model=workspace / "model", run=run, data=workspace) + extra)
    return path


def metrics(run: Path, split: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["split"] == split]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run / "final" / "adapter_config.json").exists() else "model.safetensors"
    return load_file(str(run / "final" / name))


def train(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`tunelab train ARGV` in a subprocess (a launcher must not share the test's process)."""
    cmd = [sys.executable, "-m", "tunelab", "train", *argv]
    return subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=timeout)


def assert_same_run(run: Path, reference: Path, tolerance: float = 1e-4) -> None:
    for split in ("train", "eval"):
        assert [e["step"] for e in metrics(run, split)] == [e["step"] for e in metrics(reference, split)]
        assert [e["loss"] for e in metrics(run, split)] == pytest.approx(
            [e["loss"] for e in metrics(reference, split)], abs=tolerance
        )
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.allclose(value, theirs[name], atol=tolerance), name


def one_and_two_processes(config: Path, root: Path) -> tuple[Path, Path]:
    """`config` trained on one process with its grad_accum of 2, and under FSDP on two with 1: the two runs,
    checked equal."""
    one, two = root / "one", root / "two"
    code, _, err = run_cli("train", str(config), f"output_dir={one}")
    assert code == 0, err
    done = train("--processes", "2", str(config), f"output_dir={two}", "train.grad_accum=1", "train.distributed=fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(two, one)
    return one, two


@pytest.fixture(scope="module")
def one_process(workspace, tmp_path_factory):
    """The one-process runs the others must equal: 2 micro-batches of 2 accumulated per step."""
    root = tmp_path_factory.mktemp("one")
    runs = {"full": root / "full", "lora": root / "lora"}
    for mode, run in runs.items():
        code, _, err = run_cli("train", str(config(workspace, run, LORA if mode == "lora" else "")))
        assert code == 0, err
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "distributed, mode", [("fsdp", "full"), ("fsdp", "lora"), ("ddp", "lora")], ids=["fsdp-full", "fsdp-lora", "ddp"]
)
def test_two_processes_equal_one_with_the_same_global_batch(
    workspace, one_process, tmp_path, tunelab_home, distributed, mode
):
    """1 micro-batch of 2 on each of 2 processes against 2 accumulated on one; the epoch's last step has one
    micro-batch (23 of them), so one process has none there and runs only to keep step (FSDP)."""
    run = tmp_path / "run"
    tracked = ["--report-to", "tensorboard"] if distributed == "ddp" else []  # logged by the main process alone
    done = train("--processes", "2", str(config(workspace, run, LORA if mode == "lora" else "")),
                 "train.grad_accum=1", f"train.distributed={distributed}", *tracked)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, one_process[mode])
    if tracked:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        losses = [(e["step"], e["loss"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["split"] == "train"]  # fmt: skip
        logged = events.Scalars("train/loss")  # (TensorBoard keeps float32)
        assert [e.step for e in logged] == [s for s, _ in losses]
        assert [e.value for e in logged] == pytest.approx([v for _, v in losses], rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == distributed and summary["steps"] == 12
    assert len(summary["peak_memory_mb_per_process"]) == 2
    if mode == "lora":  # a plain peft adapter, as one process writes it
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "model"), run / "final")
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(run / "final")
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    if distributed == "fsdp":  # each process's shards, as torch.distributed.checkpoint writes them
        assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "trainable.safetensors").exists()
    else:
        assert (checkpoint / "trainable.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_killed_with_sigkill_resumes_to_the_uninterrupted_run(workspace, one_process, tmp_path, tunelab_home):
    """kill -9 of one process: the launcher stops the other; --resume goes on from the gathered checkpoint."""
    run = tmp_path / "killed"
    extra = ["train.grad_accum=1", "train.distributed=fsdp", "train.save_every=2"]
    cmd = [sys.executable, "-m", "tunelab", "train", "--processes", "2", str(config(workspace, run)), *extra]
    launcher = subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((run / "checkpoints").glob("step-00000004")):
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "stopped with status -9 (signal 9)" in err, err[-2000:]
    assert not (run / "final").exists()  # it really died mid-run
    for worker in workers:  # none trains on
        assert subprocess.run(["kill", "-0", worker], capture_output=True).returncode != 0
    done = train("--resume", str(run), "--processes", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, one_process["full"])


@pytest.mark.slow
def test_fsdp_holds_less_per_process_than_ddp_in_full_fine_tuning(tmp_path, tunelab_home):
    """A 100M-parameter Llama (fp32 weights 400 MB, AdamW's moments 800 MB, gradients 400 MB): DDP holds all
    of it in each process, FSDP half. Measured as each process's peak resident memory (about 2,600 MB
    against 1,750-1,850 MB on a 2-core AVX2 machine)."""
    from tiny_tokenizer import chat_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    )  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    peaks = {}
    for distributed in ("ddp", "fsdp"):
        run = tmp_path / distributed
        path = tmp_path / f"{distributed}.yaml"
        path.write_text(f"method: sft\nmodel: {tmp_path / 'model'}\noutput_dir: {run}\n"
                        f"data: {{train: {tmp_path / 'train.jsonl'}, max_length: 32}}\n"
                        "train: {max_steps: 2, batch_size: 2, precision: fp32}\n")  # fmt: skip
        done = train("--processes", "2", str(path), f"train.distributed={distributed}")
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[distributed] = json.loads((run / "summary.json").read_text())["peak_memory_mb_per_process"]
    print(f"peak memory per process, MB: {peaks}; FSDP/DDP {max(peaks['fsdp']) / min(peaks['ddp']):.2f}")
    assert max(peaks["fsdp"]) < min(peaks["ddp"]) - 400  # half of the 1,600 MB of state, less slack


@pytest.mark.slow
def test_a_classifier_under_fsdp_evaluates_and_writes_the_one_process_model(tmp_path, tunelab_home):
    """Every process runs the method's own evaluation (its forward passes gather the weights); final/ is
    the LoRA merged into a plain model made from the gathered weights. Dropout off: each process draws its
    own masks, so with dropout the runs agree in distribution, not number for number."""
    from transformers import pipeline

    tiny_bert_dir(tmp_path / "bert")
    settings = json.loads((tmp_path / "bert" / "config.json").read_text())
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (tmp_path / "bert" / "config.json").write_text(json.dumps(settings))
    for name, n, seed in (("train", 96, 0), ("dev", 32, 1)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed)))
    path = tmp_path / "classify.yaml"
    path.write_text(f"""method: classify
model: {tmp_path / "bert"}
data: {{train: {tmp_path / "train.jsonl"}, eval: {tmp_path / "dev.jsonl"}, max_length: 32}}
tuning: {{mode: lora, lora: {{r: 4}}}}
train: {{epochs: 6, batch_size: 8, grad_accum: 2, lr: 3.0e-3, warmup_ratio: 0, eval_every: 6, precision: fp32}}
""")
    one, two = one_and_two_processes(path, tmp_path)
    ours, theirs = (json.loads((run / "eval_metrics.json").read_text()) for run in (two, one))
    assert ours["confusion"] == theirs["confusion"] and ours["macro_f1"] == pytest.approx(theirs["macro_f1"])
    assert (two / "confusion_matrix.png").is_file()
    classifier = pipeline("text-classification", model=str(two / "final"))  # merged: plain transformers
    assert classifier("the movie was great")[0]["label"] in {"pos", "neg"}


def test_what_does_not_run_sharded_is_refused_in_the_users_terms(workspace, tmp_path, tunelab_home):
    done = train("--processes", "2", str(config(workspace, tmp_path / "run")), "train.distributed=fsdp",
                 "train.ema_decay=0.99")  # fmt: skip
    assert done.returncode == 1
    assert "error: train.ema_decay: the weight average is not kept under train.distributed fsdp" in done.stderr
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    code, _, err = run_cli("train", "--processes", "0", str(config(workspace, tmp_path / "zero")))
    assert code == 1 and "--processes: expected at least 1, got 0" in err


NAMESPACES = ("tunelab-host-a", "tunelab-host-b")
ADDRESSES = ("10.231.0.1", "10.231.0.2")


def make_hosts() -> str | None:
    """Two network namespaces joined by a veth pair, each with its own address: two "hosts". Returns why
    they cannot be made here (not root, no iproute2, no namespaces), or None."""
    if shutil.which("ip") is None and os.environ.get("CI"):
        pytest.fail("iproute2 is not installed: .ci/run installs it")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 to make network namespaces"
    remove_hosts()
    steps = [
        ["ip", "netns", "add", NAMESPACES[0]],
        ["ip", "netns", "add", NAMESPACES[1]],
        ["ip", "link", "add", "tlveth-a", "type", "veth", "peer", "name", "tlveth-b"],
        ["ip", "link", "set", "tlveth-a", "netns", NAMESPACES[0]],
        ["ip", "link", "set", "tlveth-b", "netns", NAMESPACES[1]],
    ]
    for namespace, link, address in zip(NAMESPACES, ("tlveth-a", "tlveth-b"), ADDRESSES):
        steps += [
            ["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", link],
            ["ip", "-n", namespace, "link", "set", link, "up"],
            ["ip", "-n", namespace, "link", "set", "lo", "up"],
        ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            remove_hosts()
            return f"cannot make network namespaces here ({' '.join(step)}: {done.stderr.strip()})"
    return None


def remove_hosts() -> None:
    for namespace in NAMESPACES:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # its veth end goes with it


@pytest.mark.slow
def test_fsdp_across_two_simulated_hosts_equals_one_process(workspace, one_process, tmp_path, tunelab_home):
    """Two network namespaces as two machines, one process each, torchrun's c10d rendezvous on the first:
    the multi-node command a cluster runs, with gloo over the veth link between them."""
    why = make_hosts()
    if why:
        pytest.skip(why)
    try:
        run = tmp_path / "hosts"
        path = config(workspace, run, LORA)
        port = 29400 + os.getpid() % 500  # inside the namespaces: nothing else listens there
        launchers = []
        for rank, (namespace, address, link) in enumerate(zip(NAMESPACES, ADDRESSES, ("tlveth-a", "tlveth-b"))):
            cmd = ["ip", "netns", "exec", namespace, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{ADDRESSES[0]}:{port}", "--rdzv_id", "hosts",
                   # the first host serves the rendezvous: torchrun finds that by the host name, which both
                   # namespaces share with this machine, so it is said outright
                   "--rdzv_conf", f"is_host={'true' if rank == 0 else 'false'}",
                   "--local_addr", address, "-m", "tunelab", "train", str(path),
                   "train.grad_accum=1", "train.distributed=fsdp"]  # fmt: skip
            env = {**environment(), "GLOO_SOCKET_IFNAME": link, "OMP_NUM_THREADS": "1"}
            launchers.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
        assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
        assert_same_run(run, one_process["lora"])
        assert json.loads((run / "summary.json").read_text())["processes"] == 2
    finally:
        remove_hosts()


def no_dropout(model: Path) -> Path:
    """Each process draws its own dropout masks: for a number-for-number comparison, none."""
    settings = json.loads((model / "config.json").read_text())
    settings.update({key: 0.0 for key in settings if "dropout" in key and isinstance(settings[key], float)})
    (model / "config.json").write_text(json.dumps(settings))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "task-t5"])
def test_the_other_methods_under_fsdp_equal_one_process(tmp_path, tunelab_home, method):
    """DPO (LoRA, the reference the adapter switched off at each step) and a T5 learning pairs scored by
    generation (every process generates, for the gathers): the one-process run's losses and metrics."""
    if method == "dpo":
        tiny_llama_dir(tmp_path / "model")
        for name, n, seed in (("train", 32, 0), ("eval", 8, 1)):
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(n, seed)))
        head = "method: dpo\ntuning: {mode: lora}\ndpo: {precompute_reference: false}\n"
        train_cfg = "epochs: 2, batch_size: 4, grad_accum: 2, lr: 1.0e-2, best_metric: eval_accuracy"
    else:
        no_dropout(tiny_t5_dir(tmp_path / "model"))
        rows = [{"source": f"say {word}", "target": word} for word in ("paris", "madrid", "berlin", "rome")]
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 6))
        (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = "method: task\ngeneration: {max_new_tokens: 6}\n"
        train_cfg = "epochs: 4, batch_size: 4, grad_accum: 2, lr: 5.0e-3, best_metric: eval_rougeL"
    path = tmp_path / "run.yaml"
    path.write_text(
        f"{head}model: {tmp_path / 'model'}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, eval: {tmp_path / 'eval.jsonl'}, max_length: 64}}\n"
        f"train: {{{train_cfg}, warmup_ratio: 0, eval_every: 3, log_every: 1, precision: fp32}}\n"
    )
    one, two = one_and_two_processes(path, tmp_path)
    ours, theirs = (json.loads((run / "eval_metrics.json").read_text()) for run in (two, one))
    numbers = {k: v for k, v in theirs.items() if isinstance(v, float)}
    assert numbers and {k: ours[k] for k in numbers} == pytest.approx(numbers, abs=1e-4)
