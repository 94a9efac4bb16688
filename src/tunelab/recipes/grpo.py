"""Reinforcement learning with rewards a program computes (`method: grpo`): GRPO (Shao et al. 2024), with
DAPO's (Yu et al. 2025) and Dr. GRPO's (Liu et al. 2025) losses.

    tunelab train configs/grpo-smollm2-arithmetic.yaml
    tunelab train --resume runs/grpo-smollm2-arithmetic      # after a crash or kill: continues exactly

The policy starts from `model` (an sft run's adapter is merged first); the reference, for grpo.beta > 0,
is that starting policy, frozen (the LoRA adapter disabled). Every optimizer step, for each of
`train.batch_size` prompts:

  1. sample     G = grpo.num_generations completions at grpo.temperature, on the continuous batcher
                `tunelab serve` decodes with (the prompt computed once for its G rows; each row seeded from
                train.seed and the batch, so a resumed run samples the same), each ending at its stop token
                or after grpo.max_new_tokens;
  2. reward     each function of grpo.rewards (FILE.py:FUNCTION) scores the completions, called as TRL's
                GRPOTrainer calls it, so that a TRL reward function moves over unchanged:
                f(prompts=, completions=, completion_ids=, **the prompt rows' other columns) -> one number a
                completion, or None (the function has nothing to say about it). Prompts and completions are
                message lists for a conversational data file, strings for {"prompt": "..."} rows. The reward
                is the functions' weighted sum (grpo.reward_weights);
  3. advantage  A = (r - the group's mean) / (the group's std + 1e-4); grpo.scale_rewards batch: the batch's
                std; none: not divided (Dr. GRPO);
  4. update     per completion token, -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A), plus beta
                times the KL estimate to the reference, reduced as grpo.loss says (losses.grpo_loss). With
                grpo.num_iterations > 1, each batch of completions is trained on that many steps, the ratio
                taken against the policy that sampled them (clipping then matters). With grpo.mask_truncated,
                completions cut off at grpo.max_new_tokens are not trained on (DAPO's overlong filtering).

The loop divides a step's loss by its completions: bnpo is each micro-batch's mean over its completion
tokens, dapo the mean over all the step's completion tokens whatever train.grad_accum (as TRL computes it;
under DDP, each process's own). A step's micro-batches (train.grad_accum of them) are sampled as one decode
batch, as TRL's generation batch is, and then trained one by one: accumulation saves the update's memory
without narrowing the sampling.
Logged each log step: the reward and its spread within groups, each function's mean and spread, the groups
whose rewards are all equal (no signal), completion lengths, the truncated ones, the clipped fractions and
the KL. Each evaluation answers up to grpo.eval_prompts held-out prompts greedily and reports each function's
mean reward and the weighted one (eval_reward, the kept model's measure by default).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from tunelab.config import GRPOConfig, RunConfig
from tunelab.data.dataset import read_prompt_records, read_split, renderer_for
from tunelab.data.records import Prompt
from tunelab.errors import UserError
from tunelab.fs import atomic_write_jsonl
from tunelab.infer.decode import PrefixCache, Row, run_to_end
from tunelab.infer.generate import stop_token_ids
from tunelab.infer.prompts import encode_prompt
from tunelab.infer.sampling import Sampling
from tunelab.losses import group_advantages, grpo_loss, nanstd, weighted_rewards
from tunelab.models import resolve_model
from tunelab.models.load import merges_at_the_end, plain_model, starting_policy
from tunelab.precision import Precision, autocast, resolve_precision, training_device
from tunelab.train.objectives import ReferenceModel, SamplesItsRows, SequenceScorer
from tunelab.train.plan import BatchPlan
from tunelab.train.rewards import python_function
from tunelab.train.run import Evaluation, Parts, Run

MAX_ROWS = 64  # completions decoded at once on the continuous batcher


class Rewards:
    """grpo.rewards: Python functions with TRL's reward-function signature, and their weights."""

    def __init__(self, specs: list[str], weights: list[float] | None, columns: list[str]):
        self.columns = [c for c in columns if c not in ("prompts", "completions", "completion_ids")]  # the data's
        self.names = [spec.rpartition(":")[2] for spec in specs]
        self.functions = [python_function(spec, f"grpo.rewards[{i}]") for i, spec in enumerate(specs)]
        self.specs = specs
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(specs), dtype=torch.float32)

    def __call__(self, prompts: list[Prompt], texts: list[str], completion_ids: list[list[int]]) -> torch.Tensor:
        """(N, F): each function's reward of each completion (NaN where it returned None)."""
        given = [p.messages if p.conversational else p.messages[-1]["content"] for p in prompts]
        given = [[{"role": m["role"], "content": m["content"]} for m in g] if isinstance(g, list) else g for g in given]
        completions = [[{"role": "assistant", "content": t}] if p.conversational else t for p, t in zip(prompts, texts)]
        columns = {k: [p.columns.get(k) for p in prompts] for k in self.columns}  # None where a row has none
        out = torch.empty(len(texts), len(self.functions))
        for i, (spec, function) in enumerate(zip(self.specs, self.functions)):
            try:
                values = function(prompts=given, completions=completions, completion_ids=completion_ids, **columns)
                values = [float("nan") if v is None else float(v) for v in values]
            except Exception as e:  # the user's function: say which one and how it failed
                raise UserError(f"grpo.rewards[{i}]: {spec}: {type(e).__name__}: {e}") from None
            if len(values) != len(texts):
                raise UserError(
                    f"grpo.rewards[{i}]: {spec} returned {len(values)} rewards for {len(texts)} completions "
                    "(one number, or None, a completion)"
                )
            out[:, i] = torch.tensor(values)
        return out


class GRPOObjective(SamplesItsRows, torch.nn.Module):
    """forward(prompt_index, rollout, together) -> (the step's loss times its completions, completions, 0).

    `prompt_index` (P,): the batch's prompts; `rollout` (1,): which batch of completions this is (a batch
    trained on num_iterations steps comes num_iterations times in a row); `together`: the micro-batches of
    the step on this process, a row each (its rollout, then its prompts, -1 after them), sampled at once.
    Sampling, rewards and the loss all happen here, so that the shared loop runs GRPO as it runs every other
    method."""

    def __init__(
        self,
        policy: SequenceScorer,
        rewards: Rewards,
        tokenizer,
        prompts: list[Prompt],
        prompt_ids: list[list[int]],
        options: GRPOConfig,
        seed: int,
        grad_accum: int = 1,
    ):
        super().__init__()
        self.policy, self.rewards, self.tokenizer, self.prompts, self.options = (
            policy,
            rewards,
            tokenizer,
            prompts,
            options,
        )
        self.prompt_ids = prompt_ids  # each prompt through the chat template
        self.reference = ReferenceModel(policy) if options.beta > 0 else None
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(policy.model, tokenizer)
        self.seed = seed
        self.stats: dict[str, list[float]] = defaultdict(list)
        self.tokens = 0
        self.rollouts: dict[int, dict] = {}  # the completions being trained on, by batch
        self.kept = grad_accum  # a step's micro-batches: each comes back num_iterations times

    def forward(self, prompt_index, rollout, together):
        key = int(rollout.reshape(-1)[0])
        if key not in self.rollouts:  # the step's first micro-batch: sample for all of them at once
            step = [(int(row[0]), [i for i in row[1:] if i >= 0]) for row in together.tolist()]
            self.rollouts.update(self.roll_out(step))
            while len(self.rollouts) > self.kept:  # a step's micro-batches are kept for its repeats
                self.rollouts.pop(next(iter(self.rollouts)))
        r = self.rollouts[key]
        logps, mask = self.policy.token_log_probs(*r["batch"])
        if r["old"] is None:  # the first step on these completions: the policy that sampled them is this one
            r["old"] = logps.detach()
        total, count, stats = grpo_loss(
            logps,
            r["old"],
            r["advantages"],
            mask & r["trained"].unsqueeze(1),
            self.options.loss,
            self.options.epsilon,
            self.options.epsilon_high,
            r["reference"],
            self.options.beta,
            self.options.max_new_tokens,
        )
        rows = len(r["completions"])
        self.tokens += r["tokens"]
        for name, value in {**r["stats"], **stats}.items():
            self.stats[name].append(value)
        if self.options.loss == "dapo":  # the mean over all the step's tokens (TRL's num_items_in_batch), over
            return total * (r["step_rows"] / max(r["step_tokens"], 1.0)), rows, 0  # however many micro-batches
        return total * (rows / max(count, 1.0)), rows, 0

    # --- the parts ----------------------------------------------------------------------------------

    @torch.no_grad()
    def roll_out(self, step: list[tuple[int, list[int]]]) -> dict[int, dict]:
        """G completions of each prompt of a step's micro-batches (`(key, prompt indices)` each), sampled as
        one decode batch (TRL's generation batch: train.grad_accum divides the update, not the sampling),
        then each micro-batch's rewards and what every step on it needs, by its key."""
        g = self.options.num_generations
        started = time.perf_counter()
        # row j of a micro-batch takes seed + j, its seed from the micro-batch's key: a resumed run samples the same
        seeds = [hash((self.seed, key)) % (1 << 40) + j for key, indices in step for j in range(len(indices) * g)]
        everything = self.sample([i for _, indices in step for i in indices], g, self.options.temperature, seeds)
        sampled = sum(len(c) for _, c, _ in everything) / max(time.perf_counter() - started, 1e-9)
        out, at = {}, 0
        for key, indices in step:
            out[key] = self.rewarded(indices, everything[at : at + len(indices) * g], sampled)
            at += len(indices) * g
        rows, tokens = sum(len(r["completions"]) for r in out.values()), sum(r["trained_tokens"] for r in out.values())
        for r in out.values():
            r["step_rows"], r["step_tokens"] = rows, tokens
        return out

    def rewarded(self, indices: list[int], completions: list, sampled: float) -> dict:
        """A micro-batch's completions rewarded, with their advantages, batch, reference log-probs and stats."""
        g = self.options.num_generations
        prompts = [self.prompts[i] for i in indices for _ in range(g)]
        texts = self.texts(completions)
        per_function = self.rewards(prompts, texts, [c for _, c, _ in completions])
        rewards = weighted_rewards(per_function, self.rewards.weights)
        advantages = group_advantages(rewards, g, self.options.scale_rewards)
        batch = self.collate(completions)
        truncated = torch.tensor([not ended for _, _, ended in completions])
        trained = ~truncated if self.options.mask_truncated else torch.ones_like(truncated)
        device = batch[0].device
        reference = self.reference.tokens(self.policy, *batch) if self.reference is not None else None
        lengths = torch.tensor([len(c) for _, c, _ in completions], dtype=torch.float32)
        spreads = nanstd(rewards.view(-1, g), dim=1)
        stats = {
            "reward": float(torch.nanmean(rewards)),
            "reward_std": float(torch.nanmean(spreads)),
            "zero_std": float((spreads.nan_to_num(0.0) < 1e-6).float().mean()),
            "completion_length": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated": float(truncated.float().mean()),
            "sampled_tokens_per_s": sampled,
        }
        for name, column in zip(self.rewards.names, per_function.T):
            stats[f"reward/{name}"] = float(torch.nanmean(column))
            stats[f"reward_std/{name}"] = float(nanstd(column))
        return {
            "completions": completions,
            "batch": batch,
            "advantages": advantages.to(device),
            "trained": trained.to(device),
            "reference": reference,
            "old": None,
            "tokens": int(batch[1].sum()),
            "trained_tokens": sum(len(c) for (_, c, _), kept in zip(completions, trained.tolist()) if kept),
            "stats": stats,
        }

    @torch.no_grad()
    def sample(
        self, indices: list[int], n: int, temperature: float, seeds: list[int] | None
    ) -> list[tuple[list[int], list[int], bool]]:
        """(prompt ids, completion ids, ended at a stop token) for n completions of each prompt, in order: a
        completion keeps the stop token it wrote (the policy learns where to stop). Row r samples with
        seeds[r]; temperature 0 is greedy."""
        model = self.policy.model
        training = model.training
        model.eval()
        rows = [
            Row(
                j,
                self.prompt_ids[i],
                Sampling(
                    self.options.max_new_tokens, temperature, 1.0, seeds[j] if seeds and temperature > 0 else None
                ),
                self.tokenizer,
                self.stop_ids,
                prefix=len(self.prompt_ids[i]) if n > 1 else 0,
            )
            for j, i in enumerate(i for i in indices for _ in range(n))
        ]
        try:
            run_to_end(model, rows, MAX_ROWS, prefixes=PrefixCache() if n > 1 else None)
        finally:
            model.train(training)
        return [
            (
                row.prompt_ids,
                row.tokens + ([row.stop_token] if row.stop_token is not None else []),
                row.stop_token is not None,
            )
            for row in rows
        ]

    @torch.no_grad()
    def evaluate(self, indices: list[int]) -> dict:
        """One greedy completion per held-out prompt: each function's rewards and the weighted one."""
        completions = self.sample(indices, 1, 0.0, None)
        texts = self.texts(completions)
        per_function = self.rewards([self.prompts[i] for i in indices], texts, [c for _, c, _ in completions])
        rewards = weighted_rewards(per_function, self.rewards.weights)
        out = {
            "reward": rewards.tolist(),
            "completion_length": [float(len(c)) for _, c, _ in completions],
            "truncated": [float(not ended) for _, _, ended in completions],
            "completion": texts,
        }
        for name, column in zip(self.rewards.names, per_function.T):
            out[f"reward/{name}"] = column.tolist()
        return out


# --- the run ------------------------------------------------------------------------------------------


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run = Run(cfg, resume)
    folder = resolve_model(cfg.model)
    model, tokenizer = starting_policy(folder, cfg.tuning, cfg.train.seed, "online RL (method grpo)")
    device, options, size = training_device(), cfg.grpo, cfg.train.batch_size
    model.to(device)
    precision = resolve_precision(cfg.train.precision, device)
    tokenizer.chat_template = template = renderer_for(tokenizer, cfg.data.options()).template
    (train, train_ids), (held_out, held_out_ids) = prompts_within_length(cfg, tokenizer)
    rewards = Rewards(options.rewards, options.reward_weights, sorted({k for p in train + held_out for k in p.columns}))
    accumulate = cfg.train.grad_accum
    objective = GRPOObjective(
        SequenceScorer(model),
        rewards,
        tokenizer,
        train + held_out,
        train_ids + held_out_ids,
        options,
        cfg.train.seed,
        accumulate,
    )
    g, n = options.num_generations, options.num_iterations
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's (torchrun, accelerate launch)
    plan = repeated(
        BatchPlan.grouped(len(train), size, cfg.train.seed, lambda group: collate(group, g)), n, accumulate, processes
    )
    eval_indices = list(range(len(train), len(train) + len(held_out)))
    evaluation = held_out_rewards(objective, eval_indices, precision) if held_out else None

    def announce(loop) -> str:
        return (
            f"  GRPO ({options.loss} loss), {g} completions a prompt, rewards: {', '.join(options.rewards)}; "
            f"{len(train):,} prompts, {len(held_out):,} held out -> {loop.total_steps} steps"
            + (f" ({n} on each batch of completions)" if n > 1 else "")
            + f"; KL beta {options.beta:g}"
            + (f" to {objective.reference.kind}" if objective.reference is not None else "")
        )

    merge = merges_at_the_end(folder, model)
    return run.train(
        Parts(
            model,
            objective,
            tokenizer,
            plan,
            precision,
            announce,
            template,
            evaluation=evaluation,
            final_model=plain_model if merge else None,
            fits=False,
            summary={"train_examples": len(train)},
        )
    )


def collate(indices: list[int], g: int) -> dict:
    """A batch of prompts (their places in the objective's list), and the completions the loop divides by."""
    return {"prompt_index": torch.as_tensor(indices, dtype=torch.long), "count": len(indices) * g, "real_tokens": 0}


def repeated(plan: BatchPlan, times: int, step: int, processes: int = 1) -> BatchPlan:
    """Each optimizer step's micro-batches of `plan` (`step` on each of `processes`) `times` in a row
    (grpo.num_iterations), each tagged with its place in the run (`rollout`: the objective samples once per
    tag, from a seed the tag gives) and with the micro-batches its process runs in that step (`together`:
    a row each, its tag then its prompts, -1 after them), which the objective samples for at once."""

    def make(epoch: int) -> list[dict]:
        batches = plan.epoch(epoch)
        tagged = [{**b, "rollout": torch.tensor([epoch * len(batches) + i])} for i, b in enumerate(batches)]
        out = []
        for k in range(0, len(tagged), step * processes):
            group = tagged[k : k + step * processes]  # the loop gives process p the group's [p::processes]
            for p in range(min(processes, len(group))):
                mine = group[p::processes]
                together = torch.full((len(mine), 1 + max(len(b["prompt_index"]) for b in mine)), -1)
                for row, b in enumerate(mine):
                    together[row, 0] = b["rollout"][0]
                    together[row, 1 : 1 + len(b["prompt_index"])] = b["prompt_index"]
                for b in mine:
                    b["together"] = together
            out += group * times
        return out

    return BatchPlan(plan.items, make)


def held_out_rewards(objective: GRPOObjective, indices: list[int], precision: Precision) -> Evaluation:
    """One greedy completion per held-out prompt: the mean of each reward function and of the weighted
    reward; the end keeps every completion with its rewards in eval_samples.jsonl (and the starting
    policy's in eval_samples_start.jsonl) and adds the starting policy's reward."""
    evaluation = None

    def measure(complete: bool) -> dict:
        device = next(objective.parameters()).device
        with autocast(precision, device):
            values = objective.evaluate(indices)
        texts = values.pop("completion")
        samples = [
            {
                "prompt": objective.prompts[i].messages,
                **{k: v for k, v in objective.prompts[i].columns.items() if _plain(v)},
                "completion": text,
                **{name: values[name][j] for name in values if name.startswith("reward")},
            }
            for j, (i, text) in enumerate(zip(indices, texts))
        ]
        means = {name: _nanmean(v) for name, v in values.items()}
        return {**means, "samples": samples}

    def keep(metrics: dict, run_dir: Path) -> dict:
        atomic_write_jsonl(run_dir / "eval_samples.jsonl", metrics["samples"])
        assert evaluation is not None  # keep() runs once the Evaluation below holds it
        start = evaluation.by_step.get(0)
        if start is not None:  # the starting policy's completions, for a paired comparison (none in a run
            # resumed after step 0: an earlier process evaluated them)
            atomic_write_jsonl(run_dir / "eval_samples_start.jsonl", start["samples"])
        return {**{k: v for k, v in metrics.items() if k != "samples"}, "start_reward": start and start["reward"]}

    def report(m: dict) -> str:
        began = f" (starting policy {m['start_reward']:.4f})" if m.get("start_reward") is not None else ""
        each = ", ".join(f"{k.removeprefix('reward/')} {v:.4f}" for k, v in m.items() if k.startswith("reward/"))
        return (
            f"tunelab: held-out prompts, greedy: mean reward {m['reward']:.4f}{began}"
            + (f" ({each})" if each else "")
            + f"; mean length {m['completion_length']:.1f} tokens ({len(indices):,} prompts)"
        )

    evaluation = Evaluation(measure, report, keep)
    return evaluation


def _nanmean(values: list[float]) -> float:
    numbers = [v for v in values if v == v]  # NaN: a function had nothing to say
    return sum(numbers) / len(numbers) if numbers else float("nan")


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def prompts_within_length(cfg: RunConfig, tokenizer) -> tuple[tuple[list, list], tuple[list, list]]:
    """((training prompts, their ids), (held-out prompts, their ids)): those within data.max_length tokens
    through the chat template, grpo.eval_prompts of the held-out ones at most."""
    train, held_out = read_split(cfg.files(), read_prompt_records)
    limit = cfg.data.max_length
    fits = [(p, ids) for p in train if len(ids := encode_prompt(tokenizer, p.messages)[0].tolist()) <= limit]
    kept = [(p, ids) for p in held_out if len(ids := encode_prompt(tokenizer, p.messages)[0].tolist()) <= limit]
    kept = kept[: cfg.grpo.eval_prompts]
    if not fits:
        raise UserError(f"{cfg.data.train}: no prompt within data.max_length {limit} tokens")
    return ([p for p, _ in fits], [ids for _, ids in fits]), ([p for p, _ in kept], [ids for _, ids in kept])
