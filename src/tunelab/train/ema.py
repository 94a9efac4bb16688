"""An exponential moving average of the trained weights (`train.ema_decay`), evaluated and kept instead of them.

Averaging the weights over the last few hundred steps smooths out the noise of the last updates
(Polyak averaging; timm's ModelEmaV2 and TensorFlow's ExponentialMovingAverage do the same). Only
the trainable parameters are averaged, so a LoRA run keeps a copy of its adapter, not of the model.
The decay warms up as TensorFlow's does, `min(decay, (1 + t) / (10 + t))` at update t, so that the
average follows the fast early changes instead of lagging at the starting weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [name for name, _ in named_params]
        self.params: list[torch.Tensor] = [p for _, p in named_params]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: shadow <- d * shadow + (1 - d) * weights."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)  # as torch.optim.swa_utils does

    @contextmanager
    def applied(self):
        """The averaged weights in the model inside the block; the trained ones back after it."""
        trained = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, trained)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().contiguous().cpu() for name, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for name, t in zip(self.names, self.shadow):
            t.copy_(tensors[name])
        self.updates = updates
