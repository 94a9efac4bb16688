"""`tunelab train` with method sft on a tiny Llama: the files a user relies on, exact accumulation and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import accelerate_train
from tiny_models import tiny_llama_dir

CONFIG = """\
method: sft
model: {model}
output_dir: {run}
data:
  train: {data}/train.jsonl
  eval: {data}/eval.jsonl
  max_length: 64
train:
  max_steps: 6
  batch_size: 2
  grad_accum: 2
  lr: 3e-3
  warmup_ratio: 0
  log_every: 1
  eval_every: 2
  save_every: 2
  precision: fp32  # exact comparisons below; `auto` would be bf16 on a CPU with AVX-512 BF16
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tiny_llama_dir(root / "model")
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}."} for i in range(60)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    return root


def config(workspace, run: Path, extra: str = "") -> Path:
    path = run.parent / f"{run.name}.yaml"
    path.write_text(CONFIG.format(model=workspace / "model", run=run, data=workspace) + extra)
    return path


def metrics(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["split"] == split]


def test_a_run_writes_what_users_rely_on_and_learns(workspace, tmp_path, tunelab_home):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    code, _, err = run_cli("train", str(config(workspace, run)), "train.max_steps=12")
    assert code == 0, err
    assert {"config.yaml", "metrics.jsonl", "loss_curve.png", "summary.json", "final", "checkpoints"} <= {
        p.name for p in run.iterdir()
    }
    train, held_out = metrics(run), metrics(run, "eval")
    assert [e["step"] for e in train] == list(range(1, 13)) and [e["step"] for e in held_out] == [0, 2, 4, 6, 8, 10, 12]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    assert all({"loss", "lr", "tokens_per_s"} <= e.keys() for e in train) and "accuracy" in held_out[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["trained_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["best_step"] == min(held_out[1:], key=lambda e: e["loss"])["step"]  # step 0: before training
    assert held_out[-1]["loss"] < held_out[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(run / "final")  # plain transformers, no tunelab
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(workspace / "model").chat_template
    best = load_file(str(run / "checkpoints" / f"step-{summary['best_step']:08d}" / "trainable.safetensors"))
    weights = dict(model.named_parameters())
    assert best.keys() == weights.keys() and all(torch.equal(weights[k], v) for k, v in best.items())  # the best step
    assert len(list((run / "checkpoints").iterdir())) <= 3  # the last 2, and the best


def test_an_existing_run_is_not_overwritten(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    assert run_cli("train", str(config(workspace, run)), "train.max_steps=2")[0] == 0
    code, _, err = run_cli("train", str(config(workspace, run)), "train.max_steps=2")
    assert code == 1 and "tunelab train --resume" in err


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def test_4_micro_batches_of_2_equal_1_of_8(workspace, tmp_path, tunelab_home):
    """The loss is averaged over the trained tokens of the whole step, not per micro-batch."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["train.max_steps=3", "train.eval_every=null", "data.eval=null", "train.save_every=null"]
    assert run_cli("train", str(config(workspace, a)), "train.batch_size=2", "train.grad_accum=4", *common)[0] == 0
    assert run_cli("train", str(config(workspace, b)), "train.batch_size=8", "train.grad_accum=1", *common)[0] == 0
    assert [e["loss"] for e in metrics(a)] == pytest.approx([e["loss"] for e in metrics(b)], abs=1e-5)
    for name, value in final_weights(a).items():
        assert torch.allclose(value, final_weights(b)[name], atol=1e-5), name


def test_resume_from_a_checkpoint_logs_the_same_losses(workspace, tmp_path, tunelab_home):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli("train", str(config(workspace, whole)))[0] == 0
    assert run_cli("train", str(config(workspace, cut)))[0] == 0
    import shutil

    shutil.rmtree(cut / "checkpoints" / "step-00000006")  # as if it had died between steps 4 and 6
    shutil.rmtree(cut / "final")
    code, _, err = run_cli("train", "--resume", str(cut))
    assert code == 0, err
    for split in ("train", "eval"):
        assert [e["step"] for e in metrics(cut, split)] == [e["step"] for e in metrics(whole, split)]
        assert [e["loss"] for e in metrics(cut, split)] == pytest.approx(
            [e["loss"] for e in metrics(whole, split)], abs=1e-6
        )


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_result(workspace, tmp_path, tunelab_home):
    extra_steps = ["train.max_steps=40", "train.save_every=5", "train.eval_every=10"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli("train", str(config(workspace, whole)), *extra_steps)[0] == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tunelab", "train", str(config(workspace, killed)), *extra_steps]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").glob("step-0000001*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()  # it really died mid-run
    code, _, err = run_cli("train", "--resume", str(killed))
    assert code == 0, err
    assert [e["loss"] for e in metrics(killed)] == pytest.approx([e["loss"] for e in metrics(whole)], abs=1e-6)
    for name, value in final_weights(killed).items():
        assert torch.allclose(value, final_weights(whole)[name], atol=1e-6), name


def test_the_tunelab_command_trains_on_jemalloc_where_installed_and_on_glibc_when_told(
    workspace, tmp_path, tunelab_home
):
    from tunelab import allocator

    if allocator.installed() is None:
        if os.environ.get("CI"):
            pytest.fail("jemalloc is not installed: .ci/run installs Debian's libjemalloc2")
        pytest.skip("the allocator test needs jemalloc: apt-get install libjemalloc2")
    said, losses = {}, {}
    for setting in ("", "system"):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
        env.update({"HF_HUB_OFFLINE": "1", **({allocator.ENV: setting} if setting else {})})
        run = tmp_path / (setting or "default")
        cmd = [sys.executable, "-m", "tunelab", "train", str(config(workspace, run)), "train.max_steps=4"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        said[setting] = next(line for line in (done.stdout + done.stderr).splitlines() if "memory allocator" in line)
        losses[setting] = [e["loss"] for e in metrics(run)]
    assert said[""].endswith("memory allocator: jemalloc")  # restarted on it, once
    assert said["system"].endswith("memory allocator: the C library's malloc (TUNELAB_ALLOCATOR=system)")
    assert losses[""] == losses["system"]  # where memory comes from changes no number


def test_lora_trains_only_the_adapter_and_final_loads_with_plain_peft(workspace, tmp_path, tunelab_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    extra = "tuning:\n  mode: lora\n  lora:\n    r: 4\n    target_modules: [q_proj, v_proj]\n"
    code, _, err = run_cli("train", str(config(workspace, run, extra)))
    assert code == 0, err
    assert (run / "final" / "adapter_config.json").exists() and not (run / "final" / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, run / "final")
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at zero: it trained
    merged = model.merge_and_unload().state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_freeze_trains_only_the_last_block_and_the_final_norm(workspace, tmp_path, tunelab_home):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "freeze"
    code, _, err = run_cli("train", str(config(workspace, run, "tuning:\n  mode: freeze\n  train_last_layers: 1\n")))
    assert code == 0, err
    before = AutoModelForCausalLM.from_pretrained(workspace / "model").state_dict()
    after = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed)
    assert any(k.startswith("model.layers.1.") for k in changed)


@pytest.fixture(scope="module")
def lora_run(workspace, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora-run") / "run"
    extra = "tuning:\n  mode: lora\n  lora:\n    r: 4\n"
    code, _, err = run_cli("train", str(config(workspace, run, extra)), "train.max_steps=4")
    assert code == 0, err
    return run


def test_generate_and_chat_take_a_run_directory(lora_run, monkeypatch):
    """`tunelab generate RUN` answers what plain transformers + peft answer (greedy) with the run's final/
    and its saved chat template; seeded sampling repeats; `tunelab chat` answers each question."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    question = "What is 2 plus 2?"
    base = json.loads((lora_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "final")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    for flags, sampling in (
        ((), {"do_sample": False}),
        (("--temperature", "1.0", "--seed", "3"), {"do_sample": True, "temperature": 1.0, "top_k": 0}),
    ):
        code, out, err = run_cli("generate", str(lora_run), question, "--max-new-tokens", "5", *flags)
        assert code == 0, err
        torch.manual_seed(3)
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, **sampling)
        assert (
            out == tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
        )  # the streamer ends the line
    lines = iter(["What is 2 plus 2?", "/reset", "And 3 plus 3?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run_cli("chat", str(lora_run), "--max-new-tokens", "4")
    assert code == 0, err
    assert out.count("model> ") == 2  # two questions answered; /reset and /exit are commands


def test_chat_keeps_the_history_through_the_training_template(lora_run):
    from tunelab.infer.chat import chat
    from tunelab.infer.sampling import Sampling
    from tunelab.models import resolve_model
    from tunelab.models.load import load_causal_lm

    model, tokenizer = load_causal_lm(resolve_model(str(lora_run)))
    seen = []
    original = tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        seen.append([m["content"] for m in messages])
        return original(messages, **kwargs)

    tokenizer.apply_chat_template = spy
    lines = iter(["first question", "second question"])

    def read(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError  # as input() does at the end of the input
        return line

    chat(model, tokenizer, Sampling(3, temperature=0.0), read=read, write=lambda *a, **k: None)
    assert seen[0] == ["first question"] and seen[1][0] == "first question" and seen[1][-1] == "second question"
    assert len(seen[1]) == 3  # question, the model's reply, the new question


def test_a_lora_run_is_portable_and_carries_a_model_card(lora_run, workspace, tmp_path, monkeypatch):
    """final/ names its base as the config named it (here a directory: its absolute path), never a cache
    path, so plain peft loads it with tunelab's cache moved away; README.md is a Hub model card."""
    import yaml
    from peft import AutoPeftModelForCausalLM

    final = lora_run / "final"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((workspace / "model").resolve())
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "no-cache-here"))
    model = AutoPeftModelForCausalLM.from_pretrained(final)
    assert model.peft_config["default"].base_model_name_or_path == base
    card = (final / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == base and front["library_name"] == "peft"
    assert {"tunelab", "sft", "lora"} <= set(front["tags"]) and front["pipeline_tag"] == "text-generation"
    summary = json.loads((lora_run / "summary.json").read_text())
    assert "## Training" in card and f"| steps | {summary['steps']} |" in card
    assert str(tmp_path) not in card and "tunelab-home" not in card  # no local cache path leaks


def test_a_registry_model_is_named_by_its_hub_name_and_found_by_it():
    from tunelab.models.resolve import portable_name, resolve_model

    assert portable_name("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == resolve_model("minilm-l6")


def test_merge_writes_a_plain_checkpoint_with_the_adapter_folded_in(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _, err = run_cli("merge", str(lora_run), str(out))
    assert code == 0, err
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base_dir = json.loads((lora_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora_run / "final")
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert run_cli("merge", str(lora_run), str(out))[0] == 1  # exists: not replaced without --force


def test_two_processes_under_accelerate_match_one_with_the_same_global_batch(workspace, tmp_path, tunelab_home):
    """2 CPU processes (gloo), 1 micro-batch of 2 each, against 1 process accumulating 2 micro-batches of 2."""
    single, double = tmp_path / "single", tmp_path / "double"
    assert run_cli("train", str(config(workspace, single)))[0] == 0
    cmd = accelerate_train(config(workspace, double), "train.grad_accum=1")
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((double / "summary.json").read_text())["processes"] == 2
    for split in ("train", "eval"):
        assert [e["loss"] for e in metrics(double, split)] == pytest.approx(
            [e["loss"] for e in metrics(single, split)], abs=1e-4
        )


def test_dora_on_all_linear_layers_trains_and_saves_a_peft_adapter(workspace, tmp_path, tunelab_home):
    run = tmp_path / "dora"
    extra = "tuning:\n  mode: lora\n  lora:\n    r: 4\n    dora: true\n    target_modules: all-linear\n"
    code, _, err = run_cli("train", str(config(workspace, run, extra)), "train.max_steps=2", "train.eval_every=null")
    assert code == 0, err
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True
    targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targets


def test_weight_average_follows_the_warmed_up_decay():
    from tunelab.train.ema import WeightAverage

    p = torch.nn.Parameter(torch.zeros(2))
    average = WeightAverage([("p", p)], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    average.update()  # d = min(0.5, 2 / 11): 0.1818 * 0 + 0.8182 * 1
    assert average.shadow[0].tolist() == pytest.approx([9 / 11] * 2)
    with torch.no_grad():
        p.fill_(3.0)
    average.update()  # d = min(0.5, 3 / 12) = 0.25
    assert average.shadow[0].tolist() == pytest.approx([0.25 * 9 / 11 + 0.75 * 3] * 2)
    with average.applied():
        assert p.tolist() == pytest.approx([0.25 * 9 / 11 + 0.75 * 3] * 2)
    assert p.tolist() == [3.0, 3.0]  # the trained weights are back


def test_a_weight_average_is_what_evaluates_and_what_final_keeps(workspace, tmp_path, tunelab_home):
    from safetensors.torch import load_file

    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    assert run_cli("train", str(config(workspace, plain)))[0] == 0
    assert run_cli("train", str(config(workspace, averaged, "  ema_decay: 0.8\n")))[0] == 0
    # the same training (identical train losses), other evaluations: those of the average
    assert [e["loss"] for e in metrics(averaged)] == pytest.approx([e["loss"] for e in metrics(plain)], abs=1e-6)
    assert [e["loss"] for e in metrics(averaged, "eval")][1:] != pytest.approx(
        [e["loss"] for e in metrics(plain, "eval")][1:]
    )
    best = json.loads((averaged / "summary.json").read_text())["best_step"]
    folder = averaged / "checkpoints" / f"step-{best:08d}"
    average, trained = load_file(str(folder / "ema.safetensors")), load_file(str(folder / "trainable.safetensors"))
    final = final_weights(averaged)
    for name, value in average.items():
        assert torch.allclose(final[name], value), name
    assert any(not torch.allclose(average[n], trained[n]) for n in average)

    import shutil

    shutil.rmtree(averaged / "checkpoints" / "step-00000006")
    shutil.rmtree(averaged / "final")
    whole_eval = [e["loss"] for e in metrics(averaged, "eval")]
    code, _, err = run_cli("train", "--resume", str(averaged))
    assert code == 0, err
    assert [e["loss"] for e in metrics(averaged, "eval")] == pytest.approx(whole_eval, abs=1e-6)


@pytest.mark.parametrize("tuning", ["mode: freeze\n  train_last_layers: 1", "mode: lora\n  lora: {r: 4}"])
def test_frozen_weights_held_in_bf16_learn_the_same_and_final_keeps_them_in_fp32(
    workspace, tmp_path, tunelab_home, tuning
):
    """Under bf16 autocast the frozen weights are held in bf16, what autocast computes with anyway: the same
    losses as with fp32 frozen weights, and what is saved keeps the pretrained fp32 values bit for bit."""
    from transformers import AutoModelForCausalLM

    runs = {}
    for held in ("compute", "fp32"):
        runs[held] = tmp_path / held
        code, _, err = run_cli(
            "train",
            str(config(workspace, runs[held], f"tuning:\n  {tuning}\n")),
            "train.precision=bf16",
            f"train.frozen_weights={held}",
            "train.max_steps=4",
        )
        assert code == 0, err
    for split in ("train", "eval"):
        assert [e["loss"] for e in metrics(runs["compute"], split)] == [e["loss"] for e in metrics(runs["fp32"], split)]
    if "freeze" in tuning:  # final/ is the whole model: its frozen first block is the pretrained one, in fp32
        before = AutoModelForCausalLM.from_pretrained(workspace / "model").state_dict()
        after = AutoModelForCausalLM.from_pretrained(runs["compute"] / "final").state_dict()
        frozen = [k for k in before if k.startswith("model.layers.0.")]
        assert frozen and all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in frozen)


def test_the_sampled_output_gradient_trains_as_the_exact_one(workspace, tmp_path, tunelab_home):
    """train.output_gradient: sampled (the default) under bf16 with LoRA: the same losses to sampling noise,
    and not the exact path by another name (an 8,192-wide output layer: every probability in the tail)."""
    wide = tiny_llama_dir(tmp_path / "wide", vocab=8192)
    losses = {}
    for gradient in ("sampled", "exact"):
        run = tmp_path / gradient
        path = config(workspace, run, "tuning:\n  mode: lora\n  lora: {r: 4}\n")
        path.write_text(path.read_text().replace(str(workspace / "model"), str(wide)))
        code, _, err = run_cli(
            "train", str(path), "train.precision=bf16", f"train.output_gradient={gradient}", "train.eval_every=6"
        )
        assert code == 0, err
        losses[gradient] = [e["loss"] for e in metrics(run)] + [metrics(run, "eval")[-1]["loss"]]
    sampled, exact = losses["sampled"], losses["exact"]
    assert sampled[0] == exact[0]  # the first step's loss is before any update: the forward is exact
    assert sampled != exact  # the updates were estimated
    assert sampled == pytest.approx(exact, rel=0.02) and sampled[-2] < sampled[0] - 0.1  # and learn the same


def test_frozen_in_compute_dtype_holds_the_frozen_linear_weights_in_bf16_and_gives_fp32_back(
    workspace, tmp_path, monkeypatch
):
    import tempfile

    from tunelab.train.frozen import FrozenInComputeDtype

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()

    model = _lora_with_a_live_adapter(workspace)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
    frozen = FrozenInComputeDtype(model, torch.bfloat16)
    with frozen:
        assert list((tmp_path / "temp").iterdir()) == []  # the fp32 file is open, its name gone: a kill leaves none
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n.endswith("base_layer.weight"))
        assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "embed" in n or "norm" in n)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(input_ids=ids).logits, expected)  # what autocast computed with, bit for bit
        with frozen.restored():
            assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
        assert model.get_parameter(next(n for n in dtypes if n.endswith("base_layer.weight"))).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.equal(p, original[n]) for n, p in model.named_parameters())
    assert frozen.file is None


def _lora_with_a_live_adapter(workspace, r: int = 4, **extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(workspace / "model"),
        LoraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM", **extra),
    )
    with torch.no_grad():  # B starts at zero; make the adapter count in the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _forward_backward(model, ids, precision):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_layers_compute_what_peft_computes(workspace):
    """The fused forward (one input cast, the low-rank product added inside the matmul) gives peft's
    outputs and adapter gradients to fp32 rounding in fp32; under bf16 autocast it is no further from the
    fp32 result than peft's own bf16 forward is."""
    from tunelab.train.fused_lora import fused_lora

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    model = _lora_with_a_live_adapter(workspace)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11, 3]])
    exact, exact_grads = _forward_backward(model, ids, "fp32")
    peft_bf16, peft_grads = _forward_backward(model, ids, "bf16")
    with fused_lora(model) as layers:
        assert layers == len([m for m in model.modules() if hasattr(m, "lora_A")])
        fused, fused_grads = _forward_backward(model, ids, "fp32")
        fused_bf16, fused_bf16_grads = _forward_backward(model, ids, "bf16")
    assert rel(fused, exact) < 1e-6
    assert all(rel(fused_grads[n], g) < 1e-5 for n, g in exact_grads.items())
    assert rel(fused_bf16, exact) < 1.5 * rel(peft_bf16, exact)
    fused_error = sum(rel(fused_bf16_grads[n], g) for n, g in exact_grads.items())
    peft_error = sum(rel(peft_grads[n], g) for n, g in exact_grads.items())
    assert 0 < fused_error < 1.5 * peft_error
    assert "forward" not in vars(next(m for m in model.modules() if hasattr(m, "lora_A")))  # peft's own again


def test_sibling_lora_layers_compute_as_one_what_each_computes_alone(workspace):
    """q, k and v (gate and up) read one input: computed as one layer, on their frozen weights side by side
    in one buffer, they give what each layer gives alone, outputs and gradients, in fp32 to rounding and
    under bf16 autocast to bf16 rounding; their weights are their own tensors again afterwards, unchanged."""
    from tunelab.train import fused_lora as module

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    model = _lora_with_a_live_adapter(workspace)
    attention = next(m for m in model.modules() if hasattr(m, "q_proj"))
    qkv = [attention.q_proj.base_layer.weight, attention.k_proj.base_layer.weight, attention.v_proj.base_layer.weight]
    before = [w.detach().clone() for w in qkv]
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11, 3]])
    computed = []
    as_one = module.Siblings._forward
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 2e-2)):
        with module.fused_lora(model, siblings=False):
            alone, alone_grads = _forward_backward(model, ids, precision)
        module.Siblings._forward = lambda self, x, names: computed.append(len(self.layers)) or as_one(self, x, names)
        try:
            with module.fused_lora(model):
                together, grads = _forward_backward(model, ids, precision)
                assert len({w.untyped_storage().data_ptr() for w in qkv}) == 1  # views of one buffer
        finally:
            module.Siblings._forward = as_one
        assert computed.count(3) == computed.count(2) == model.config.num_hidden_layers  # q/k/v, gate/up
        computed.clear()
        assert rel(together, alone) < tolerance / 10
        assert all(rel(grads[n], g) < tolerance for n, g in alone_grads.items()), precision
    assert len({w.untyped_storage().data_ptr() for w in qkv}) == 3
    assert all(torch.equal(w, b) for w, b in zip(qkv, before))


def test_siblings_fed_different_inputs_or_new_weights_still_compute_what_peft_computes(workspace, monkeypatch):
    """A layer whose siblings read another input (a cross-attention's k and v) computes alone from then on;
    weights replaced while the layers are fused (the fp32 values restored for an evaluation) are fused again
    from what they are now."""
    from tunelab.train.fused_lora import Siblings, fused_lora

    model = _lora_with_a_live_adapter(workspace)
    attention = next(m for m in model.modules() if hasattr(m, "q_proj"))
    x, other = torch.randn(1, 4, model.config.hidden_size), torch.randn(1, 4, model.config.hidden_size)
    computed, as_one = [], Siblings._forward
    monkeypatch.setattr(Siblings, "_forward", lambda self, x, names: computed.append(1) or as_one(self, x, names))
    with torch.no_grad():
        want = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(other)]
        with fused_lora(model):
            got = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(other)]
            assert len(computed) == 1
            again = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(other)]
            assert len(computed) == 1  # apart now: no work for siblings that will not take it
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip([*got, *again], [*want, *want]))
        mlp = next(m for m in model.modules() if hasattr(m, "gate_proj"))
        want = [mlp.gate_proj(x), mlp.up_proj(x)]
        with fused_lora(model):
            mlp.gate_proj(x), mlp.up_proj(x)
            for layer in (mlp.gate_proj, mlp.up_proj):
                weight = layer.base_layer.weight
                weight.data = weight.data.clone() * 2  # replaced, as an evaluation's restore does
            doubled = [mlp.gate_proj(x), mlp.up_proj(x)]
            assert mlp.gate_proj.base_layer.weight.untyped_storage().data_ptr() == (
                mlp.up_proj.base_layer.weight.untyped_storage().data_ptr()
            )
        for got_one, want_one, layer in zip(doubled, want, (mlp.gate_proj, mlp.up_proj)):
            base = torch.nn.functional.linear(x, layer.base_layer.weight / 2)
            assert torch.allclose(got_one - want_one, base, atol=1e-5)


def test_fused_lora_leaves_a_disabled_adapter_and_dora_to_peft(workspace):
    from tunelab.train.fused_lora import fused_lora

    model = _lora_with_a_live_adapter(workspace)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad(), fused_lora(model), model.disable_adapter():  # a DPO reference pass
        assert torch.equal(model(input_ids=ids).logits, base)
    dora = _lora_with_a_live_adapter(workspace, use_dora=True)
    with torch.no_grad():
        expected = dora(input_ids=ids).logits
        with fused_lora(dora):
            assert torch.equal(dora(input_ids=ids).logits, expected)


def test_a_lora_run_learns_the_same_fused_or_not(workspace, tmp_path, tunelab_home):
    """train.fused_lora changes how LoRA layers compute, not what they learn: equal losses in fp32 to
    rounding, and within bf16 noise under bf16."""
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 2e-2)):
        losses = {}
        for fused in ("true", "false"):
            run = tmp_path / f"{precision}-{fused}"
            code, _, err = run_cli(
                "train",
                str(config(workspace, run, "tuning:\n  mode: lora\n  lora: {r: 4}\n")),
                f"train.precision={precision}",
                f"train.fused_lora={fused}",
            )
            assert code == 0, err
            losses[fused] = [e["loss"] for e in metrics(run)]
        assert losses["true"] == pytest.approx(losses["false"], rel=tolerance)
        assert losses["true"][-1] < losses["true"][0]


def test_the_heap_is_trimmed_only_past_its_first_steps_size(monkeypatch):
    from tunelab.train import memory

    sizes, trims = iter([1000, 1200, 1100, 1250, 1300, 1330, 1200]), []
    monkeypatch.setattr(memory, "resident_mb", lambda: next(sizes))
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(1) or True)
    heap = memory.HeapCeiling(headroom=0.10)
    for _ in range(3):
        heap.micro_batch_done()  # the first step: 1000, 1200, 1100 -> ceiling 1320
    heap.step_done()
    assert heap.ceiling == pytest.approx(1320) and not trims
    for _ in range(4):
        heap.micro_batch_done()  # 1250, 1300: under; 1330: trimmed; 1200: under
    assert len(trims) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the RSS high-water mark resets on Linux only")
def test_peak_memory_is_measured_afresh_after_a_reset():
    from tunelab.train import memory

    block = torch.ones(2**26)  # 256 MB, touched
    before = memory.peak_memory_mb()
    del block
    memory.release_freed_memory()
    memory.reset_peak_memory()
    low = memory.peak_memory_mb()
    assert low < before - 200
    block = torch.ones(2**25)  # 128 MB: the new peak sees it
    assert memory.peak_memory_mb() - low > 100
    del block


def test_fused_lora_runs_under_inference_mode(workspace):
    from tunelab.train.fused_lora import fused_lora

    model = _lora_with_a_live_adapter(workspace)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
        with fused_lora(model), torch.inference_mode():
            assert torch.allclose(model(input_ids=ids).logits.float(), expected.float(), atol=5e-2)
