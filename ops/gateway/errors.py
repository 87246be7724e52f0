"""Errors the gateway answers with, and the HTTP status of each vlmq error code."""

from __future__ import annotations

from typing import Awaitable, Callable, Dict, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from schemas.errors import ErrorCode, ProtocolError

STATUS: Dict[ErrorCode, int] = {
    ErrorCode.MALFORMED: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_VERSION: 400,
    ErrorCode.UNKNOWN_KIND: 400,
    ErrorCode.INVALID: 400,
    ErrorCode.EXPIRED: 504,
    ErrorCode.SUPERSEDED: 409,
    ErrorCode.DEAD_LETTER: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BACKLOG_FULL: 429,
}

# OpenAI's error "type" for a status (its SDK picks the exception class by status alone).
_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
}


class GatewayError(Exception):
    """An HTTP error answer: status, a message a person can act on, and a short code."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        headers: Optional[Dict[str, str]] = None,
        param: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.param = param  # the request field at fault, when there is one

    @classmethod
    def from_protocol(cls, exc: ProtocolError) -> GatewayError:
        status = STATUS.get(exc.code, 500)
        headers = {"Retry-After": "1"} if exc.code == ErrorCode.BACKLOG_FULL else None
        return cls(status, exc.message, exc.code.value, headers, param=param_of(exc.detail))

    def openai_body(self) -> dict:
        kind = _OPENAI_TYPE.get(self.status) or (
            "server_error" if self.status >= 500 else "invalid_request_error"
        )
        if self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def detail_body(self) -> dict:
        """FastAPI's shape, which the MineRL policy server answered with."""
        return {"detail": self.message, "code": self.code}


def param_of(detail: object) -> Optional[str]:
    """The field a validation error names first (its `loc`), as OpenAI's `param`."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = detail[0].get("loc") or []
        return ".".join(str(x) for x in loc) or None
    return None


Endpoint = Callable[[Request], Awaitable[Response]]


def handle_errors(endpoint: Endpoint, shape: Callable[[GatewayError], dict]) -> Endpoint:
    """Answer a GatewayError raised by `endpoint` with its status, in the API's own shape."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except GatewayError as exc:
            return JSONResponse(shape(exc), status_code=exc.status, headers=exc.headers)

    return wrapped
