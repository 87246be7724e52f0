"""Requests and replies as JSON for traces: images become JPEG data URLs (the OpenAI form
the SFT export writes), arrays become lists. Pillow is needed only when frames are kept."""

from __future__ import annotations

import base64
from typing import Any, Dict, List

import numpy as np
from pydantic import BaseModel

from schemas.images import encode_jpeg, image_format


def data_url(image: Any, quality: int = 90) -> str:
    if isinstance(image, np.ndarray):
        raw, mime = encode_jpeg(image, quality), "image/jpeg"
    else:
        raw = bytes(image)
        mime = f"image/{image_format(raw)}"
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def message_json(messages: List[Any]) -> List[Dict[str, Any]]:
    """ChatMessage list -> OpenAI-style dicts, images inlined as data URLs."""
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for p in m.content:
            if p.type == "text":
                parts.append({"type": "text", "text": p.text})
            else:
                parts.append({"type": "image_url", "image_url": {"url": data_url(p.image)}})
        out.append({"role": m.role, "content": parts})
    return out


def jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return jsonable(value.model_dump(exclude_none=True))
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def request_json(req: Any) -> Dict[str, Any]:
    """The request without its pixels: messages as OpenAI dicts, image fields dropped
    (the step's frame is stored once, as a JPEG blob)."""
    body = req.model_dump(exclude_none=True, exclude={"image", "image_a", "image_b", "prev_chunk"})
    if getattr(req, "messages", None):
        body["messages"] = message_json(req.messages)
    return jsonable(body)
