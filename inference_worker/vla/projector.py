"""Projectors into the expert's width: VLM features (with the frame they came from) and state."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from inference_worker.engines.upload import upload


class FeatureProjector(nn.Module):
    """LayerNorm + Linear from the VLM's hidden size, plus a learned embedding of the frame
    slot (t-4, t-2, t) so the expert can tell the frames apart."""

    def __init__(self, vlm_hidden: int, dim: int, num_frames: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vlm_hidden)
        self.proj = nn.Linear(vlm_hidden, dim)
        self.frame = nn.Embedding(num_frames, dim)

    def forward(self, feats: torch.Tensor, frame_ids: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm(feats.to(self.proj.weight.dtype)))
        return x + self.frame(frame_ids)


class StateProjector(nn.Module):
    """Proprioceptive state -> one extra context token."""

    def __init__(self, state_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(state_dim, dim), nn.LayerNorm(dim))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.proj(state.to(self.proj[0].weight.dtype)).unsqueeze(1)


def pack_frames(
    samples: Sequence[Sequence[torch.Tensor]], device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, its frames' features (oldest first) -> padded (feats [B, L, D],
    frame ids [B, L], mask [B, L] True where real). The layout is worked out on the CPU
    and the features move with one gather: a few kernels, whatever the batch size."""
    import numpy as np

    first = samples[0][0]
    device = device or first.device
    sizes = [[f.shape[0] for f in frames] for frames in samples]
    lengths = [sum(s) for s in sizes]
    B, L, D = len(samples), max(lengths), first.shape[-1]
    ids = np.zeros((B, L), dtype=np.int64)
    mask = np.zeros((B, L), dtype=bool)
    dst = []
    for b, s in enumerate(sizes):
        ids[b, : lengths[b]] = np.repeat(np.arange(len(s)), s)
        mask[b, : lengths[b]] = True
        dst.append(b * L + np.arange(lengths[b]))
    flat = torch.cat([f.to(device=device, dtype=first.dtype) for frames in samples for f in frames])
    feats = torch.zeros(B * L, D, dtype=first.dtype, device=device)
    feats.index_copy_(0, upload(torch.from_numpy(np.concatenate(dst)), device), flat)
    return (
        feats.view(B, L, D),
        upload(torch.from_numpy(ids), device),
        upload(torch.from_numpy(mask), device),
    )
