"""A chat prompt as the engines take it: template-ready messages plus their images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from schemas.images import decode_image
from schemas.limits import DEFAULT_LIMITS, Limits


@dataclass
class ChatPrompt:
    # OpenAI/Qwen-style messages whose image parts are {"type": "image"} placeholders;
    # `images` holds the frames in the order the placeholders appear.
    messages: List[Dict[str, Any]]
    images: List[np.ndarray] = field(default_factory=list)
    rendered: Optional[str] = None  # the chat template applied (InputBuilder.render)
    # filled by InputBuilder.check: the token ids with one placeholder per image (the short
    # form the tokenizer produces), and the prompt's length with every image token counted
    short_ids: Optional[List[int]] = None
    tokens: int = 0


def text_part(text: str) -> Dict[str, str]:
    return {"type": "text", "text": text}


def image_part() -> Dict[str, str]:
    return {"type": "image"}


def from_chat_messages(messages: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> ChatPrompt:
    """schemas.ChatMessage list -> ChatPrompt, decoding JPEG/PNG frames to uint8 arrays."""
    out: List[Dict[str, Any]] = []
    images: List[np.ndarray] = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts: List[Dict[str, Any]] = []
        for p in m.content:
            if p.type == "image":
                images.append(decode_image(p.image, limits))
                parts.append(image_part())
            else:
                parts.append(text_part(p.text))
        out.append({"role": m.role, "content": parts})
    return ChatPrompt(out, images)


def user_prompt(*parts: Any, system: str = "", limits: Limits = DEFAULT_LIMITS) -> ChatPrompt:
    """One user turn from strings and images (ndarray or encoded bytes), in order."""
    content: List[Dict[str, Any]] = []
    images: List[np.ndarray] = []
    for p in parts:
        if isinstance(p, str):
            content.append(text_part(p))
        else:
            images.append(decode_image(p, limits))
            content.append(image_part())
    messages: List[Dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return ChatPrompt(messages, images)
