"""Features of a frozen Qwen-VL: the hidden states after decoder layer k, one frame at a time.

Each frame is encoded on its own ("<vision_start><image><vision_end>instruction"), in
training and in serving alike, so the per-session cache in the worker is exact, not an
approximation of a joint multi-frame pass: a frame's features never depend on its
neighbours. The VLM runs only up to layer k, through a *view* of the model whose layer
list is cut at k and whose final norm is dropped; the view shares every weight with the
loaded model, which other handlers of the same worker keep using unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference_worker.engines.decoder import bucket
from inference_worker.engines.upload import FrameStaging

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
RESERVED = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _view(module: nn.Module, **replace: nn.Module) -> nn.Module:
    """A shallow copy of `module` with some children replaced; parameters stay shared."""
    view = copy.copy(module)
    view._modules = dict(module._modules)  # the copy's own child table, so the original is untouched
    for name, child in replace.items():
        setattr(view, name, child)
    return view


def truncated_base(model: nn.Module, layers: int) -> nn.Module:
    """The base model (vision tower + decoder) of a Qwen-VL *ForConditionalGeneration,
    running only its first `layers` decoder layers and no final norm."""
    base = model.model
    text = base.language_model
    cut = _view(text, layers=nn.ModuleList(list(text.layers)[:layers]), norm=nn.Identity())
    return _view(base, language_model=cut)


def decoder_layers(model: nn.Module) -> int:
    return len(model.model.language_model.layers)


class FeatureExtractor:
    """Frozen VLM -> per-frame features [tokens, hidden] (image and instruction tokens).

    Inputs are built by the chat engine's InputBuilder (pixels prepared on the model's
    device, M-RoPE positions precomputed) and the vision tower gets the engine's
    batched-attention and patch-embedding speedups (elementwise fusion on CUDA); a VLM
    shared with the chat handlers has them already. The pass itself is the engine's: the
    vision tower with precomputed plans (vision_encoder.py), started on the frames before
    the CPU builds the prompts, then the first k layers of the text stack (text_stack.py);
    at small batches each half replays as a CUDA graph (feature_graphs.py). Qwen3-VL
    (deepstack) runs transformers' forward of the cut model."""

    def __init__(self, vlm: Any, layer: Optional[int], image_size: int) -> None:
        from inference_worker.engines.inputs import InputBuilder
        from inference_worker.engines.patch_embedding import use_linear_patch_embedding
        from inference_worker.engines.pixels import ImagePolicy
        from inference_worker.engines.text_stack import TextStack
        from inference_worker.engines.vision_attention import use_packed_vision_attention
        from inference_worker.engines.vision_encoder import VisionEncoder, has_deepstack

        self.vlm = vlm  # LoadedVLM
        n = decoder_layers(vlm.model)
        self.layer = n // 2 if layer is None else int(layer)
        if not 1 <= self.layer <= n:
            raise ValueError(f"vlm_layer {self.layer} is out of range 1..{n}")
        self.image_size = image_size
        self.hidden = int(vlm.model.config.text_config.hidden_size)
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        use_packed_vision_attention(vlm.model)
        use_linear_patch_embedding(vlm.model)
        if vlm.device.type == "cuda":
            from inference_worker.engines.vision_fusion import fuse_vision_ops

            fuse_vision_ops(vlm.model)
        self.view = truncated_base(vlm.model, self.layer)
        self.vision = VisionEncoder(vlm.model)
        # Qwen3-VL's deepstack features enter inside the text layers: transformers' forward
        self.stack = (
            None if has_deepstack(vlm.model) else TextStack(vlm.model, compile=vlm.device.type == "cuda")
        )
        self.graphs: Optional[Any] = None
        self._frames = FrameStaging()
        self.image_token = getattr(vlm.processor, "image_token", "<|image_pad|>")
        policy = ImagePolicy.from_image_processor(vlm.processor.image_processor)
        self.inputs = InputBuilder(vlm.model, vlm.processor, policy, vlm.device, vlm.dtype)
        self.input_size = policy.target_size(image_size, image_size)
        self._instruction_ids: Dict[str, List[int]] = {}

    def use_cuda_graphs(self, max_batch: int = 64) -> bool:
        """Replay the feature pass of batches up to max_batch as CUDA graphs (feature_graphs.py)."""
        if self.device.type != "cuda" or self.stack is None or not self.vision.sync_free:
            return False
        from inference_worker.vla.feature_graphs import FeatureGraphs

        self.graphs = FeatureGraphs(self, max_batch=max_batch)
        return True

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.dtype

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.vlm.model.parameters())

    def _upload(self, frames: Sequence[np.ndarray]) -> List[Tuple[List[int], torch.Tensor]]:
        """The frames as uint8 (n, H, W, 3) tensors on the device, one per frame size, with
        the indices of the frames each holds."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault(f.shape, []).append(i)
        return [
            (idx, self._frames.upload([frames[i][..., :3] for i in idx], self.device))
            for idx in groups.values()
        ]

    def prepare_pixels(self, frames: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """uint8 frames (n, H, W, 3) on the device -> the tower's pixel rows (n * patches,
        C*T*p*p) and the frames' patch grid: one bicubic resize to the model's input size
        (image_size rounded by the processor's policy), then normalise and patchify as the
        processor does. Resizing on the device keeps ~2 ms of PIL work per frame off the
        CPU (a batch of 64 would wait ~130 ms). Device work only: the frame graphs capture it."""
        from inference_worker.engines.pixels import normalize, patchify

        h, w = self.input_size
        x = frames.permute(0, 3, 1, 2)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)
        values, grid = patchify(normalize(x, self.inputs.policy), self.inputs.policy, self.dtype)
        return values.reshape(-1, values.shape[-1]), grid

    def _pixels(self, frames: Sequence[np.ndarray]):
        """Frames -> the tower's inputs (ImageInputs), on the device, in order."""
        return self._images(self._upload(frames), len(frames))

    def _images(self, groups: List[Tuple[List[int], torch.Tensor]], n: int):
        from inference_worker.engines.inputs import ImageInputs
        from inference_worker.engines.upload import constant

        prepared = [self.prepare_pixels(x) for _, x in groups]
        grids: List[Any] = [None] * n
        rows: List[Any] = [None] * n
        for (idx, _), (values, grid) in zip(groups, prepared):
            for i, part in zip(idx, values.chunk(len(idx))):
                grids[i], rows[i] = grid, part
        # one frame size (the usual case): the rows are in order already
        values = prepared[0][0] if len(groups) == 1 else torch.cat(rows, dim=0)
        return ImageInputs(values, constant(grids, self.device, torch.long), grids)

    def _prompt(self, frame: np.ndarray, instruction: str):
        """`<vision_start><image><vision_end>instruction` as a checked prompt; the
        instruction's tokens are cached (a session sends the same one every step)."""
        from inference_worker.engines.prompt import ChatPrompt

        ids = self._instruction_ids.get(instruction)
        if ids is None:
            ids = self.vlm.tokenizer(
                f"{VISION_START}{self.image_token}{VISION_END}{instruction}", add_special_tokens=False
            )["input_ids"]
            if len(self._instruction_ids) >= 4096:
                self._instruction_ids.clear()
            self._instruction_ids[instruction] = ids
        return ChatPrompt(messages=[], images=[frame], rendered="", short_ids=list(ids), tokens=len(ids))

    @staticmethod
    def check_instruction(text: str) -> None:
        for tok in RESERVED:
            if tok in text:
                raise ValueError(f"the instruction must not contain the special token {tok}")

    def image_features(self, frames: Sequence[np.ndarray]):
        """(ImageInputs, the tower's output) for the frames, queued on the GPU and not
        waited for. With frame graphs, frames of one size run pixel preparation and tower
        as one replay (the ImageInputs then hold only the grids); the output is None where
        the model's own forward runs the tower (deepstack)."""
        from inference_worker.engines.inputs import ImageInputs

        groups = self._upload(frames)
        if self.graphs is not None and len(groups) == 1:
            out = self.graphs.image_features(groups[0][1])
            if out is not None:
                feats, grid = out
                return ImageInputs(None, None, [grid] * len(frames)), feats
        images = self._images(groups, len(frames))
        if self.stack is None:
            return images, None
        return images, self.vision(images.pixel_values, images.grids, images.image_grid_thw)

    def hidden_states(self, batch, feats: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S, hidden) after layer k for a built batch; `feats`: its image features if
        image_features already gave them."""
        if self.stack is None:
            return self.view(**batch.model_kwargs(), use_cache=False).last_hidden_state
        if feats is None:
            feats = self.vision(batch.pixel_values, batch.grids, batch.image_grid_thw)
        if self.graphs is not None:
            out = self.graphs(batch, feats)
            if out is not None:
                return out
        h = self.stack.input_embeddings(batch.input_ids, feats, batch.image_index)
        cache = self.stack.new_cache(batch.batch, batch.length, layers=self.layer)
        return self.stack.prefill(cache, h, batch.position_ids, batch.attention_mask, layers=self.layer)

    @torch.no_grad()
    def encode(self, frames: Sequence[np.ndarray], instructions: Sequence[str]) -> List[torch.Tensor]:
        """One forward pass for all frames; returns one [tokens_i, hidden] tensor per frame."""
        if not frames:
            return []
        for text in instructions:
            self.check_instruction(text)
        n = len(frames)
        if self.graphs is not None and n <= self.graphs.max_batch:
            # graphs are captured per batch bucket: a batch of 5 replays the graph of 8, its
            # last frame repeated (served batch sizes vary from one batch to the next, and a
            # capture per size would cost far more than the padding)
            pad = bucket(n) - n
            frames = list(frames) + [frames[-1]] * pad
            instructions = list(instructions) + [instructions[-1]] * pad
        # the tower runs on the GPU while the CPU builds the prompts
        images, feats = self.image_features(frames)
        prompts = [self._prompt(f, t) for f, t in zip(frames, instructions)]
        batch = self.inputs.build(prompts, images)
        hidden = self.hidden_states(batch, feats)
        # left-padded rows: each frame's tokens are the last `length` columns of its row
        # (lengths are known on the CPU: slicing needs no GPU->CPU sync)
        return [hidden[i, batch.length - k :] for i, k in enumerate(batch.row_lengths[:n])]
