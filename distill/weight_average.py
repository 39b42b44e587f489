"""The uniform average of a model's weights over its last steps (`training.average_from`).

Stochastic weight averaging (Izmailov et al., 2018): the mean of the iterates along the late,
low-learning-rate part of training sits nearer the middle of a flat region of the loss than any
one of them, whose place depends on the data order of the last few steps. The trainer exports the
average instead of the last step's weights. It is kept in fp32 beside the trainable parameters,
updated after each optimizer step from `start_step` on, and saved in every checkpoint, so a
resumed run averages the same steps.
"""

from __future__ import annotations

import torch


class WeightAverage:
    def __init__(self, params: list[torch.nn.Parameter], start_step: int):
        self.params, self.start_step = params, start_step
        self.count, self.mean = 0, [torch.empty(0) for _ in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step `step` (1-based) in, if it is past `start_step`."""
        if step <= self.start_step:
            return
        self.count += 1
        for mean, p in zip(self.mean, self.params):
            if self.count == 1:
                mean.set_(p.detach().to(torch.float32).clone())
            else:
                mean.add_(p.detach().to(torch.float32) - mean, alpha=1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        """Put the average into the parameters (at the end of training; nothing when no step was averaged)."""
        if self.count:
            for mean, p in zip(self.mean, self.params):
                p.copy_(mean.to(p.dtype))

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": [m.clone() for m in self.mean]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["mean"]) != len(self.params):
            raise ValueError(f"the checkpoint's weight average has {len(state['mean'])} tensors, the model "
                             f"{len(self.params)} trainable parameters")
        self.count, self.mean = state["count"], [m.clone() for m in state["mean"]]
