"""Images -> `pixel_values` + `image_grid_thw`, batched in torch, same layout as the Qwen processor.

The stock PIL image processor costs 3-8 ms per 224-px frame on these CPUs, one image
at a time: 128 frames would take longer than the model. This path does the same steps
(smart_resize, PIL bicubic resize when the size changes, rescale, normalise, temporal
duplication, patch/merge layout) with one tensor op per step for all images of a size,
on the model's device. test_pixels_match_the_stock_image_processor
(tests/test_models_engine.py) checks it against the stock processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np

from inference_worker.engines.upload import constant, upload


@dataclass(frozen=True)
class ImagePolicy:
    """How images are sized before the vision tower: image tokens drive the cost."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    rescale: float = 1.0 / 255.0

    @classmethod
    def from_image_processor(cls, ip, min_pixels: int = 0, max_pixels: int = 0) -> ImagePolicy:
        size = dict(ip.size) if ip.size is not None else {}
        return cls(
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            min_pixels=int(min_pixels or size.get("shortest_edge") or 56 * 56),
            max_pixels=int(max_pixels or size.get("longest_edge") or 28 * 28 * 1280),
            mean=tuple(float(x) for x in ip.image_mean),
            std=tuple(float(x) for x in ip.image_std),
            rescale=float(ip.rescale_factor),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> Tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grids(self, images: Sequence[np.ndarray]) -> List[Tuple[int, int]]:
        """(patch rows, patch columns) of each image after resizing."""
        out = []
        for img in images:
            h, w = self.target_size(img.shape[0], img.shape[1])
            out.append((h // self.patch_size, w // self.patch_size))
        return out

    def num_tokens(self, height: int, width: int) -> int:
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // (self.merge_size**2)


def resized(image: np.ndarray, policy: ImagePolicy) -> np.ndarray:
    """The frame at the size the policy gives it (unchanged if it has that size)."""
    return _resize(image, *policy.target_size(image.shape[0], image.shape[1]))


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[0] == height and image.shape[1] == width:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def normalize(x, policy: ImagePolicy):
    """uint8 (n, C, H, W) -> float32, rescaled and normalised as the processor does it."""
    mean, std = _channel_stats(policy.mean, policy.std, str(x.device))
    return (x.float() * policy.rescale - mean) / std


@lru_cache(maxsize=16)
def _channel_stats(mean: Tuple[float, ...], std: Tuple[float, ...], device: str):
    """The policy's mean and std as (1, 3, 1, 1) tensors on the device, made once: a graph
    that captures `normalize` reads them by address."""
    return constant(mean, device).view(1, 3, 1, 1), constant(std, device).view(1, 3, 1, 1)


def patchify(x, policy: ImagePolicy, dtype):
    """Normalised images (n, C, H, W) of one size -> (n, patches, C*T*p*p) in the vision
    tower's patch order (merge windows together), and their grid (1, H/p, W/p)."""
    p, m, t = policy.patch_size, policy.merge_size, policy.temporal_patch_size
    n, c, h, w = x.shape
    gh, gw = h // p, w // p
    x = x.to(dtype)  # rounded before the layout copy, which then moves fewer bytes
    x = x.reshape(n, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (n, gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # a still image fills the temporal patch
    return x.reshape(n, gh * gw, c * t * p * p), (1, gh, gw)


def pixel_values(images: Sequence[np.ndarray], policy: ImagePolicy, device="cpu", dtype=None):
    """uint8 HxWx3 images -> (pixel_values [sum patches, C*T*p*p], image_grid_thw [n, 3]), in order."""
    import torch

    dtype = dtype or torch.float32
    sized = [resized(img, policy) for img in images]
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, img in enumerate(sized):
        groups.setdefault(img.shape[:2], []).append(i)
    per_image: List = [None] * len(sized)
    for idx in groups.values():
        batch = upload(torch.from_numpy(np.stack([sized[i] for i in idx])), device)
        x, grid = patchify(normalize(batch.permute(0, 3, 1, 2), policy), policy, dtype)
        for j, i in enumerate(idx):
            per_image[i] = (x[j], grid)
    values = torch.cat([v for v, _ in per_image], dim=0)
    grid = constant([g for _, g in per_image], device, torch.long)
    return values, grid
