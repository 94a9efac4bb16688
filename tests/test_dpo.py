"""method: dpo on a tiny Llama: it learns a preference (held-out implicit-reward accuracy and log-prob gap
rise), the LoRA reference (adapter disabled) is the frozen starting model, SimPO trains without a
reference, the OpenAI DPO and ShareGPT layouts train, and resume continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DATA, eval_entries, resume_from_an_earlier_checkpoint, run_cli
from helpers import preference_pairs
from tiny_models import tiny_llama_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    tiny_llama_dir(root / "llama")
    tiny_llama_dir(root / "llama-long", positions=2048)  # dpo_en_demo spelled out by the tiny tokenizer
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(48, 0)))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(12, 1)))
    return root


def write_config(root: Path, run: Path, extra: str = "", tuning: str = "full", lr: float = 1e-3) -> Path:
    path = run.with_suffix(".yaml")
    path.write_text(f"""method: dpo
model: {root / "llama"}
output_dir: {run}
data: {{train: {root / "train.jsonl"}, eval: {root / "eval.jsonl"}, max_length: 64}}
tuning: {{mode: {tuning}}}
train: {{epochs: 6, batch_size: 8, lr: {lr}, warmup_ratio: 0, eval_every: 6, save_every: 6, log_every: 6,
         best_metric: eval_accuracy, precision: fp32}}
{extra}""")
    return path


@pytest.mark.parametrize(
    "tuning, lr, extra", [("full", 1e-3, ""), ("lora", 1e-2, "dpo: {precompute_reference: false}")]
)
def test_dpo_raises_held_out_implicit_reward_accuracy_and_the_log_prob_gap(
    workspace, tmp_path, tunelab_home, tuning, lr, extra
):
    run = tmp_path / "run"
    code, _, err = run_cli("train", str(write_config(workspace, run, extra, tuning, lr)))
    assert code == 0, err
    evals = eval_entries(run)
    start = evals[0]
    assert start["step"] == 0 and start["accuracy"] == 0.0 and start["margin"] == pytest.approx(0.0, abs=1e-5)
    assert start["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0): the policy is its reference
    final = json.loads((run / "eval_metrics.json").read_text())
    assert final["accuracy"] > 0.9 and final["margin"] > 0.1 and final["loss"] < 0.6
    assert final["logps_gap"] > start["logps_gap"] + 1.0
    assert {"chosen", "rejected", "logps_chosen", "logps_rejected"} <= final.keys()
    assert (run / "reference_logps.safetensors").exists() == (extra == "")
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["method"] == "dpo"
        and summary["train_examples"] == 48
        and summary["eval"]["accuracy"] == final["accuracy"]
    )
    # final/ is what plain transformers (+ peft for an adapter) loads
    assert (run / "final" / ("adapter_config.json" if tuning == "lora" else "config.json")).exists()


def test_the_lora_reference_is_the_frozen_starting_model(workspace):
    from transformers import AutoModelForCausalLM

    from tunelab.config import RunConfig
    from tunelab.models.load import starting_policy
    from tunelab.models.tuning import apply_tuning
    from tunelab.recipes.dpo import PreferenceObjective
    from tunelab.train.objectives import ReferenceModel as Reference

    cfg = RunConfig.model_validate(
        {
            "method": "dpo",
            "model": str(workspace / "llama"),
            "data": {"train": "x"},
            "tuning": {"mode": "lora", "lora": {"r": 4}},
        }
    )
    policy, tokenizer = starting_policy(workspace / "llama", cfg.tuning, cfg.train.seed, "dpo")
    with torch.no_grad():  # move the adapter away from its zero start, as training does
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    objective = PreferenceObjective(policy, "sigmoid", 0.1)
    reference = Reference(objective)
    frozen = PreferenceObjective(AutoModelForCausalLM.from_pretrained(workspace / "llama").eval(), "sigmoid", 0.1)
    batch = tokenizer(
        ["it was good and fine", "the plot was dull but the acting was very nice"], padding=True, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        by_reference = reference(objective, batch["input_ids"], batch["attention_mask"], labels)
        by_copy = frozen.log_probs(batch["input_ids"], batch["attention_mask"], labels)[0]
        by_policy = objective.log_probs(batch["input_ids"], batch["attention_mask"], labels)[0]
    assert torch.allclose(by_reference, by_copy, atol=1e-5)
    assert not torch.allclose(by_policy, by_copy, atol=1e-2)  # the adapter is on again afterwards
    assert reference.frozen is None  # no second copy of the model with LoRA
    assert (
        Reference(
            PreferenceObjective(
                apply_tuning(frozen.model, cfg.model_copy(update={"tuning": type(cfg.tuning)()}).tuning), "sigmoid", 0.1
            )
        ).frozen
        is not None
    )


def test_the_simpo_objective_equals_a_hand_computation_on_the_models_token_log_probs(workspace):
    """SimPO's loss for a batch of pairs, from a plain forward pass: each response's mean token log-prob
    (log_softmax of the logits at the positions before its tokens), then -log sigmoid(beta * (c - r) - gamma)."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.batching import collate_pairs
    from tunelab.data.render import Example
    from tunelab.recipes.dpo import PreferenceObjective

    model = AutoModelForCausalLM.from_pretrained(workspace / "llama").eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace / "llama")
    prompt = tokenizer("what was the movie like").input_ids

    def example(response: str) -> Example:
        ids = tokenizer(" " + response).input_ids
        return Example(prompt + ids, [-100] * len(prompt) + ids)

    pairs = [
        (example("it was good and fine"), example("it was bad")),
        (example("very nice"), example("it was dull and ugly")),
    ]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    beta, gamma = 2.0, 0.5
    with torch.no_grad():
        loss, count, right = PreferenceObjective(model, "simpo", beta, gamma)(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        means = []
        for e in [c for c, _ in pairs] + [r for _, r in pairs]:
            logps = model(torch.tensor([e.input_ids])).logits[0].log_softmax(-1)
            tokens = [(t - 1, y) for t, y in enumerate(e.labels) if y != -100]
            means.append(sum(float(logps[t, y]) for t, y in tokens) / len(tokens))
    expected = [-math.log(1 / (1 + math.exp(-(beta * (means[i] - means[i + 2]) - gamma)))) for i in range(2)]
    assert count == 2 and right == sum(means[i] > means[i + 2] for i in range(2))
    assert loss.item() == pytest.approx(sum(expected), abs=1e-4)


def test_simpo_trains_without_a_reference(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    code, _, err = run_cli("train", str(write_config(workspace, run, "dpo: {loss: simpo, beta: 2.0, gamma: 0.5}")))
    assert code == 0, err
    assert "reference: none" in err and not (run / "reference_logps.safetensors").exists()
    evals = eval_entries(run)
    assert evals[-1]["accuracy"] > 0.9 and evals[-1]["loss"] < evals[0]["loss"]


@pytest.mark.parametrize("name, fmt", [("openai_dpo", "openai_dpo"), ("dpo_en_demo", "sharegpt_preference")])
def test_dpo_trains_on_the_openai_dpo_and_sharegpt_layouts(workspace, tmp_path, tunelab_home, name, fmt):
    if name == "dpo_en_demo":
        from tunelab.data.formats import load_records
        from tunelab.data.records import Preference

        data = DATA / "preference" / "dpo_en_demo.json"
        records, problems = load_records(str(data), "auto")
        assert len(records) == 300 and not problems and all(isinstance(r, Preference) for r in records)
        assert records[0].prompt[0]["role"] == "user" and records[0].chosen.startswith("That sounds like a fun")
    else:
        data = tmp_path / "openai.jsonl"
        data.write_text(
            "".join(
                json.dumps(
                    {
                        "input": {"messages": [{"role": "user", "content": r["prompt"]}]},
                        "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
                        "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}],
                    }
                )
                + "\n"
                for r in preference_pairs(20, 2)
            )
        )
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(f"""method: dpo
model: {workspace / "llama-long"}
output_dir: {run}
data: {{train: {data}, format: {fmt}, eval_split: 4, max_examples: 16, max_length: 2048, truncation: keep_response}}
train: {{max_steps: 2, batch_size: 4, lr: 1.0e-3, eval_every: 2, precision: fp32}}
""")
    code, _, err = run_cli("train", str(config))
    assert code == 0, err
    trained = json.loads((run / "summary.json").read_text())["train_examples"]
    assert trained == 16 if fmt == "openai_dpo" else trained >= 14  # a dpo_en_demo answer may pass 2,048 letters
    assert eval_entries(run)[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_a_dpo_run_resumes_to_the_same_evaluations(workspace, tmp_path, tunelab_home):
    run = tmp_path / "run"
    assert run_cli("train", str(write_config(workspace, run)))[0] == 0
    whole = eval_entries(run)
    resumed = resume_from_an_earlier_checkpoint(run)
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in whole], abs=1e-6)


def test_dpo_config_errors_name_their_keys(workspace, tmp_path):
    config = write_config(workspace, tmp_path / "run", "dpo: {loss: ipo}")
    code, _, err = run_cli("train", str(config))
    assert code != 0 and "dpo.loss: 'ipo' is not one of: sigmoid, simpo" in err and "Traceback" not in err
    config = tmp_path / "sft.yaml"
    config.write_text(f"method: sft\nmodel: {workspace / 'llama'}\ndata: {{train: x.jsonl}}\ndpo: {{beta: 0.5}}\n")
    code, _, err = run_cli("train", str(config))
    assert code != 0 and "dpo: only used with method: dpo" in err


def test_dpo_starts_from_an_sft_run_with_its_adapter_merged(workspace, tmp_path, tunelab_home):
    """model: a LoRA sft run. The policy and its reference are the instruction-tuned model (the step-0
    loss is log 2), and final/ is a merged checkpoint: the adapter's own base lacks the sft update."""
    from transformers import AutoModelForCausalLM

    chats = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
        for r in preference_pairs(16, 3)
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (tmp_path / "sft.yaml").write_text(f"""method: sft
model: {workspace / "llama"}
output_dir: {tmp_path / "sft"}
data: {{train: {tmp_path / "sft.jsonl"}, max_length: 64}}
tuning: {{mode: lora, lora: {{r: 4}}}}
train: {{max_steps: 3, batch_size: 4, lr: 1.0e-2, precision: fp32}}
""")
    assert run_cli("train", str(tmp_path / "sft.yaml"))[0] == 0
    assert (tmp_path / "sft" / "final" / "adapter_config.json").exists()
    run = tmp_path / "run"
    config = write_config(workspace, run, tuning="lora", lr=1e-2)
    code, _, err = run_cli("train", str(config), f"model={tmp_path / 'sft'}", "train.epochs=1")
    assert code == 0, err
    assert eval_entries(run)[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert not (run / "final" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(workspace / "llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged.state_dict()[name], base.state_dict()[name])
