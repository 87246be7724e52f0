"""Real-time chunking (Black et al., arXiv 2506.07339): inpaint the new chunk onto the old.

While a chunk is being computed, the robot keeps executing the previous one. The first
`d` (inference_delay) actions of the new chunk will never run - the old ones run in
their place - so they are frozen to the old chunk; the next `h` (execution_horizon)
actions are guided toward the old chunk with weights that decay exponentially, so the
switch from old to new is smooth; the rest is free. Guidance is the paper's
pseudo-inverse guidance (PiGDM): at each Euler step, the gradient through the expert of
the weighted error between the old chunk and the step's estimate of the final chunk,
with a weight clipped at beta. The frozen rows are also copied from the old chunk into
the result, since those are the actions that will actually execute.

Conventions: pi0 flow time t (1 = noise); the paper's tau = 1 - t.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from inference_worker.vla.expert import Context, FlowMatchingExpert


def guidance_weights(chunk: int, overlap: int, delay: int, horizon: Optional[int]) -> torch.Tensor:
    """W[i]: 1 for i < delay, exponential decay over [delay, delay + horizon), 0 after and
    past the end of the previous chunk (`overlap` rows of it remain)."""
    overlap = min(overlap, chunk)
    delay = min(delay, overlap)
    h = overlap - delay if horizon is None else min(horizon, overlap - delay)
    w = torch.zeros(chunk)
    w[:delay] = 1.0
    for i in range(delay, delay + h):
        c = (delay + h - i) / (h + 1)
        w[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


class Guidance:
    """Per-row previous chunks and weights for one batch (rows without one get weight 0)."""

    def __init__(
        self, prev: torch.Tensor, weights: torch.Tensor, delays: Sequence[int], max_guidance: float
    ) -> None:
        self.prev = prev  # [B, H, A], zero where no previous action
        self.weights = weights  # [B, H]
        self.delays = list(delays)
        self.max_guidance = max_guidance

    def step(
        self, expert: FlowMatchingExpert, ctx: Context, x: torch.Tensor, tt: torch.Tensor, t: float, dt: float
    ) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = expert(x, tt, ctx)
            estimate = x - tt[:, None, None] * v  # the clean chunk this step points to
            err = (self.prev - estimate) * self.weights[:, :, None]
            (g,) = torch.autograd.grad(estimate, x, grad_outputs=err.detach())
        tau = 1.0 - t
        if tau <= 0.0:
            w = self.max_guidance
        else:
            r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
            w = min(self.max_guidance, (1 - tau) / (tau * r2))
        return (x - dt * v + dt * w * g).detach()

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for b, d in enumerate(self.delays):
            if d:
                x[b, :d] = self.prev[b, :d]
        return x
