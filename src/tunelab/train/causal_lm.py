"""A causal LM as the modules the loop calls (and DDP wraps): its backbone and output layer kept apart,
so that the output layer runs only where a loss or a score needs it."""

from __future__ import annotations

import torch

from tunelab.losses import selective_cross_entropy, sequence_log_probs


class HeadlessCausalLM(torch.nn.Module):
    """A causal LM split into its backbone (`hidden()`) and its output layer (`head`, `softcap`).

    `use_cache=False` always: with a KV cache transformers ignores `position_ids` as packing boundaries
    and lets packed examples attend to each other.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # registered, so DDP and .to() see its parameters
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
        self.backbone = getattr(base, base.base_model_prefix)
        self.head = base.get_output_embeddings()
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def hidden(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, T, H) last hidden states; masked by attention_mask, or by position_ids for packed rows."""
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {"position_ids": position_ids}
        return self.backbone(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


class CausalLMObjective(HeadlessCausalLM):
    """forward(input_ids, labels, [attention_mask | position_ids]) -> (summed loss, trained tokens, hits).

    `selective_cross_entropy` applies the head only where labels are trained.
    """

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        hidden = self.hidden(input_ids, attention_mask, position_ids)
        return selective_cross_entropy(hidden, self.head, labels, softcap=self.softcap)


class SequenceScorer(HeadlessCausalLM):
    """Scores whole responses: `log_probs()` gives each row's summed log-probability of its labelled
    tokens (the response), as preference optimisation and RL need them."""

    def log_probs(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) summed response log-probabilities, (B,) response lengths)."""
        return sequence_log_probs(self.hidden(input_ids, attention_mask), self.head, labels, self.softcap)
