"""method: rlhf on a tiny Llama with a rule-based reward (response length toward a target): the policy
learns it (the held-out mean reward rises) with the KL to its reference logged and bounded; RLOO's
leave-one-out advantages are right; the reward can be a reward run; resume continues exactly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import eval_entries, resume_from_an_earlier_checkpoint, run_cli
from helpers import accelerate_train
from tiny_models import tiny_llama_dir

TARGET = 6  # characters


REWARDS = f'''
def length(prompts, responses):
    """Closer to {TARGET} characters is better."""
    return [-abs(len(r) - {TARGET}) / 10 for r in responses]


def broken(prompts, responses):
    return [1.0]
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rlhf")
    tiny_llama_dir(root / "llama")
    (root / "rewards.py").write_text(REWARDS)
    topics = ["the sea", "France", "Paris", "a cat", "Berlin", "the mat", "Spain", "Madrid"]
    prompts = [{"prompt": f"Write about {t}, please."} for t in topics * 4]
    (root / "prompts.jsonl").write_text("".join(json.dumps(c) + "\n" for c in prompts))
    return root


def write_config(root: Path, run: Path, reward: str | None = None, extra: str = "") -> Path:
    path = run.with_suffix(".yaml")
    path.write_text(f"""method: rlhf
model: {root / "llama"}
output_dir: {run}
data: {{train: {root / "prompts.jsonl"}, eval_split: 8, max_length: 64}}
rlhf: {{reward_model: "{reward or str(root / "rewards.py") + ":length"}", samples_per_prompt: 4, max_new_tokens: 8,
        kl_coef: 0.01, max_kl: 50.0, eval_prompts: 8}}
train: {{max_steps: 32, batch_size: 4, lr: 3.0e-2, warmup_ratio: 0, eval_every: 16, save_every: 16, log_every: 4,
         precision: fp32}}
{extra}""")
    return path


def test_rlhf_learns_a_rule_based_reward_within_the_kl_bound(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    code, _, err = run_cli("train", str(write_config(workspace, run)))
    assert code == 0, err
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if e["split"] == "train"]
    assert {"reward", "kl", "penalised_reward", "response_length", "entropy"} <= train[0].keys()
    evals = eval_entries(run)
    assert evals[0]["step"] == 0 and evals[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is its reference
    final = json.loads((run / "eval_metrics.json").read_text())
    assert final["start_reward"] == pytest.approx(evals[0]["reward"], abs=1e-5)
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in samples] == pytest.approx([-abs(len(s["response"]) - TARGET) / 10 for s in samples])
    assert final["reward"] == pytest.approx(sum(s["reward"] for s in samples) / len(samples), abs=1e-6)
    assert final["reward"] > evals[0]["reward"] + 0.5  # learnt: responses moved toward 6 characters
    assert train[-1]["reward"] > train[0]["reward"] + 0.5
    assert 0 < final["kl"] <= 50.0 and final["within_kl_bound"]
    assert (run / "final" / "config.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    # tokens/s counts prompt and sampled tokens: ~21 prompt tokens a row here, and up to 8 sampled ones
    assert summary["trained_responses"] == 32 * 16 and summary["tokens"] > summary["trained_responses"] * 24


def test_an_evaluation_over_the_kl_bound_is_never_the_kept_model(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    code, _, err = run_cli("train", str(write_config(workspace, run)), "rlhf.max_kl=1.0e-6")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] is None and summary["final_model"] == "the last step"
    assert summary["eval"]["within_kl_bound"] is False and summary["warning"] is None
    assert "no evaluation after step 0 kept the KL within rlhf.max_kl" in err


def test_a_reward_run_scores_the_responses(workspace, tmp_path, tunelab_home):
    """The policy trains against a one-output sequence classifier saved as a reward run would save it: each
    held-out sample's reward is what plain transformers scores for the conversation through the scorer's
    own chat template, and the evaluation's reward is their mean."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = tmp_path / "scorer"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(workspace / "llama", num_labels=1).save_pretrained(scorer)
    AutoTokenizer.from_pretrained(workspace / "llama").save_pretrained(scorer)
    run = tmp_path / "run"
    code, _, err = run_cli(
        "train", str(write_config(workspace, run, str(scorer))), "train.max_steps=4", "train.eval_every=4"
    )
    assert code == 0, err
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["prompt"][-1]["role"] == "user" for s in samples)
    model = AutoModelForSequenceClassification.from_pretrained(scorer).eval()
    tokenizer = AutoTokenizer.from_pretrained(scorer)
    with torch.no_grad():
        for s in samples:
            ids = tokenizer.apply_chat_template(
                s["prompt"] + [{"role": "assistant", "content": s["response"]}], return_tensors="pt", return_dict=True
            )["input_ids"]
            assert model(input_ids=ids).logits[0, 0].item() == pytest.approx(s["reward"], abs=1e-4)
    final = json.loads((run / "eval_metrics.json").read_text())
    assert final["reward"] == pytest.approx(sum(s["reward"] for s in samples) / 8, abs=1e-6)
    assert len({s["reward"] for s in samples}) > 1  # the scores depend on the responses


def test_an_rlhf_run_resumes_to_the_same_evaluations(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    assert run_cli("train", str(write_config(workspace, run)))[0] == 0
    whole = eval_entries(run)
    resumed = resume_from_an_earlier_checkpoint(run)
    assert [e["reward"] for e in resumed] == pytest.approx([e["reward"] for e in whole], abs=1e-6)
    assert [e["kl"] for e in resumed] == pytest.approx([e["kl"] for e in whole], abs=1e-5)


@pytest.mark.parametrize(
    "reward, message",
    [
        ("missing.py:length", "missing.py: no such file"),
        ("REWARDS:nothing", "has no function 'nothing'"),
        ("REWARDS:broken", "returned 1 values for 8 responses"),
    ],
)
def test_reward_function_problems_are_one_line_errors(workspace, tmp_path, tunelab_home, reward, message):
    reward = reward.replace("REWARDS", str(workspace / "rewards.py"))
    code, _, err = run_cli("train", str(write_config(workspace, tmp_path / "run", reward)))
    assert code != 0 and message in err and "Traceback" not in err


def test_rlhf_needs_a_reward_model(workspace, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"method: rlhf\nmodel: {workspace / 'llama'}\ndata: {{train: x.jsonl}}\n")
    code, _, err = run_cli("train", str(config))
    assert code != 0 and "rlhf.reward_model: method rlhf needs a reward model" in err


@pytest.mark.slow
def test_rlhf_runs_under_accelerate_with_two_processes(workspace, tmp_path, tunelab_home):
    """2 CPU processes (gloo): each samples for its own prompts; the step metrics are averaged over both."""
    run = tmp_path / "run"
    cmd = accelerate_train(
        write_config(workspace, run),
        "train.batch_size=2",
        "train.max_steps=8",
        "train.eval_every=4",
        "train.save_every=4",
    )
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["trained_responses"] == 8 * 2 * 2 * 4
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward", "kl", "entropy"} <= e.keys() for e in train if e["split"] == "train")
