"""Online RL from a reward model (`method: rlhf`): RLOO with a KL penalty to the starting policy.

    tunelab train configs/rlhf-smollm2.yaml
    tunelab train --resume runs/rlhf-smollm2            # after a crash or kill: continues exactly

The policy starts from `model` (an instruction-tuned model, or an sft run: its adapter is merged
first) and the reference is that starting policy, frozen: the LoRA adapter disabled, or else a frozen
copy. Every optimizer step, for each of `train.batch_size` prompts:

  1. sample   the policy writes k = rlhf.samples_per_prompt responses (temperature 1: the policy's own
              distribution), each ending at EOS or after rlhf.max_new_tokens;
  2. score    the reward model scores each conversation (prompt + response): a tunelab reward run or
              any one-output sequence classifier, rendered through its own chat template; or a Python
              function, rlhf.reward_model: FILE.py:NAME, called as NAME(prompts, responses) -> numbers,
              where prompts are message lists and responses strings;
  3. penalise r' = r - kl_coef * KL, with KL = sum over the response of log pi(y_t) - log ref(y_t), the
              sampled estimate of KL(pi || ref) for that response (InstructGPT's per-response penalty);
  4. baseline A_i = r'_i - mean of r'_j over the group's other k - 1 responses (RLOO, Ahmadian et al.
              2024): no value network, and the advantage is unbiased;
  5. update   loss = -A_i * log pi(y_i) (the summed response log-prob), averaged over the responses:
              the REINFORCE gradient of the penalised reward. One update per sample (on-policy), so the
              PPO ratio would be 1 and its clipping a no-op; it is left out.

Each logged step reports the mean reward, the KL, the penalised reward, the response length and the
policy's per-token entropy. Each evaluation samples one response (seeded: the same noise every time)
to each of rlhf.eval_prompts held-out prompts and reports their mean reward and KL; the kept model is
the evaluation with the highest reward whose KL is within rlhf.max_kl. The shared loop does the
rest: accumulation, schedule, clipping, checkpoints and an exact resume (the sampling RNG is part of
the checkpoint).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.data.records import Chat, Preference, Prompt, message
from tunelab.data.batching import collate_padded
from tunelab.data.render import IGNORE, Example
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text
from tunelab.losses import mean_token_entropy, sequence_log_probs
from tunelab.recipes.classify import plain_model
from tunelab.recipes.common import (
    check_new_run,
    final_step,
    read_records,
    restore_best,
    run_loop,
    split_records,
    starting_policy,
    write_final,
    write_summary,
)
from tunelab.recipes.dpo import Reference
from tunelab.train.causal_lm import SequenceScorer
from tunelab.train.loop import BatchPlan, Loop, shuffled_groups
from tunelab.train.precision import autocast

EVAL_SEED = 1234  # evaluations sample with this seed: every one draws the same noise


class RLOOObjective(torch.nn.Module):
    """forward(prompt_ids, prompt_index) -> (summed policy-gradient loss, responses, 0).

    `prompt_ids` (P, T) holds the batch's prompts left-padded with -1; `prompt_index` (P,) where each is
    in `self.prompts` (what the reward model reads). Sampling, scoring and the loss all happen here, so
    that the shared loop runs RL as it runs every other method.
    """

    def __init__(self, policy: SequenceScorer, reward, tokenizer, prompts: list[list[dict]], options):
        super().__init__()
        self.policy = policy  # its .model is what trains; log_probs() scores responses through the chunked head
        self.reward, self.tokenizer, self.prompts, self.options = reward, tokenizer, prompts, options
        self.reference = Reference(policy)
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(policy.model, tokenizer)
        self.stats: dict[str, list[float]] = defaultdict(list)
        self.tokens = 0  # prompt and response tokens of the rows trained on since the last pop_tokens()

    def forward(self, prompt_ids, prompt_index):
        k = self.options.samples_per_prompt
        started = time.perf_counter()
        rows = self.sample(prompt_ids, k)  # (P*k) responses, grouped by prompt
        sampled = sum(len(r) for _, r in rows) / max(time.perf_counter() - started, 1e-9)
        batch = self.collate(rows)
        self.tokens += int(batch[1].sum())
        with torch.no_grad():
            rewards = self.score(prompt_index.repeat_interleave(k).tolist(), rows)  # (P*k,)
            reference = self.reference(self.policy, *batch)
        logps, entropy = self.log_probs_and_entropy(*batch)
        kl = logps.detach().float() - reference.float()  # (P*k,) per-response KL estimate
        penalised = rewards - self.options.kl_coef * kl
        advantages = rloo_advantages(penalised, k)
        loss = -(advantages * logps.float()).sum()
        lengths = (batch[2] != IGNORE).sum(1).float()
        for name, value in (("reward", rewards.mean()), ("kl", kl.mean()), ("penalised_reward", penalised.mean()),
                            ("response_length", lengths.mean()), ("entropy", entropy),
                            ("ended", sum(r[-1] in self.stop_ids for _, r in rows) / len(rows)),
                            ("sampled_tokens_per_s", sampled)):  # fmt: skip
            self.stats[name].append(float(value))
        return loss, len(rows), 0

    def pop_metrics(self) -> dict:
        """The training metrics since the last call, averaged (what the loop logs each log step)."""
        out = {name: sum(values) / len(values) for name, values in self.stats.items() if values}
        self.stats.clear()
        return out

    def pop_tokens(self) -> int:
        """The tokens of the rows trained on since the last call (the loop's tokens/s counts them)."""
        tokens, self.tokens = self.tokens, 0
        return tokens

    # --- the parts ----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, k: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) for k samples of each prompt; a response ends with its stop token,
        if it wrote one. The prompts arrive left-padded with -1."""
        model = self.policy.model
        mask = (prompt_ids >= 0).long()
        ids = prompt_ids.clamp(min=0).masked_fill(mask == 0, self.pad_id)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=self.options.max_new_tokens, num_return_sequences=k,
                             pad_token_id=self.pad_id, eos_token_id=sorted(self.stop_ids))  # fmt: skip
        width = prompt_ids.shape[1]
        rows = []
        for b in range(out.shape[0]):
            prompt = prompt_ids[b // k][mask[b // k] == 1].tolist()
            response = out[b, width:].tolist()
            end = next((i + 1 for i, t in enumerate(response) if t in self.stop_ids), len(response))
            rows.append((prompt, response[:end]))
        return rows

    def collate(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels): prompt + response right-padded, labels on the response only."""
        device = next(self.policy.parameters()).device
        batch = collate_padded([Example(p + r, [IGNORE] * len(p) + r) for p, r in rows], self.pad_id)
        return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)

    def score(self, prompt_index: list[int], rows) -> torch.Tensor:
        responses = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in rows]
        device = next(self.policy.parameters()).device
        return self.reward([self.prompts[i] for i in prompt_index], responses).to(device).float()

    def log_probs_and_entropy(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, float]:
        """Each response's summed log-prob under the policy (with gradients), and the mean per-token
        entropy of the policy over the responses' positions (without)."""
        policy = self.policy
        hidden = policy.hidden(input_ids, attention_mask)
        logps, _ = sequence_log_probs(hidden, policy.head, labels, policy.softcap)
        responses = hidden[:, :-1][labels[:, 1:] != IGNORE].detach()  # the positions that predict response tokens
        return logps, mean_token_entropy(responses, policy.head, policy.softcap)

    @torch.no_grad()
    def evaluate(self, prompt_ids: torch.Tensor, prompt_index: torch.Tensor) -> dict:
        """One seeded sample per held-out prompt: mean reward, KL, length, entropy (the training RNG is
        left as it was, so evaluating does not change what training samples next)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED)
            rows = self.sample(prompt_ids, 1)
        batch = self.collate(rows)
        rewards = self.score(prompt_index.tolist(), rows)
        logps, entropy = self.log_probs_and_entropy(*batch)
        kl = logps.float() - self.reference(self.policy, *batch).float()
        lengths = (batch[2] != IGNORE).sum(1).float()
        return {"reward": rewards.tolist(), "kl": kl.tolist(), "response_length": lengths.tolist(),
                "entropy": [entropy] * len(rows), "ended": [float(r[-1] in self.stop_ids) if r else 0.0 for _, r in rows]}  # fmt: skip


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Each reward minus the mean of the other k - 1 rewards of its group (consecutive groups of k)."""
    groups = rewards.view(-1, k)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).view(-1)


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a response: the generation config's EOS ids (an end-of-turn token for chat
    models) and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# --- reward models ----------------------------------------------------------------------------------


class ClassifierReward:
    """A one-output sequence classifier (a tunelab reward run's final/, or any such model): the reward is
    its output for the conversation rendered through its own tokenizer's chat template, as it trained."""

    def __init__(self, folder: Path, precision: str, device, max_length: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tunelab.data.dataset import DataOptions, renderer_for

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        if self.model.config.num_labels != 1:
            raise UserError(f"{folder}: a reward model has one output (num_labels 1); this one has {self.model.config.num_labels}")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False).eval().to(device)
        self.renderer = renderer_for(self.tokenizer, DataOptions(max_length=max_length))
        self.precision, self.device = precision, device

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        from tunelab.recipes.classify import pad_right
        from tunelab.recipes.reward import score

        examples = self.renderer.chats([Chat([*p, message("assistant", r)]) for p, r in zip(prompts, responses)])
        out = []
        for start in range(0, len(examples), 16):
            batch = pad_right(examples[start : start + 16], self.tokenizer.pad_token_id)
            with autocast(self.precision, self.device):
                out.append(score(self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)))
        return torch.cat(out)


class FunctionReward:
    """rlhf.reward_model: FILE.py:NAME, a Python function (prompts, responses) -> one number per response."""

    def __init__(self, spec: str):
        path, _, name = spec.rpartition(":")
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say which one failed and how
            raise UserError(f"rlhf.reward_model: {path}: {type(e).__name__}: {e}") from None
        self.function = getattr(module, name, None)
        if not callable(self.function):
            raise UserError(f"rlhf.reward_model: {path} has no function {name!r}")
        self.spec = spec

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        values = self.function(prompts, responses)
        try:
            out = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            raise UserError(f"rlhf.reward_model: {self.spec} must return one number per response") from None
        if out.numel() != len(responses):
            raise UserError(f"rlhf.reward_model: {self.spec} returned {out.numel()} values for {len(responses)} responses")
        return out


def load_reward(spec: str, precision: str, device, max_length: int):
    path, colon, name = spec.rpartition(":")
    if colon and path.endswith(".py"):
        if not Path(path).is_file():
            raise UserError(f"rlhf.reward_model: {path}: no such file")
        return FunctionReward(spec)
    from tunelab.models import resolve_model

    return ClassifierReward(resolve_model(spec), precision, device, max_length)


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Setup:
    objective: RLOOObjective
    train: list[list[int]]  # prompt ids
    eval: list[list[int]]
    template: str | None
    precision: tuple[str, str]
    merge_final: bool


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    check_new_run(run_dir, resume)
    started = time.perf_counter()
    s = setup(cfg)
    objective, options, size = s.objective, cfg.rlhf, cfg.train.batch_size
    model = objective.policy.model
    evaluations: dict[int, dict] = {}

    def evaluator() -> dict:
        values = defaultdict(list)
        rows = size * options.samples_per_prompt  # as many responses at once as a training micro-batch
        with autocast(s.precision[0], loop.accelerator.device):
            for k in range(0, len(s.eval), rows):
                chunk = range(k, min(k + rows, len(s.eval)))
                # the held-out prompts follow the training ones in objective.prompts
                batch = collate([s.eval[j] for j in chunk], [len(s.train) + j for j in chunk], 1)
                for name, v in objective.evaluate(batch["prompt_ids"].to(loop.accelerator.device),
                                                  batch["prompt_index"]).items():  # fmt: skip
                    values[name] += v
        metrics = {name: sum(v) / len(v) for name, v in values.items()}
        evaluations[loop.state["step"]] = metrics
        return {f"eval_{k}": v for k, v in metrics.items()}

    def within_bound(metrics: dict) -> bool:
        return options.max_kl is None or metrics["eval_kl"] <= options.max_kl

    k = options.samples_per_prompt
    plan = BatchPlan(len(s.train), lambda epoch: [collate([s.train[i] for i in g], g, k)
                                                  for g in shuffled_groups(len(s.train), size, cfg.train.seed + epoch)])  # fmt: skip
    loop = Loop(objective, model, cfg.train, run_dir, plan, None, s.precision[0], cfg.train.best_metric,
                evaluator=evaluator if s.eval else None, admissible=within_bound)  # fmt: skip

    def announce():
        from tunelab.models.tuning import count_parameters

        trainable, total = count_parameters(model)
        print(f"tunelab: rlhf (RLOO, {options.samples_per_prompt} samples a prompt, kl_coef {options.kl_coef:g}) on "
              f"{cfg.model} ({cfg.tuning.mode}): {trainable:,} of {total:,} parameters train; {len(s.train):,} prompts, "
              f"{len(s.eval):,} held out -> {loop.total_steps} steps; reward: {options.reward_model}; reference: "
              f"{objective.reference.kind}; precision {s.precision[0]}", file=sys.stderr)  # fmt: skip

    state = run_loop(loop, cfg, resume, announce)
    best = restore_best(loop, model)
    if not loop.accelerator.is_main_process:
        return {}
    write_final(run_dir, plain_model(model) if s.merge_final else model, objective.tokenizer, s.template)
    final = None
    if s.eval:
        start = evaluations.get(0)
        final = evaluations.get(final_step(state, best))
        if final is None:
            with torch.no_grad():
                final = {k.removeprefix("eval_"): v for k, v in evaluator().items()}
        final = {**final, "start_reward": start and start["reward"], "max_kl": options.max_kl,
                 "within_kl_bound": within_bound({"eval_kl": final["kl"]})}  # fmt: skip
        atomic_write_text(run_dir / "eval_metrics.json", json.dumps(final, indent=2) + "\n")
        began = f" (starting policy {start['reward']:.4f})" if start else ""
        bound = "" if options.max_kl is None else f" (bound {options.max_kl:g}: {'within' if final['within_kl_bound'] else 'OVER'})"
        print(f"tunelab: held-out prompts: mean reward {final['reward']:.4f}{began}; KL to the reference "
              f"{final['kl']:.3f}{bound}; mean length {final['response_length']:.1f} tokens ({len(s.eval):,} prompts)",
              file=sys.stderr)  # fmt: skip
        if not final["within_kl_bound"]:
            print(f"warning: no evaluation after step 0 kept the KL within rlhf.max_kl {options.max_kl:g}, so final/ "
                  "holds the last step; raise rlhf.kl_coef or lower train.lr", file=sys.stderr)  # fmt: skip
    return write_summary(cfg, loop, state, model, s.precision[0], time.perf_counter() - started, best, "responses",
                         fits=False, train_examples=len(s.train), eval=final)  # fmt: skip


def collate(prompts: list[list[int]], indices: list[int], samples: int) -> dict:
    """prompt_ids (P, T) left-padded with -1 (generation continues each prompt's last token), their
    places in the objective's prompt list, and the count the loop divides by: `samples` responses a
    prompt (the loss is their mean). The tokens trained on are known after sampling: pop_tokens()."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.as_tensor(p)
    return {"prompt_ids": ids, "prompt_index": torch.as_tensor(indices, dtype=torch.long),
            "count": len(prompts) * samples, "real_tokens": 0}  # fmt: skip


def read_prompts(spec: str, cfg: RunConfig, held_out: bool = False) -> list[list[dict]]:
    """The prompts of a data file: {prompt} rows, a preference pair's prompt, or a conversation up to its
    last assistant turn."""
    records = read_records(spec, cfg, (Prompt, Preference, Chat), "method rlhf needs prompts: {prompt} rows, "
                           "preference pairs, or conversations (their last assistant turn is left out)", held_out)  # fmt: skip
    prompts = []
    for r in records:
        messages = r.prompt if isinstance(r, Preference) else r.messages
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if messages:
            prompts.append([message(m["role"], m["content"], 0) for m in messages])
    return prompts


def setup(cfg: RunConfig) -> Setup:
    from transformers.utils import logging as hf_logging

    from tunelab.data.dataset import DataOptions, renderer_for
    from tunelab.inference import base_folder, prompt_ids
    from tunelab.models import resolve_model
    from tunelab.train.precision import resolve_precision

    hf_logging.disable_progress_bar()
    folder = resolve_model(cfg.model)
    model, tokenizer = starting_policy(folder, cfg, "online RL (method rlhf)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    precision = resolve_precision(cfg.train.precision, device)
    train = read_prompts(cfg.data.train, cfg)
    held_out = read_prompts(cfg.data.eval, cfg, held_out=True) if cfg.data.eval else []
    train, held_out = split_records(train, held_out, cfg)
    template = renderer_for(tokenizer, DataOptions.from_config(cfg.data)).template
    tokenizer.chat_template = template
    encode = lambda messages: prompt_ids(tokenizer, messages)[0].tolist()  # noqa: E731
    train_ids = [(p, encode(p)) for p in train]
    eval_ids = [(p, encode(p)) for p in held_out]
    limit = cfg.data.max_length
    train_ids = [(p, ids) for p, ids in train_ids if len(ids) <= limit]
    eval_ids = [(p, ids) for p, ids in eval_ids if len(ids) <= limit][: cfg.rlhf.eval_prompts]
    if not train_ids:
        raise UserError(f"{cfg.data.train}: no prompt within data.max_length {limit} tokens")
    reward = load_reward(cfg.rlhf.reward_model, precision[0], device, limit + cfg.rlhf.max_new_tokens + 16)
    objective = RLOOObjective(SequenceScorer(model), reward, tokenizer, [p for p, _ in train_ids + eval_ids], cfg.rlhf)
    merge_final = base_folder(folder) != folder and hasattr(model, "merge_and_unload")
    return Setup(objective, [ids for _, ids in train_ids], [ids for _, ids in eval_ids], template, precision, merge_final)
