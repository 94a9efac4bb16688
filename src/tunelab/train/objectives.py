"""The objectives the loop calls (and DDP wraps), shared by the methods: each is a module whose
`forward(**batch)` returns (summed loss, count it is summed over, correct predictions).

A causal LM is split into its backbone and its output layer, so that the output layer runs only where a
loss or a score needs it; a reference model scores what the policy scores, frozen.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F

from tunelab.data.batching import collate_padded
from tunelab.data.render import IGNORE, Example
from tunelab.losses import TAIL, selective_cross_entropy, sequence_log_probs, token_log_probs
from tunelab.train.packed_attention import configs_using_sdpa, packed_rows


class HeadlessCausalLM(torch.nn.Module):
    """A causal LM split into its backbone (`hidden()`) and its output layer (`head`, `softcap`).

    `use_cache=False` always: with a KV cache transformers ignores `position_ids` as packing boundaries
    and lets packed examples attend to each other.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model: Any = model  # registered, so DDP and .to() see its parameters; a transformers/peft model
        base: Any = getattr(model, "get_base_model", lambda: model)()  # peft wraps it
        self.backbone = getattr(base, base.base_model_prefix)
        self.head = base.get_output_embeddings()
        self.softcap = getattr(base.config, "final_logit_softcapping", None)
        self.packed = configs_using_sdpa(self.backbone)  # what attends per example in packed rows on the CPU

    def hidden(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, T, H) last hidden states; masked by attention_mask, or by position_ids for packed rows."""
        if attention_mask is not None:
            return self.backbone(input_ids=input_ids, use_cache=False, attention_mask=attention_mask).last_hidden_state
        # packed rows on the CPU: each example's attention on its own (train/packed_attention.py); a GPU keeps sdpa
        per_example = position_ids is not None and input_ids.device.type == "cpu"
        with packed_rows(self.packed if per_example else []):
            return self.backbone(input_ids=input_ids, use_cache=False, position_ids=position_ids).last_hidden_state


class CausalLMObjective(HeadlessCausalLM):
    """forward(input_ids, labels, [attention_mask | position_ids]) -> (summed loss, trained tokens, hits).

    `selective_cross_entropy` applies the head only where labels are trained; `output_gradient` "sampled"
    estimates the hidden states' gradient from the vocabulary's sampled tail (`train.output_gradient`).
    """

    def __init__(self, model: torch.nn.Module, output_gradient: str = "exact"):
        super().__init__(model)
        self.tail = TAIL if output_gradient == "sampled" else None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        hidden = self.hidden(input_ids, attention_mask, position_ids)
        return selective_cross_entropy(hidden, self.head, labels, softcap=self.softcap, tail=self.tail)


class SequenceScorer(HeadlessCausalLM):
    """Scores whole responses: `log_probs()` gives each row's summed log-probability of its labelled
    tokens (the response), as preference optimisation and RL need them."""

    def log_probs(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) summed response log-probabilities, (B,) response lengths)."""
        return sequence_log_probs(self.hidden(input_ids, attention_mask), self.head, labels, self.softcap)

    def token_log_probs(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, T-1) each response token's log-probability, 0 elsewhere; (B, T-1) where the responses are)."""
        return token_log_probs(self.hidden(input_ids, attention_mask), self.head, labels, self.softcap)


class SamplesItsRows:
    """For an objective whose rows are made inside its forward (rlhf, grpo sample them): its sampled rows
    (prompt ids, response ids, ...) as a batch and as text, and what the loop asks it after each log window.
    The objective has `policy`, `tokenizer` and `pad_id`, and keeps `stats` (name -> values) and `tokens`."""

    policy: SequenceScorer
    tokenizer: Any
    pad_id: int
    stats: dict[str, list[float]]
    tokens: int

    def collate(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels): prompt + response right-padded, labels on the response only."""
        device = next(self.policy.parameters()).device
        batch = collate_padded([Example(p + r, [IGNORE] * len(p) + r) for p, r, *_ in rows], self.pad_id)
        return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)

    def texts(self, rows) -> list[str]:
        """The sampled responses as text, as a reward reads them."""
        return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for _, r, *_ in rows]

    def pop_metrics(self) -> dict:
        """The training metrics since the last call, averaged (what the loop logs each log step)."""
        out = {name: sum(values) / len(values) for name, values in self.stats.items() if values}
        self.stats.clear()
        return out

    def pop_tokens(self) -> int:
        """The tokens of the rows trained on since the last call (the loop's tokens/s counts them)."""
        tokens, self.tokens = self.tokens, 0
        return tokens


class ReferenceModel:
    """The frozen starting policy's log-probs of a batch: the same model with its LoRA adapter disabled,
    or else a frozen copy of the starting weights (taken when this is built, before any step)."""

    def __init__(self, policy: SequenceScorer):
        self.frozen = None
        if not hasattr(policy.model, "disable_adapter"):
            self.frozen = SequenceScorer(copy.deepcopy(policy.model).requires_grad_(False).eval())

    @property
    def kind(self) -> str:
        return (
            "the starting weights (a frozen copy)" if self.frozen is not None else "the base model (adapter disabled)"
        )

    @torch.no_grad()
    def __call__(self, policy: SequenceScorer, input_ids, attention_mask, labels) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen.log_probs(input_ids, attention_mask, labels)[0]
        with policy.model.disable_adapter():
            return policy.log_probs(input_ids, attention_mask, labels)[0]

    @torch.no_grad()
    def tokens(self, policy: SequenceScorer, input_ids, attention_mask, labels) -> torch.Tensor:
        """(B, T-1): each response token's log-probability under the reference (`token_log_probs`' layout)."""
        if self.frozen is not None:
            return self.frozen.token_log_probs(input_ids, attention_mask, labels)[0]
        with policy.model.disable_adapter():
            return policy.token_log_probs(input_ids, attention_mask, labels)[0]


class Seq2SeqObjective(torch.nn.Module):
    """An encoder-decoder: forward(input_ids, attention_mask, labels) -> (summed target-token loss,
    target tokens, hits)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.base: Any = getattr(model, "get_base_model", lambda: model)()  # peft wraps it

    def forward(self, input_ids, attention_mask, labels):
        decoder_input_ids = self.base.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
        ).logits.float()
        trained = labels != -100
        loss = F.cross_entropy(logits[trained], labels[trained], reduction="sum")
        return loss, int(trained.sum()), int((logits[trained].argmax(-1) == labels[trained]).sum())


class ClassifierObjective(torch.nn.Module):
    """A sequence classifier: forward(input_ids, attention_mask, labels) -> (summed cross-entropy,
    examples, correct)."""

    def __init__(self, model: torch.nn.Module, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        weights = cast(torch.Tensor | None, self.class_weights)  # a buffer (or None)
        loss = F.cross_entropy(logits, labels, weight=weights, reduction="sum")
        return loss, labels.numel(), int((logits.argmax(-1) == labels).sum())


def scalar_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """(B,) a one-output sequence classifier's scores (a reward model's rewards): its output at each
    row's last real token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float().squeeze(-1)
