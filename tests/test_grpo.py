"""GRPO's pieces against TRL 1.16's own: the advantages (TRL's formula over its nanstd), and the loss with
its gradients for each reduction, TRL's GRPOTrainer._compute_loss run on the same model, completions,
rewards and old and reference log-probs (a stand-in trainer holding only the settings it reads)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.data.render import IGNORE
from tunelab.losses import group_advantages, grpo_loss, nanstd, token_log_probs, weighted_rewards


def test_group_advantages_are_trls_for_each_scaling():
    from trl.trainer.utils import nanstd as trl_nanstd

    torch.manual_seed(0)
    per_function = torch.randn(12, 2)
    per_function[3, 0] = float("nan")  # one function had nothing to say about one completion
    per_function[7] = float("nan")  # nothing could score this one
    weights = torch.tensor([1.0, 0.5])
    rewards = weighted_rewards(per_function, weights)
    expected = (per_function * weights).nansum(1)
    expected[7] = float("nan")
    torch.testing.assert_close(rewards, expected, equal_nan=True)
    assert rewards[3] == pytest.approx(0.5 * per_function[3, 1].item())
    grouped = rewards.view(-1, 4)
    centred = rewards - torch.nanmean(grouped, dim=1).repeat_interleave(4)
    assert torch.allclose(nanstd(rewards), trl_nanstd(rewards), equal_nan=True)
    for scale, std in (
        ("group", trl_nanstd(grouped, dim=1).repeat_interleave(4)),
        ("batch", trl_nanstd(rewards).expand_as(rewards)),
        ("none", None),
    ):
        want = torch.nan_to_num(centred if std is None else centred / (std + 1e-4), nan=0.0)
        torch.testing.assert_close(group_advantages(rewards, 4, scale), want)
    assert group_advantages(rewards, 4)[7] == 0  # unscorable: no signal
    assert group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0] * 4  # one reward a group: none


def _trl_loss(kind: str, per_token_logps, inputs: dict, beta: float, max_completion_length: int):
    """TRL's GRPOTrainer._compute_loss on a stand-in trainer: the model's per-token log-probs as given."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction="sum": t,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            per_token_logps,
            torch.zeros_like(per_token_logps),
            None,
        ),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=kind,
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_the_loss_and_its_gradients_are_trls(kind, beta, tmp_path):
    """Four completions of different lengths for one prompt, sampled by an older policy (num_iterations > 1:
    ratios away from 1, some clipped), with DAPO's clip-higher (epsilon 0.2, epsilon_high 0.28)."""
    from tiny_models import tiny_llama_dir
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(tmp_path / "llama"))
    rows, prompt, width, longest = 4, 5, 7, 8
    prompt_ids = torch.randint(5, 60, (1, prompt)).repeat(rows, 1)
    completion_ids = torch.randint(5, 60, (rows, width))
    completion_mask = torch.ones(rows, width, dtype=torch.long)
    for row, length in enumerate((7, 5, 3, 6)):
        completion_mask[row, length:] = 0
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0]), rows)
    old = torch.randn(rows, width) * 0.3  # an older policy's log-probs, relative to the current's
    ref = torch.randn(rows, width) * 0.3

    def logps_now():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)

    plain = logps_now()
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": plain.detach() + old,
        "ref_per_token_logps": plain.detach() + ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    trl, metrics = _trl_loss(kind, plain, inputs, beta, longest)
    trl.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # tunelab: the log-probs through the chunked, checkpointed head, the loss summed and divided by its count
    labels = torch.cat(
        [torch.full_like(prompt_ids, IGNORE), completion_ids.masked_fill(completion_mask == 0, IGNORE)], 1
    )
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    logps, mask = token_log_probs(hidden, model.lm_head, labels, chunk=3)
    torch.testing.assert_close(logps[mask], plain.detach()[completion_mask.bool()], atol=1e-5, rtol=1e-5)
    shift = prompt - 1  # position t of the (B, T-1) layout predicts token t + 1: completions start at prompt - 1
    old_full, ref_full = torch.zeros_like(logps), torch.zeros_like(logps)
    old_full[:, shift:] = inputs["old_per_token_logps"]
    ref_full[:, shift:] = inputs["ref_per_token_logps"]
    total, count, stats = grpo_loss(
        logps,
        old_full,
        advantages,
        mask,
        kind,
        epsilon=0.2,
        epsilon_high=0.28,
        ref_logps=ref_full,
        beta=beta,
        max_length=longest,
    )
    loss = total / count
    loss.backward()
    assert loss.item() == pytest.approx(trl.item(), abs=1e-5)
    for ours, theirs in zip((p.grad for p in model.parameters()), trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert stats["clip_low"] == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-6)
    assert stats["clip_high"] == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-6)
    assert stats["clip"] == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-6)
    assert 0 < stats["clip"] < 1  # the ratios exercise the clipping
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"], abs=1e-6)


# --- method: grpo, end to end on a tiny Llama ----------------------------------------------------------

TARGET = 6  # characters

REWARDS = f'''
def length(completions, **kwargs):
    """TRL's signature, conversational completions: closer to {TARGET} characters is better."""
    return [-abs(len(c[0]["content"]) - {TARGET}) / 10 for c in completions]


def names_the_answer(prompts, completions, completion_ids, answer, **kwargs):
    """A column of the data file reaches the function; None: nothing to say about that completion."""
    return [None if a is None else float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def plain_length(prompts, completions, **kwargs):
    assert all(isinstance(p, str) for p in prompts) and all(isinstance(c, str) for c in completions)
    return [-abs(len(c) - {TARGET}) / 10 for c in completions]


def broken(completions, **kwargs):
    return [1.0]
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import json

    from tiny_models import tiny_llama_dir

    root = tmp_path_factory.mktemp("grpo")
    tiny_llama_dir(root / "llama")
    (root / "rewards.py").write_text(REWARDS)
    topics = ["the sea", "France", "Paris", "a cat", "Berlin", "the mat", "Spain", "Madrid"]
    rows = [
        {"prompt": [{"role": "user", "content": f"Write about {t}, please."}], **({"answer": "a"} if i % 2 else {})}
        for i, t in enumerate(topics * 4)
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "plain.jsonl").write_text("".join(json.dumps({"prompt": f"Write about {t}."}) + "\n" for t in topics * 4))
    return root


def grpo_config(root, run, rewards: str = "length", extra: str = "", data: str = "prompts.jsonl"):
    path = run.with_suffix(".yaml")
    functions = ", ".join(f'"{root / "rewards.py"}:{name}"' for name in rewards.split(","))
    path.write_text(f"""method: grpo
model: {root / "llama"}
output_dir: {run}
data: {{train: {root / data}, eval_split: 8, max_length: 64}}
grpo: {{rewards: [{functions}], num_generations: 4, max_new_tokens: 8, eval_prompts: 8}}
train: {{max_steps: 32, batch_size: 4, lr: 3.0e-2, warmup_ratio: 0, eval_every: 16, save_every: 16, log_every: 4,
         precision: fp32}}
{extra}""")
    return path


def test_grpo_learns_a_reward_function_with_trls_signature(workspace, tmp_path, tunelab_home):
    import json

    from conftest import eval_entries, run_cli

    run = tmp_path / "run"
    code, _, err = run_cli("train", str(grpo_config(workspace, run, "length,names_the_answer")))
    assert code == 0, err
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in train if e["split"] == "train"]
    assert {"reward", "reward_std", "reward/length", "reward/names_the_answer", "completion_length", "clip"} <= train[
        0
    ].keys()
    evals = eval_entries(run)
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    for s in samples:  # each held-out completion's rewards are the functions' own
        assert s["reward/length"] == pytest.approx(-abs(len(s["completion"]) - TARGET) / 10)
        if "answer" in s:
            assert s["reward/names_the_answer"] == float("a" in s["completion"])
        else:
            assert s["reward/names_the_answer"] != s["reward/names_the_answer"]  # NaN: nothing to say
    final = json.loads((run / "eval_metrics.json").read_text())
    assert final["start_reward"] == pytest.approx(evals[0]["reward"], abs=1e-6)
    start = [json.loads(line) for line in (run / "eval_samples_start.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in start] == [s["prompt"] for s in samples]  # the same problems, paired
    assert sum(s["reward/length"] for s in start) / 8 == pytest.approx(evals[0]["reward/length"], abs=1e-6)
    assert final["reward"] > evals[0]["reward"] + 0.5  # learnt: shorter completions, naming the answer
    assert (run / "final" / "config.json").exists()


def test_string_prompts_give_the_functions_strings(workspace, tmp_path, tunelab_home):
    from conftest import run_cli

    run = tmp_path / "run"
    code, _, err = run_cli(
        "train", str(grpo_config(workspace, run, "plain_length", data="plain.jsonl")), "train.max_steps=2"
    )
    assert code == 0, err


def test_a_grpo_run_resumes_to_the_same_evaluations(workspace, tmp_path, tunelab_home):
    """With two steps on each batch of completions and DAPO's clip-higher: the ratio matters, and resuming
    from a checkpoint samples and trains exactly as the run did."""
    import json

    from conftest import eval_entries, resume_from_an_earlier_checkpoint, run_cli

    run = tmp_path / "run"
    extra = "grpo.num_iterations=2", "grpo.epsilon_high=0.28", "grpo.beta=0.04"
    assert run_cli("train", str(grpo_config(workspace, run)), *extra)[0] == 0

    def steps():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [
            v for e in rows if e["split"] == "train" for v in (e["step"], e["loss"], e["reward"], e["clip"], e["kl"])
        ]

    whole, trained = eval_entries(run), steps()
    assert any(clip > 0 for clip in trained[3::5])  # the second step on a batch moves the ratio
    resumed = resume_from_an_earlier_checkpoint(run)
    assert [e["reward"] for e in resumed] == pytest.approx([e["reward"] for e in whole], abs=1e-6)
    assert steps() == pytest.approx(trained, abs=1e-5)  # the same samples, losses, clipping and KL after the checkpoint


@pytest.mark.parametrize(
    "rewards, message",
    [
        ("nothing", "has no function 'nothing'"),
        ("broken", "returned 1 rewards for 8 completions"),
    ],
)
def test_reward_function_problems_are_one_line_errors(workspace, tmp_path, tunelab_home, rewards, message):
    from conftest import run_cli

    code, _, err = run_cli("train", str(grpo_config(workspace, tmp_path / "run", rewards)))
    assert code != 0 and message in err and "Traceback" not in err


def test_grpo_config_mistakes_are_named_by_key(workspace, tmp_path):
    from conftest import run_cli

    config = tmp_path / "c.yaml"
    config.write_text(f"method: grpo\nmodel: {workspace / 'llama'}\ndata: {{train: x.jsonl}}\n")
    code, _, err = run_cli("train", str(config))
    assert code != 0 and "grpo.rewards: method grpo needs reward functions" in err
    code, _, err = run_cli(
        "train", str(grpo_config(workspace, tmp_path / "run")), "grpo.num_iterations=3", "grpo.reward_weights=[1, 2]"
    )
    assert code != 0 and "train.save_every: a multiple of grpo.num_iterations (3)" in err
    assert "grpo.reward_weights: one weight a reward function: 1 functions, 2 weights" in err


def test_truncated_completions_are_not_trained_on_when_masked(workspace, tmp_path, tunelab_home):
    """DAPO's overlong filtering: with 2 new tokens every completion is cut off, so nothing trains."""
    import json

    from conftest import run_cli

    run = tmp_path / "run"
    masked = "grpo.mask_truncated=true", "grpo.max_new_tokens=2", "train.max_steps=2", "train.log_every=1"
    code, _, err = run_cli("train", str(grpo_config(workspace, run)), *masked)
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in rows if e["split"] == "train"]
    assert [e["truncated"] for e in train] == [1.0, 1.0]
    assert all(e["loss"] == 0 and e["grad_norm"] == 0 for e in train)


def test_a_steps_micro_batches_are_sampled_at_once_as_each_alone_would_be(
    workspace, tmp_path, tunelab_home, monkeypatch
):
    """train.grad_accum divides the update, not the sampling: the 4 micro-batches of 1 prompt a step are one
    decode batch of 16 rows (TRL's generation batch), and a micro-batch's completions are those it samples alone."""
    from conftest import run_cli

    from tunelab.recipes.grpo import GRPOObjective

    original, calls = GRPOObjective.sample, []

    def sample(self, indices, n, temperature, seeds):
        out = original(self, indices, n, temperature, seeds)
        if seeds is not None:
            calls.append(len(indices))
            if len(calls) == 1:  # the second micro-batch's prompt, sampled on its own with its own seeds
                assert original(self, indices[1:2], n, temperature, seeds[n : 2 * n]) == out[n : 2 * n]
        return out

    monkeypatch.setattr(GRPOObjective, "sample", sample)
    split = "train.batch_size=1", "train.grad_accum=4", "train.max_steps=3", "train.save_every=null"
    code, _, err = run_cli("train", str(grpo_config(workspace, tmp_path / "run")), *split)
    assert code == 0, err
    assert calls == [4, 4, 4]  # one decode batch a step, of its 4 prompts x 4 completions


def test_dapos_loss_is_the_mean_over_the_steps_tokens_across_micro_batches(
    workspace, tmp_path, tunelab_home, monkeypatch
):
    """As TRL's (num_items_in_batch): with 4 micro-batches a step, the first step's loss (ratio 1, no KL: each
    token's loss is -A) is -sum(A x length) / sum(length) over all 16 completions, not a mean of the
    micro-batches' own token means."""
    import json

    from conftest import run_cli

    from tunelab.recipes.grpo import GRPOObjective

    original, seen = GRPOObjective.rewarded, []

    def rewarded(self, indices, completions, sampled):
        out = original(self, indices, completions, sampled)
        seen.append((out["advantages"].tolist(), [len(c) for _, c, _ in completions]))
        return out

    monkeypatch.setattr(GRPOObjective, "rewarded", rewarded)
    run = tmp_path / "run"
    split = "train.batch_size=1", "train.grad_accum=4", "train.max_steps=1", "train.log_every=1"
    longer = "grpo.max_new_tokens=64", "data.max_length=160", "train.eval_every=null", "train.save_every=null"
    assert run_cli("train", str(grpo_config(workspace, run)), *split, *longer)[0] == 0
    step = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = next(e["loss"] for e in step if e["split"] == "train")
    pairs = [(a, n) for advantages, lengths in seen[:4] for a, n in zip(advantages, lengths)]
    expected = -sum(a * n for a, n in pairs) / sum(n for _, n in pairs)
    per_micro_batch = sum(-sum(a * n for a, n in zip(*m)) / sum(m[1]) for m in seen[:4]) / 4
    assert abs(expected - per_micro_batch) > 1e-4  # the micro-batches' token counts differ: the test can tell
    assert loss == pytest.approx(expected, abs=1e-5)


def test_each_process_samples_its_own_micro_batches_of_a_step():
    """Under DDP the loop gives process p the step's micro-batches [p::processes]: each micro-batch's
    `together` lists those of its own process, and a repeated step (grpo.num_iterations) is the whole step."""
    from tunelab.recipes.grpo import collate, repeated
    from tunelab.train.plan import BatchPlan

    plan = repeated(BatchPlan.grouped(24, 2, 0, lambda group: collate(group, 4)), 2, 3, processes=2)
    batches = plan.epoch(0)
    assert len(batches) == 24  # 12 micro-batches, each step's 6 twice
    first = batches[:6]
    assert [int(b["rollout"][0]) for b in batches[6:12]] == [int(b["rollout"][0]) for b in first]
    for p in (0, 1):
        mine = first[p::2]
        keys = [int(b["rollout"][0]) for b in mine]
        for b in mine:
            assert b["together"][:, 0].tolist() == keys
            assert [row[1:].tolist() for row in b["together"]] == [m["prompt_index"].tolist() for m in mine]


def test_the_arithmetic_task_is_right_and_its_test_problems_unseen(tmp_path):
    """benchmarks/grpo_arithmetic.py: every answer is its expression's value, no test expression is trained
    on, and its reward functions (TRL's signature) score what they say."""
    import importlib.util
    import json
    import re
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "grpo_arithmetic.py"
    spec = importlib.util.spec_from_file_location("grpo_arithmetic", path)
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    assert task.build(tmp_path) == {"test.jsonl": 200, "train.jsonl": 3000}
    expressions = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        expressions[split] = set()
        for row in rows:
            text = re.fullmatch(
                r"What is ([\d +-]+)\? End your reply with 'Answer: N', where N is the number\.", row["prompt"]
            )[1]
            tokens = text.split()
            value = int(tokens[0])
            for sign, number in zip(tokens[1::2], tokens[2::2]):
                value += int(number) if sign == "+" else -int(number)
            assert str(value) == row["answer"] and value >= 0
            expressions[split].add(text)
    assert len(expressions["test"]) == 200 and not expressions["test"] & expressions["train"]
    said = [
        [{"role": "assistant", "content": text}]
        for text in ("17 + 29 = 46. Answer: 46", "46, or maybe 45", "Answer: 47")
    ]
    assert task.correct(said, answer=["46", "46", "46"]) == [1.0, 0.0, 0.0]
    assert task.formatted(said) == [1.0, 0.0, 1.0]
    assert task.correct(["It is 46"], answer=["46"]) == [1.0]  # a string prompt's completions are strings
