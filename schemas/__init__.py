"""The wire: message types, error codes, the msgpack codec and size limits.

Both sides import this package; it depends on nothing else of ours.
"""

from schemas.codec import CodecError, packb, unpackb
from schemas.errors import ErrorCode, ProtocolError
from schemas.limits import Limits
from schemas.messages import (
    KINDS,
    PROTOCOL_VERSION,
    ActionChunkRequest,
    ActionChunkResult,
    ChatMessage,
    Constraint,
    ErrorInfo,
    Partial,
    PreferenceRequest,
    PreferenceResult,
    Reply,
    Request,
    StructuredActionRequest,
    StructuredActionResult,
    TextActionRequest,
    TextActionResult,
    decode_partial,
    decode_reply,
    decode_request,
    request_model,
    result_model,
)

__all__ = [
    "KINDS",
    "PROTOCOL_VERSION",
    "ActionChunkRequest",
    "ActionChunkResult",
    "ChatMessage",
    "CodecError",
    "Constraint",
    "ErrorCode",
    "ErrorInfo",
    "Limits",
    "Partial",
    "PreferenceRequest",
    "PreferenceResult",
    "ProtocolError",
    "Reply",
    "Request",
    "StructuredActionRequest",
    "StructuredActionResult",
    "TextActionRequest",
    "TextActionResult",
    "decode_partial",
    "decode_reply",
    "decode_request",
    "packb",
    "request_model",
    "result_model",
    "unpackb",
]
