"""QwenVLA: frozen Qwen-VL features + the flow-matching expert, saved as one folder.

The folder holds config.json (VLAConfig) and expert.safetensors (the expert: projectors
included); the VLM is referenced by path, never copied. Load with `QwenVLA.load(DIR)`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from inference_worker.engines.upload import upload
from inference_worker.vla.config import EXPERT_FILE, VLAConfig
from inference_worker.vla.expert import Context, FlowMatchingExpert
from inference_worker.vla.features import FeatureExtractor
from inference_worker.vla.flow import euler_sample, flow_matching_loss
from inference_worker.vla.projector import pack_frames
from inference_worker.vla.rtc import Guidance


class QwenVLA:
    def __init__(
        self, config: VLAConfig, expert: FlowMatchingExpert, extractor: Optional[FeatureExtractor]
    ) -> None:
        self.config = config
        self.expert = expert
        self.extractor = extractor

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        config: VLAConfig,
        vlm: Any = None,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        quantize: Optional[str] = None,
        seed: int = 0,
    ) -> QwenVLA:
        """A new expert (random init, seeded) on the VLM at config.vlm_path (or `vlm`, a LoadedVLM)."""
        vlm = vlm or _load_vlm(config.vlm_path, device, dtype, quantize)
        extractor = FeatureExtractor(vlm, config.vlm_layer, config.image_size)
        config = replace(config, vlm_layer=extractor.layer, vlm_hidden=extractor.hidden)
        torch.manual_seed(seed)
        expert = FlowMatchingExpert(config).to(vlm.device)
        return cls(config, expert, extractor)

    @classmethod
    def load(
        cls,
        folder: str,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        quantize: Optional[str] = None,
        vlm: Any = None,
        vlm_path: Optional[str] = None,
        with_vlm: bool = True,
    ) -> QwenVLA:
        """Load a VLA folder. `vlm` reuses an already loaded VLM (the worker's); `vlm_path`
        overrides the folder's; with_vlm=False loads the expert alone (training on cached
        features)."""
        from safetensors.torch import load_file

        config = VLAConfig.load(folder)
        if vlm_path:
            config = replace(config, vlm_path=vlm_path)
        extractor = None
        dev = torch.device(device)
        if with_vlm:
            vlm = vlm or _load_vlm(config.resolve_vlm_path(folder), device, dtype, quantize)
            extractor = FeatureExtractor(vlm, config.vlm_layer, config.image_size)
            if extractor.hidden != config.vlm_hidden:
                raise ValueError(
                    f"{folder}: the expert was trained on features of width {config.vlm_hidden}, "
                    f"the VLM at {config.vlm_path} has {extractor.hidden}"
                )
            dev = vlm.device
        expert = FlowMatchingExpert(config)
        expert.load_state_dict(load_file(os.path.join(folder, EXPERT_FILE), device="cpu"))
        return cls(config, expert.to(dev), extractor)

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        self.config.save(folder)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.expert.state_dict().items()}
        save_file(state, os.path.join(folder, EXPERT_FILE), metadata={"format": "vlmq-vla/1"})

    def parameter_counts(self) -> Dict[str, int]:
        trainable = sum(p.numel() for p in self.expert.parameters())
        frozen = self.extractor.parameter_count() if self.extractor else 0
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}

    def describe(self) -> str:
        c = self.parameter_counts()
        share = 100.0 * c["trainable"] / max(c["total"], 1)
        return (
            f"QwenVLA: {c['total']:,} parameters; trainable (expert) {c['trainable']:,} ({share:.1f}%), "
            f"frozen (VLM) {c['frozen']:,}; features after layer {self.config.vlm_layer} "
            f"(width {self.config.vlm_hidden}); chunk {self.config.chunk_size} x {self.config.action_dim}"
        )

    @property
    def device(self) -> torch.device:
        return next(self.expert.parameters()).device

    # ------------------------------------------------------------------ the pieces

    def encode(self, frames: Sequence[np.ndarray], instructions: Sequence[str]) -> List[torch.Tensor]:
        if self.extractor is None:
            raise RuntimeError("this QwenVLA was loaded without its VLM (with_vlm=False)")
        return self.extractor.encode(frames, instructions)

    def context(
        self, samples: Sequence[Sequence[torch.Tensor]], state: Optional[torch.Tensor] = None
    ) -> Context:
        """Per sample, the features of its frames (oldest first) -> the expert's context."""
        feats, ids, mask = pack_frames(samples, self.device)
        return self.expert.prepare(feats, ids, mask, state)

    def loss(
        self, ctx: Context, actions: torch.Tensor, action_mask: Optional[torch.Tensor] = None, **kw
    ) -> torch.Tensor:
        return flow_matching_loss(self.expert, ctx, actions, action_mask, **kw)

    def noise(self, seeds: Sequence[Optional[int]]) -> torch.Tensor:
        """Initial noise per sample; a seed fixes it (drawn on CPU: the same on every device)."""
        shape = (self.config.chunk_size, self.config.action_dim)
        rows = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s)) if s is not None else None
            rows.append(torch.randn(shape, generator=g))
        return upload(torch.stack(rows), self.device)

    def sample(self, ctx: Context, noise: torch.Tensor, guidance: Optional[Guidance] = None) -> torch.Tensor:
        return euler_sample(self.expert, ctx, noise, self.config.num_steps, guidance)

    # ------------------------------------------------------------------ end to end

    def encode_samples(
        self, frames: Sequence[Sequence[np.ndarray]], instructions: Sequence[str]
    ) -> List[List[torch.Tensor]]:
        """Per sample, its frames (oldest first) -> their features, in one VLM pass."""
        flat = [f for fs in frames for f in fs]
        texts = [t for fs, t in zip(frames, instructions) for _ in fs]
        feats = self.encode(flat, texts)
        out, i = [], 0
        for fs in frames:
            out.append(feats[i : i + len(fs)])
            i += len(fs)
        return out

    def forward_loss(
        self,
        frames: Sequence[Sequence[np.ndarray]],
        instructions: Sequence[str],
        actions: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Images to loss in one call, the frozen VLM in the graph."""
        ctx = self.context(self.encode_samples(frames, instructions))
        return self.loss(ctx, actions.to(self.device), action_mask)

    def predict(
        self,
        frames: Sequence[Sequence[np.ndarray]],
        instructions: Sequence[str],
        seeds: Optional[Sequence[Optional[int]]] = None,
    ) -> torch.Tensor:
        """Images to chunks [B, chunk, action_dim], encoding every frame."""
        per = self.encode_samples(frames, instructions)
        with torch.no_grad():
            ctx = self.context(per)
        return self.sample(ctx, self.noise(seeds or [None] * len(frames)))


def _load_vlm(path: str, device: str, dtype: str, quantize: Optional[str]):
    from inference_worker.models.loading import load_vlm

    return load_vlm(path, device=device, dtype=dtype, quantize=quantize)
