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

import time
from collections import defaultdict
from pathlib import Path

import torch

from tunelab.config import RLHFConfig, RunConfig
from tunelab.data.batching import pad_inputs, pad_prompts
from tunelab.data.dataset import DataOptions, read_prompts, read_split, renderer_for
from tunelab.data.records import Chat, message
from tunelab.data.render import IGNORE
from tunelab.errors import UserError
from tunelab.fs import atomic_write_jsonl
from tunelab.infer.generate import stop_token_ids
from tunelab.infer.prompts import encode_prompt
from tunelab.losses import mean_token_entropy, rloo_advantages, sequence_log_probs
from tunelab.models import resolve_model
from tunelab.models.load import load_classifier_run, merges_at_the_end, plain_model, starting_policy
from tunelab.precision import Precision, autocast, resolve_precision, training_device
from tunelab.train.objectives import ReferenceModel, SamplesItsRows, SequenceScorer, scalar_scores
from tunelab.train.plan import BatchPlan
from tunelab.train.rewards import python_function
from tunelab.train.run import Evaluation, Parts, Run

EVAL_SEED = 1234  # evaluations sample with this seed: every one draws the same noise


class RLOOObjective(SamplesItsRows, torch.nn.Module):
    """forward(prompt_ids, prompt_index) -> (summed policy-gradient loss, responses, 0).

    `prompt_ids` (P, T) holds the batch's prompts left-padded with -1; `prompt_index` (P,) where each is
    in `self.prompts` (what the reward model reads). Sampling, scoring and the loss all happen here, so
    that the shared loop runs RL as it runs every other method.
    """

    def __init__(self, policy: SequenceScorer, reward, tokenizer, prompts: list[list[dict]], options: RLHFConfig):
        super().__init__()
        self.policy = policy  # its .model is what trains; log_probs() scores responses through the chunked head
        self.reward, self.tokenizer, self.prompts, self.options = reward, tokenizer, prompts, options
        self.reference = ReferenceModel(policy)
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
        for name, value in (
            ("reward", rewards.mean()),
            ("kl", kl.mean()),
            ("penalised_reward", penalised.mean()),
            ("response_length", lengths.mean()),
            ("entropy", entropy),
            ("ended", sum(r[-1] in self.stop_ids for _, r in rows) / len(rows)),
            ("sampled_tokens_per_s", sampled),
        ):
            self.stats[name].append(float(value))
        return loss, len(rows), 0

    # --- the parts ----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, k: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) for k samples of each prompt; a response ends with its stop token,
        if it wrote one. The prompts arrive left-padded with -1."""
        model = self.policy.model
        mask = (prompt_ids >= 0).long()
        ids = prompt_ids.clamp(min=0).masked_fill(mask == 0, self.pad_id)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.options.max_new_tokens,
            num_return_sequences=k,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.stop_ids),
        )
        width = prompt_ids.shape[1]
        rows = []
        for b in range(out.shape[0]):
            prompt = prompt_ids[b // k][mask[b // k] == 1].tolist()
            response = out[b, width:].tolist()
            end = next((i + 1 for i, t in enumerate(response) if t in self.stop_ids), len(response))
            rows.append((prompt, response[:end]))
        return rows

    def score(self, prompt_index: list[int], rows) -> torch.Tensor:
        responses = self.texts(rows)
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
        return {
            "reward": rewards.tolist(),
            "kl": kl.tolist(),
            "response_length": lengths.tolist(),
            "entropy": [entropy] * len(rows),
            "ended": [float(r[-1] in self.stop_ids) if r else 0.0 for _, r in rows],
            "response": self.texts(rows),
        }


# --- reward models ----------------------------------------------------------------------------------


class ClassifierReward:
    """A one-output sequence classifier (a tunelab reward run's final/, or any such model): the reward is
    its output for the conversation rendered through its own tokenizer's chat template, as it trained."""

    def __init__(self, folder: Path, precision: Precision, device, max_length: int):
        self.model, self.tokenizer, names = load_classifier_run(folder)
        if len(names) != 1:
            raise UserError(f"{folder}: a reward model has one output (num_labels 1); this one has {len(names)}")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False).eval().to(device)
        self.renderer = renderer_for(self.tokenizer, DataOptions(max_length=max_length))
        self.precision, self.device = precision, device

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        examples = self.renderer.chats([Chat([*p, message("assistant", r)]) for p, r in zip(prompts, responses)])
        out = []
        for start in range(0, len(examples), 16):
            batch = pad_inputs(examples[start : start + 16], self.tokenizer.pad_token_id)
            with autocast(self.precision, self.device):
                out.append(
                    scalar_scores(
                        self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                    )
                )
        return torch.cat(out)


class FunctionReward:
    """rlhf.reward_model: FILE.py:NAME, a Python function (prompts, responses) -> one number per response."""

    def __init__(self, spec: str):
        self.function = python_function(spec, "rlhf.reward_model")
        self.spec = spec

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        values = self.function(prompts, responses)
        try:
            out = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            raise UserError(f"rlhf.reward_model: {self.spec} must return one number per response") from None
        if out.numel() != len(responses):
            raise UserError(
                f"rlhf.reward_model: {self.spec} returned {out.numel()} values for {len(responses)} responses"
            )
        return out


def load_reward(spec: str, precision: Precision, device, max_length: int):
    path, colon, name = spec.rpartition(":")
    if colon and path.endswith(".py"):
        if not Path(path).is_file():
            raise UserError(f"rlhf.reward_model: {path}: no such file")
        return FunctionReward(spec)
    from tunelab.models import resolve_model

    return ClassifierReward(resolve_model(spec), precision, device, max_length)


# --- the run ------------------------------------------------------------------------------------------


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run = Run(cfg, resume)
    folder = resolve_model(cfg.model)
    model, tokenizer = starting_policy(folder, cfg.tuning, cfg.train.seed, "online RL (method rlhf)")
    device, options, size = training_device(), cfg.rlhf, cfg.train.batch_size
    model.to(device)
    precision = resolve_precision(cfg.train.precision, device)
    tokenizer.chat_template = template = renderer_for(tokenizer, cfg.data.options()).template
    (train, train_ids), (held_out, eval_ids) = prompts_within_length(cfg, tokenizer)
    if options.reward_model is None:  # the config check refuses this before any run starts
        raise UserError("rlhf.reward_model: method rlhf needs a reward model")
    reward = load_reward(options.reward_model, precision, device, cfg.data.max_length + options.max_new_tokens + 16)
    objective = RLOOObjective(SequenceScorer(model), reward, tokenizer, train + held_out, options)
    k = options.samples_per_prompt
    plan = BatchPlan.grouped(len(train_ids), size, cfg.train.seed, lambda g: collate([train_ids[i] for i in g], g, k))
    evaluation = held_out_samples(objective, eval_ids, len(train_ids), size * k, precision) if eval_ids else None

    def announce(loop) -> str:
        return (
            f"  RLOO, {k} samples a prompt, kl_coef {options.kl_coef:g}: {len(train_ids):,} prompts, {len(eval_ids):,} "
            f"held out -> {loop.total_steps} steps; reward: {options.reward_model}; reference: "
            f"{objective.reference.kind}"
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
            admissible=lambda metrics: within_bound(options.max_kl, metrics["eval_kl"]),
            final_model=plain_model if merge else None,
            fits=False,
            summary={"train_examples": len(train_ids)},
        )
    )


def within_bound(max_kl: float | None, kl: float) -> bool:
    return max_kl is None or kl <= max_kl


def held_out_samples(
    objective: RLOOObjective, prompts: list[list[int]], first: int, rows: int, precision: Precision
) -> Evaluation:
    """One seeded sample per held-out prompt (`rows` at a time: as many responses as a training
    micro-batch): the mean reward, KL, length and entropy. The held-out prompts follow the `first`
    training ones in objective.prompts. The end adds the starting policy's reward and the KL bound, and
    keeps every sample with its reward and KL in eval_samples.jsonl."""
    max_kl = objective.options.max_kl
    evaluation = None

    def measure(complete: bool) -> dict:
        values: dict[str, list] = defaultdict(list)
        device = next(objective.parameters()).device
        with autocast(precision, device):
            for k in range(0, len(prompts), rows):
                chunk = range(k, min(k + rows, len(prompts)))
                batch = collate([prompts[j] for j in chunk], [first + j for j in chunk], 1)
                for name, v in objective.evaluate(batch["prompt_ids"].to(device), batch["prompt_index"]).items():
                    values[name] += v
        responses = values.pop("response")
        samples = [
            {"prompt": objective.prompts[first + j], "response": text, "reward": reward, "kl": kl}
            for j, (text, reward, kl) in enumerate(zip(responses, values["reward"], values["kl"]))
        ]
        return {**{name: sum(v) / len(v) for name, v in values.items()}, "samples": samples}

    def keep(metrics: dict, run_dir: Path) -> dict:
        atomic_write_jsonl(run_dir / "eval_samples.jsonl", metrics["samples"])
        metrics = {k: v for k, v in metrics.items() if k != "samples"}
        assert evaluation is not None  # keep() runs once the Evaluation below holds it
        start = evaluation.by_step.get(0)
        return {
            **metrics,
            "start_reward": start and start["reward"],
            "max_kl": max_kl,
            "within_kl_bound": within_bound(max_kl, metrics["kl"]),
        }

    def report(m: dict) -> str:
        began = f" (starting policy {m['start_reward']:.4f})" if m["start_reward"] is not None else ""
        bound = "" if max_kl is None else f" (bound {max_kl:g}: {'within' if m['within_kl_bound'] else 'OVER'})"
        line = (
            f"tunelab: held-out prompts: mean reward {m['reward']:.4f}{began}; KL to the reference {m['kl']:.3f}"
            f"{bound}; mean length {m['response_length']:.1f} tokens ({len(prompts):,} prompts)"
        )
        if not m["within_kl_bound"]:
            line += (
                f"\nwarning: no evaluation after step 0 kept the KL within rlhf.max_kl {max_kl:g}, so final/ "
                "holds the last step; raise rlhf.kl_coef or lower train.lr"
            )
        return line

    evaluation = Evaluation(measure, report, keep)
    return evaluation


def collate(prompts: list[list[int]], indices: list[int], samples: int) -> dict:
    """prompt_ids (P, T) left-padded with -1 (generation continues each prompt's last token), their
    places in the objective's prompt list, and the count the loop divides by: `samples` responses a
    prompt (the loss is their mean). The tokens trained on are known after sampling: pop_tokens()."""
    ids, _ = pad_prompts(prompts, -1)
    return {
        "prompt_ids": ids,
        "prompt_index": torch.as_tensor(indices, dtype=torch.long),
        "count": len(prompts) * samples,
        "real_tokens": 0,
    }


def prompts_within_length(cfg: RunConfig, tokenizer) -> tuple[tuple[list, list], tuple[list, list]]:
    """((training prompts, their ids), (held-out prompts, their ids)): those within data.max_length tokens
    through the chat template, rlhf.eval_prompts of the held-out ones at most."""
    train, held_out = read_split(cfg.files(), read_prompts)
    limit = cfg.data.max_length
    fits = [(p, ids) for p in train if len(ids := encode_prompt(tokenizer, p)[0].tolist()) <= limit]
    kept = [(p, ids) for p in held_out if len(ids := encode_prompt(tokenizer, p)[0].tolist()) <= limit]
    kept = kept[: cfg.rlhf.eval_prompts]
    if not fits:
        raise UserError(f"{cfg.data.train}: no prompt within data.max_length {limit} tokens")
    return ([p for p, _ in fits], [ids for _, ids in fits]), ([p for p, _ in kept], [ids for _, ids in kept])
