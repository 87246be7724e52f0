"""Error codes carried by error replies (docs/PROTOCOL.md, "Error codes")."""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional


class ErrorCode(str, Enum):
    MALFORMED = "malformed"  # body is not msgpack, bad UTF-8, bad ndarray extension
    TOO_LARGE = "too_large"  # message or frame over the configured limits
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"  # kind not in the protocol, or not served on that stream
    INVALID = "invalid"  # schema validation failed: missing field, wrong type, shape or dtype
    EXPIRED = "expired"  # deadline passed before the model ran
    DEADLINE_EXCEEDED = "deadline_exceeded"  # deadline passed while the model ran it: it was stopped
    SUPERSEDED = "superseded"  # a newer latest_only request of the same session replaced it
    DEAD_LETTER = "dead_letter"  # delivered max_deliveries times without completing
    INTERNAL = "internal"  # the handler raised; the worker kept running
    BACKLOG_FULL = "backlog_full"  # raised to the sender at publish time, never a reply


class ProtocolError(Exception):
    """A request that cannot be served, with the code its error reply carries."""

    def __init__(self, code: ErrorCode, message: str, detail: Optional[Any] = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
