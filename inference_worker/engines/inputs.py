"""Chat prompts -> one left-padded batch of model inputs, the way the Qwen processor builds them.

Chat template, one placeholder token per image token, tokenisation with left padding,
`mm_token_type_ids`, pixel values (pixels.py, on the model's device) and the M-RoPE
positions of every token (computed on CPU tensors: the model's own `get_rope_index`
walks rows in Python and would sync the GPU once per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from inference_worker.engines.pixels import ImagePolicy, pixel_values
from inference_worker.engines.prompt import ChatPrompt
from schemas.errors import ErrorCode, ProtocolError


@dataclass
class BatchInputs:
    input_ids: Any  # (B, S) long, left-padded
    attention_mask: Any  # (B, S)
    mm_token_type_ids: Any  # (B, S) int: 1 on image tokens
    position_ids: Any  # (3, B, S) M-RoPE positions
    next_positions: Any  # (B,) the rope position of each row's first new token
    pixel_values: Optional[Any] = None
    image_grid_thw: Optional[Any] = None

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def prompt_tokens(self) -> List[int]:
        return self.attention_mask.sum(dim=1).tolist()

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
        return self.processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)

    def expand_images(self, text: str, prompt: ChatPrompt) -> str:
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(prompt.images):
            raise ProtocolError(
                ErrorCode.INVALID,
                f"the prompt has {len(pieces) - 1} image placeholder(s) but {len(prompt.images)} image(s)",
            )
        out = [pieces[0]]
        for img, piece in zip(prompt.images, pieces[1:]):
            out.append(self.image_token * self.policy.num_tokens(img.shape[0], img.shape[1]))
            out.append(piece)
        return "".join(out)

    def build(self, prompts: Sequence[ChatPrompt], texts: Optional[Sequence[str]] = None) -> BatchInputs:
        import torch

        texts = list(texts) if texts is not None else [self.render(p) for p in prompts]
        expanded = [self.expand_images(t, p) for t, p in zip(texts, prompts)]
        enc = self.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
        mm = (input_ids == self.image_token_id).int()
        images = [img for p in prompts for img in p.images]
        pv = grid = None
        if images:
            pv, grid_dev = pixel_values(images, self.policy, self.device, self.dtype)
            grid = grid_dev.cpu()
            pos, _ = self.model.model.get_rope_index(
                input_ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask
            )
            grid = grid_dev
        else:
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
        next_pos = pos.amax(dim=(0, 2)) + 1
        dev = self.device
        return BatchInputs(
            input_ids=input_ids.to(dev),
            attention_mask=mask.to(dev),
            mm_token_type_ids=mm.to(dev),
            position_ids=pos.contiguous().to(dev),
            next_positions=next_pos.to(dev),
            pixel_values=pv,
            image_grid_thw=grid,
        )
