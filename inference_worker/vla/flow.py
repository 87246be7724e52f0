"""Flow matching (pi0's convention): x_t = t * noise + (1 - t) * actions, velocity target
u = noise - actions, t = 1 is pure noise. Sampling integrates from t = 1 to t = 0 with
Euler steps x <- x - dt * v(x, t)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from inference_worker.vla.expert import Context, FlowMatchingExpert, time_embedding
from inference_worker.vla.rtc import Guidance


def sample_time(
    batch: int, beta: Tuple[float, float], device: torch.device, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Training timesteps: 0.999 * Beta(a, b) + 0.001 (never exactly clean).

    Drawn by inverting the Beta CDF on a fine grid, so that a torch.Generator can fix the
    draw (torch.distributions.Beta takes none)."""
    a, b = beta
    grid = torch.linspace(1e-6, 1 - 1e-6, 4097, dtype=torch.float64)
    cdf = torch.cumsum(grid ** (a - 1) * (1 - grid) ** (b - 1), 0)
    cdf = cdf / cdf[-1]
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    t = grid[torch.searchsorted(cdf, u).clamp(max=len(grid) - 1)].float()
    return (0.999 * t + 0.001).to(device)


def flow_matching_loss(
    expert: FlowMatchingExpert,
    ctx: Context,
    actions: torch.Tensor,
    action_mask: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    t: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """MSE between predicted and target velocity, over the real (unpadded) actions."""
    B = actions.shape[0]
    if noise is None:
        noise = torch.randn(actions.shape, generator=generator).to(actions.device)
    if t is None:
        t = sample_time(B, expert.cfg.time_beta, actions.device, generator)
    tt = t[:, None, None]
    x_t = tt * noise + (1 - tt) * actions
    v = expert(x_t, t, ctx)
    err = (v - (noise - actions)) ** 2
    if action_mask is None:
        return err.mean()
    w = action_mask.to(err.dtype)[:, :, None].expand_as(err)
    return (err * w).sum() / w.sum().clamp(min=1.0)


def euler_sample(
    expert: FlowMatchingExpert,
    ctx: Context,
    noise: torch.Tensor,
    num_steps: int,
    guidance: Optional[Guidance] = None,
) -> torch.Tensor:
    """Integrate the flow from noise (t = 1) to actions (t = 0); with `guidance`, each step
    is pulled toward the previous chunk (real-time chunking)."""
    x = noise
    dt = 1.0 / num_steps
    B = noise.shape[0]
    # every step's time embedding at once, one set of kernels instead of one per step (t in
    # float64 like the Python float t below, then rounded to float32)
    times = (1.0 - torch.arange(num_steps, dtype=torch.float64, device=x.device) * dt).float()
    embeddings = time_embedding(times, expert.cfg.expert_dim)
    for k in range(num_steps):
        t = 1.0 - k * dt
        tt = times[k : k + 1].expand(B)
        if guidance is None:
            with torch.no_grad():
                x = x - dt * expert(x, tt, ctx, embeddings[k : k + 1])
        else:
            x = guidance.step(expert, ctx, x, tt, t, dt)
    return guidance.finish(x) if guidance is not None else x
