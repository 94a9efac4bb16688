"""A causal LM and its token loss as one module: what the loop calls, and what DDP wraps."""

from __future__ import annotations

import torch

from tunelab.losses import selective_cross_entropy


class CausalLMObjective(torch.nn.Module):
    """forward(input_ids, labels, [attention_mask | position_ids]) -> (summed loss, trained tokens, hits).

    The backbone runs without its output layer; `selective_cross_entropy` applies the head only where
    labels are trained. `use_cache=False` always: with a KV cache transformers ignores `position_ids`
    as packing boundaries and lets packed examples attend to each other.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # registered, so DDP and .to() see its parameters
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
        self.backbone = getattr(base, base.base_model_prefix)
        self.head = base.get_output_embeddings()
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {"position_ids": position_ids}
        hidden = self.backbone(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state  # (B, T, H)
        return selective_cross_entropy(hidden, self.head, labels, softcap=self.softcap)
