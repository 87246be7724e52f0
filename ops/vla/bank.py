"""Training-time feature cache: every frame of a dataset encoded once by the frozen VLM.

A frame is in up to `num_frames` training samples and the VLM never changes, so the
expert trains on stored features: the VLM runs once per frame, not once per sample and
epoch. Features are exact (each frame is encoded alone, as in serving).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from ops.vla.dataset import Episode, action_chunk, frame_steps


class FeatureBank:
    def __init__(
        self, feats: torch.Tensor, lengths: torch.Tensor, offsets: List[int], episodes: List[Episode]
    ) -> None:
        self.feats = feats  # [frames, Lmax, D]
        self.lengths = lengths  # [frames]
        self.offsets = offsets  # first frame of each episode in `feats`
        self.episodes = episodes
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))]

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def build(
        cls,
        vla,
        episodes: List[Episode],
        batch_size: int = 32,
        device: Optional[torch.device] = None,
        progress: bool = False,
        desc: str = "encoding frames",
    ) -> FeatureBank:
        jobs = [(ep.frames[t], ep.instruction) for ep in episodes for t in range(len(ep))]
        out: List[torch.Tensor] = []
        it = range(0, len(jobs), batch_size)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=desc, unit="batch")
        for i in it:
            part = jobs[i : i + batch_size]
            out += vla.encode([f for f, _ in part], [t for _, t in part])
        device = device or vla.device
        lengths = torch.tensor([f.shape[0] for f in out])
        L, D = int(lengths.max()), out[0].shape[-1]
        feats = torch.zeros(len(out), L, D, dtype=out[0].dtype, device=device)
        for n, f in enumerate(out):
            feats[n, : f.shape[0]] = f.to(device)
        offsets = list(np.cumsum([0] + [len(ep) for ep in episodes[:-1]]))
        return cls(feats, lengths.to(device), [int(o) for o in offsets], episodes)

    def batch(
        self, indices: torch.Tensor, num_frames: int, frame_skip: int, chunk_size: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [B, F*L, D], frame ids, mask, actions [B, H, A], action mask [B, H])."""
        rows, acts, amask = [], [], []
        for i in indices.tolist():
            e, t = self.index[i]
            rows.append([self.offsets[e] + s for s in frame_steps(t, num_frames, frame_skip)])
            a, m = action_chunk(self.episodes[e].actions, t, chunk_size)
            acts.append(a)
            amask.append(m)
        dev = self.feats.device
        idx = torch.tensor(rows, device=dev)  # [B, F]
        B, F = idx.shape
        L, D = self.feats.shape[1:]
        feats = self.feats[idx].reshape(B, F * L, D)
        mask = (torch.arange(L, device=dev)[None, None, :] < self.lengths[idx][:, :, None]).reshape(B, F * L)
        ids = torch.arange(F, device=dev).repeat_interleave(L)[None, :].expand(B, -1)
        actions = torch.from_numpy(np.stack(acts)).to(dev)
        action_mask = torch.from_numpy(np.stack(amask)).to(dev)
        return feats, ids, mask, actions, action_mask
