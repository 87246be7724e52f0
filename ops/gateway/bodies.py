"""Reading HTTP request bodies: bounded in size, JSON objects only, clear 4xx otherwise."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict

from starlette.requests import Request

from ops.gateway.errors import GatewayError

# JSON carries images as base64 (4/3 of the bytes) and some text around them.
_JSON_OVERHEAD = 1.5


async def read_json(request: Request, max_message_bytes: int) -> Dict[str, Any]:
    limit = int(max_message_bytes * _JSON_OVERHEAD)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise GatewayError(
            413, f"body is {length} bytes; the limit is {limit} (VLMQ_MAX_MESSAGE_BYTES x 1.5)", "too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"body is over the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"body is not valid JSON: {exc}", "malformed") from None
    if not isinstance(data, dict):
        raise GatewayError(400, f"body must be a JSON object, got {type(data).__name__}", "invalid")
    return data


def b64_image(value: Any, field: str) -> bytes:
    """Bytes of a base64 image given bare or as a data: URL."""
    if not isinstance(value, str) or not value:
        raise GatewayError(400, f"{field} must be a base64 string (PNG or JPEG)", "invalid")
    payload = value.partition(",")[2] if value.startswith("data:") else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, f"{field} is not valid base64", "invalid") from None
