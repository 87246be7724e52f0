"""Chat prompts -> one left-padded batch of model inputs, the way the Qwen processor builds them.

Chat template, one placeholder token per image token, tokenisation with left padding,
`mm_token_type_ids`, pixel values (pixels.py, on the model's device) and the M-RoPE
positions of every token (computed on CPU tensors: the model's own `get_rope_index`
walks rows in Python and would sync the GPU once per row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from inference_worker.engines.pixels import ImagePolicy, pixel_values
from inference_worker.engines.positions import mrope_positions
from inference_worker.engines.prompt import ChatPrompt
from inference_worker.engines.upload import upload_many
from schemas.errors import ErrorCode, ProtocolError


@dataclass
class ImageInputs:
    pixel_values: Any  # (patches, C*T*p*p) on the device
    image_grid_thw: Any  # (images, 3) on the device
    grids: List[Any]  # (t, h, w) per image, on the CPU


@dataclass
class BatchInputs:
    input_ids: Any  # (B, S) long, left-padded
    attention_mask: Any  # (B, S)
    mm_token_type_ids: Any  # (B, S) int: 1 on image tokens
    position_ids: Any  # (3, B, S) M-RoPE positions
    next_positions: Any  # (B,) the rope position of each row's first new token
    pixel_values: Optional[Any] = None
    image_grid_thw: Optional[Any] = None
    grids: List[Any] = field(default_factory=list)  # (t, h, w) per image, on the CPU
    image_index: Optional[Any] = None  # (image tokens,) flat positions in (B*S) of the image tokens
    image_features: Optional[Any] = None  # (image tokens, hidden) if the vision tower already ran
    row_lengths: List[int] = field(default_factory=list)  # real (unpadded) tokens of each row

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def prompt_tokens(self) -> List[int]:
        return list(self.row_lengths)

    def model_kwargs(self) -> Dict[str, Any]:
        kw = dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            mm_token_type_ids=self.mm_token_type_ids,
            position_ids=self.position_ids,
        )
        if self.pixel_values is not None:
            kw.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return kw


class InputBuilder:
    def __init__(self, model: Any, processor: Any, policy: ImagePolicy, device: Any, dtype: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.policy = policy
        self.device = device
        self.dtype = dtype
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id

    def render(self, prompt: ChatPrompt) -> str:
        """The chat template applied, ending with the assistant's turn header."""
        if prompt.rendered is None:
            prompt.rendered = self.processor.apply_chat_template(
                prompt.messages, tokenize=False, add_generation_prompt=True
            )
        return prompt.rendered

    def check(self, prompt: ChatPrompt, max_tokens: int = 0) -> ChatPrompt:
        """Render and tokenize one prompt, raising the ProtocolError it would fail with (one
        request, not its batch): placeholders that don't match the images, or more than
        `max_tokens` tokens (0: no limit). `build` reuses the tokens."""
        if prompt.short_ids is not None:
            return prompt
        text = self.render(prompt)
        counts = self.image_tokens(text, prompt)
        ids = self.tokenizer(text)["input_ids"]
        n = len(ids) + sum(c - 1 for c in counts)
        if max_tokens and n > max_tokens:
            raise ProtocolError(ErrorCode.INVALID, f"the prompt has {n} tokens; the limit is {max_tokens}")
        prompt.short_ids, prompt.tokens = ids, n
        return prompt

    def image_tokens(self, text: str, prompt: ChatPrompt) -> List[int]:
        """How many placeholder tokens each image of the prompt takes."""
        placeholders = text.count(self.image_token)
        if placeholders != len(prompt.images):
            raise ProtocolError(
                ErrorCode.INVALID,
                f"the prompt has {placeholders} image placeholder(s) but {len(prompt.images)} image(s)",
            )
        return self._counts(prompt)

    def _counts(self, prompt: ChatPrompt) -> List[int]:
        return [self.policy.num_tokens(img.shape[0], img.shape[1]) for img in prompt.images]

    def _expand(self, ids: List[int], counts: List[int]) -> List[int]:
        """One placeholder id per image -> as many as the image has tokens. Tokenising the
        short form is exact (the placeholder is one special token) and ~3x cheaper."""
        if not counts:
            return ids
        out: List[int] = []
        it = iter(counts)
        for t in ids:
            if t == self.image_token_id:
                out.extend([t] * next(it))
            else:
                out.append(t)
        return out

    def images(self, prompts: Sequence[ChatPrompt]) -> Optional[ImageInputs]:
        """The prompts' images as pixel values on the device (None if there are none)."""
        images = [img for p in prompts for img in p.images]
        if not images:
            return None
        pv, grid = pixel_values(images, self.policy, self.device, self.dtype)
        grids = [(1, img_h, img_w) for img_h, img_w in self.policy.grids(images)]
        return ImageInputs(pv, grid, grids)

    def build(self, prompts: Sequence[ChatPrompt], images: Optional[ImageInputs] = None) -> BatchInputs:
        """The batch; `images` if `self.images(prompts)` was called already (the engine starts
        the vision tower on them before the text side is built)."""
        for p in prompts:
            self.check(p)
        if images is None:
            images = self.images(prompts)
        grids = images.grids if images is not None else []
        # image tokens per image from the grids the tower gets (merge x merge patches a token)
        per_image = iter([t * h * w // self.policy.merge_size**2 for t, h, w in grids])
        rows = [self._expand(p.short_ids, [next(per_image) for _ in p.images]) for p in prompts]
        lengths = np.array([len(r) for r in rows])
        width = int(lengths.max())
        ids_np = np.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        for i, r in enumerate(rows):
            ids_np[i, width - len(r) :] = r
        mask_np = (np.arange(width)[None, :] >= (width - lengths)[:, None]).astype(np.int64)
        mm_np = (ids_np == self.image_token_id).astype(np.int32)
        pos, nxt = mrope_positions(mm_np, mask_np, grids, self.policy.merge_size)
        arrays = [ids_np, mask_np, mm_np, pos, nxt]
        if images is not None:
            arrays.append(np.flatnonzero(mm_np))
        on_device = upload_many(arrays, self.device)
        return BatchInputs(
            input_ids=on_device[0],
            attention_mask=on_device[1],
            mm_token_type_ids=on_device[2],
            position_ids=on_device[3],
            next_positions=on_device[4],
            pixel_values=images.pixel_values if images is not None else None,
            image_grid_thw=images.image_grid_thw if images is not None else None,
            grids=grids,
            image_index=on_device[5] if images is not None else None,
            row_lengths=lengths.tolist(),
        )
