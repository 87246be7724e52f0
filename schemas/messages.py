"""Typed messages for every task kind (docs/PROTOCOL.md is the normative description).

Why pydantic v2 rather than dataclasses: the worker must turn arbitrary bytes from the
wire into either a valid request or an error a person can act on ("messages.0.content:
field required"), and pydantic does exactly that in ~10 us per message, with the
constraints (ranges, patterns, literals) declared next to the fields. Dataclasses would
need the same checks written by hand. Arrays and image bytes pass through untouched
(``arbitrary_types_allowed``) and are checked by the small validators below.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Type, Union

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from schemas.codec import unpackb
from schemas.errors import ErrorCode, ProtocolError
from schemas.images import check_image
from schemas.limits import DEFAULT_LIMITS, Limits

# 2 added constrained answers, logprobs, n and streamed partial replies (all optional: a
# version-1 body means the same as before and is still served)
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = frozenset({1, 2})
MAX_N = 16  # answers of one text_action request
MAX_TOP_LOGPROBS = 20
KINDS = ("action_chunk", "preference", "text_action", "structured_action")

# Session ids become part of Redis key names, so they are kept to a safe alphabet.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def _check_image_count(n: int, info: ValidationInfo) -> None:
    cap = _limits(info).max_images
    if n > cap:
        raise ValueError(f"{n} images; the limit is {cap} per request (VLMQ_MAX_IMAGES)")


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    return ctx.get("limits", DEFAULT_LIMITS)


class _Model(BaseModel):
    # NaN and infinity are refused: a NaN deadline would never pass, a NaN temperature
    # would reach the sampler.
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """`null` for a field means the field is absent: it takes its default (or, when it
        has none, is missing)."""
        if isinstance(data, dict) and any(v is None for v in data.values()):
            return {k: v for k, v in data.items() if v is not None}
        return data


# ----------------------------------------------------------------------------- chat content


class TextPart(_Model):
    type: Literal["text"] = "text"
    text: str


class ImagePart(_Model):
    type: Literal["image"] = "image"
    image: Any = Field(description="uint8 ndarray (H, W, 3), or JPEG/PNG bytes")

    @field_validator("image", mode="before")
    @classmethod
    def _check(cls, v: Any, info: ValidationInfo) -> Any:
        return check_image(_from_data_url(v) if isinstance(v, str) else v, "image", _limits(info))


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


def _from_data_url(url: str) -> bytes:
    if not url.startswith("data:"):
        raise ValueError("only data: URLs are accepted for images (the worker fetches nothing)")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ValueError("image data URLs must be base64 encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image data URL is not valid base64") from None


class ChatMessage(_Model):
    """An OpenAI-style chat message; image_url parts with data URLs become image parts."""

    role: Literal["system", "user", "assistant"]
    content: Union[str, List[ContentPart]]

    @model_validator(mode="before")
    @classmethod
    def _normalise_parts(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            parts = []
            for part in data["content"]:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise ValueError("image_url part needs image_url.url")
                    part = {"type": "image", "image": _from_data_url(url)}
                parts.append(part)
            data = {**data, "content": parts}
        return data

    def images(self) -> List[Any]:
        if isinstance(self.content, str):
            return []
        return [p.image for p in self.content if isinstance(p, ImagePart)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


# ----------------------------------------------------------------------------- requests


class Request(_Model):
    """The header every request carries; one subclass per kind adds the payload."""

    v: int = PROTOCOL_VERSION
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=ID_PATTERN)
    session_id: str = Field("", pattern=ID_PATTERN)  # the client fills it in
    step: int = Field(0, ge=0)
    kind: str
    created_at: float = Field(default_factory=time.time)
    deadline: Optional[float] = None  # unix seconds; past it the request is answered `expired`
    model: Optional[str] = Field(None, pattern=MODEL_PATTERN)
    # When set, a newer request of this session and kind supersedes this one if both wait.
    latest_only: bool = False

    def expired(self, now: Optional[float] = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) > self.deadline

    def to_wire(self) -> Dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SamplingMixin(_Model):
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: List[str] = Field(default_factory=list, max_length=16)
    seed: Optional[int] = None

    @field_validator("max_tokens")
    @classmethod
    def _cap_tokens(cls, v: int, info: ValidationInfo) -> int:
        cap = _limits(info).max_new_tokens
        if v > cap:
            raise ValueError(f"max_tokens {v} is over the limit {cap} (VLMQ_MAX_NEW_TOKENS)")
        return v


class Constraint(_Model):
    """What a generated answer must match, enforced token by token while it is decoded."""

    type: Literal["text", "json_object", "json_schema", "regex", "choice", "grammar"]
    json_schema: Optional[Dict[str, Any]] = None  # json_schema: the JSON schema
    pattern: Optional[str] = None  # regex
    choices: Optional[List[str]] = Field(None, min_length=1, max_length=1024)  # choice
    grammar: Optional[str] = None  # grammar: EBNF (xgrammar's dialect, GBNF-like)
    # json_schema only: or plain text that does not start with "{" (a tool call or an answer)
    or_text: bool = False

    @model_validator(mode="after")
    def _needs_its_field(self) -> Constraint:
        need = {"json_schema": "json_schema", "regex": "pattern", "choice": "choices", "grammar": "grammar"}
        name = need.get(self.type)
        if name is not None and getattr(self, name) is None:
            raise ValueError(f"a {self.type} constraint needs `{name}`")
        return self


def _image_field(v: Any, info: ValidationInfo) -> Any:
    if v is None:
        return v
    field = info.field_name or "image"
    if isinstance(v, str):  # docs/PROTOCOL.md 4.2: data: URLs only inside chat messages
        raise ProtocolError(
            ErrorCode.INVALID,
            f"{field}: a string is not an image here (data: URLs are accepted only in chat "
            "messages); send JPEG/PNG bytes or a raw uint8 array",
        )
    return check_image(v, field, _limits(info))


class ActionChunkRequest(Request):
    """VLA: the newest frame; the worker keeps the features of earlier frames per session."""

    kind: Literal["action_chunk"] = "action_chunk"
    image: Any
    instruction: str = ""
    state: Optional[Any] = None  # float32 (state_dim,)
    reset: bool = False  # episode start: drop this session's cached features
    noise_seed: Optional[int] = None  # fixes the flow-matching noise (reproducible chunks)
    # Real-time chunking (arXiv 2506.07339): the previous chunk, aligned so that row 0 is the
    # action that will execute when this request was sent, and how many of its actions will
    # run before the new chunk arrives (frozen), and how many more to guide toward.
    prev_chunk: Optional[Any] = None
    inference_delay: int = Field(0, ge=0)
    execution_horizon: Optional[int] = Field(None, ge=1)

    _image = field_validator("image", mode="before")(_image_field)

    @field_validator("state", "prev_chunk", mode="before")
    @classmethod
    def _float_array(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return v
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f":
            raise ValueError("must be a float ndarray")
        want = 1 if info.field_name == "state" else 2
        if v.ndim != want:
            raise ValueError(f"must have {want} dimension(s), got shape {tuple(v.shape)}")
        return v.astype(np.float32, copy=False)


class PreferenceRequest(Request, SamplingMixin):
    """RL-VLM-F: which of two images makes more progress on the task (0, 1, or -1)."""

    kind: Literal["preference"] = "preference"
    image_a: Any
    image_b: Any
    task: str = Field(min_length=1)
    mode: Literal["two_step", "one_pass"] = "two_step"
    prompt: Optional[str] = None  # overrides the analysis prompt template
    summary_prompt: Optional[str] = None  # overrides the label prompt template
    max_tokens: int = Field(256, ge=1)

    _images = field_validator("image_a", "image_b", mode="before")(_image_field)


class TextActionRequest(Request, SamplingMixin):
    """Chat messages (images allowed); with admissible_commands, the best-scoring one is chosen."""

    kind: Literal["text_action"] = "text_action"
    messages: List[ChatMessage] = Field(min_length=1)
    admissible_commands: Optional[List[str]] = None
    constraint: Optional[Constraint] = None  # the answer must match it (v2)
    n: int = Field(1, ge=1, le=MAX_N)  # answers, sharing one prompt pass (v2)
    logprobs: bool = False  # per-token log-probabilities in the result (v2)
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)  # and this many alternatives (v2)
    stream: bool = False  # partial replies while it is decoded (v2; docs/PROTOCOL.md 6.1)

    @model_validator(mode="after")
    def _coherent(self) -> TextActionRequest:
        if self.admissible_commands and (self.constraint is not None or self.n > 1):
            raise ValueError("admissible_commands are scored, not generated: no constraint or n with them")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("messages")
    @classmethod
    def _count(cls, v: List[ChatMessage], info: ValidationInfo) -> List[ChatMessage]:
        if len(v) > _limits(info).max_messages:
            raise ValueError(f"{len(v)} messages; the limit is {_limits(info).max_messages}")
        _check_image_count(sum(len(m.images()) for m in v), info)
        return v

    @field_validator("admissible_commands")
    @classmethod
    def _choices(cls, v: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        if v is not None:
            if not v:
                raise ValueError("admissible_commands, when given, must not be empty")
            if len(v) > _limits(info).max_choices:
                raise ValueError(f"{len(v)} admissible commands; the limit is {_limits(info).max_choices}")
        return v


class StructuredActionRequest(Request, SamplingMixin):
    """MineRL-style: one frame (and optional chat messages) -> the full MineRL action dict."""

    kind: Literal["structured_action"] = "structured_action"
    image: Optional[Any] = None
    task_name: str = ""
    messages: Optional[List[ChatMessage]] = None  # replaces the default MineRL prompt
    max_tokens: int = Field(256, ge=1)
    # decode under the MineRL action grammar (every answer parses); false: free text, parsed
    # with fallbacks (v2)
    constrained: bool = True
    stream: bool = False  # partial replies while it is decoded (v2)

    _image = field_validator("image", mode="before")(_image_field)

    @model_validator(mode="after")
    def _needs_input(self, info: ValidationInfo) -> StructuredActionRequest:
        if self.image is None and not self.messages:
            raise ValueError("structured_action needs an image or messages")
        images = sum(len(m.images()) for m in self.messages or ()) + (self.image is not None)
        _check_image_count(images, info)
        return self


REQUEST_MODELS: Dict[str, Type[Request]] = {
    "action_chunk": ActionChunkRequest,
    "preference": PreferenceRequest,
    "text_action": TextActionRequest,
    "structured_action": StructuredActionRequest,
}


# ----------------------------------------------------------------------------- results


class TopLogprob(_Model):
    token: str
    token_id: int
    logprob: float
    bytes: List[int] = Field(default_factory=list)  # the token's UTF-8 bytes


class TokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)  # most likely first


class TextChoice(_Model):
    """One of n answers."""

    index: int
    text: str
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: Optional[List[TokenLogprob]] = None


class TextActionResult(_Model):
    text: str
    choice: Optional[str] = None
    choice_index: Optional[int] = None
    scores: Optional[List[float]] = None  # summed log-probs, one per admissible command
    prompt_tokens: int = 0
    completion_tokens: int = 0  # all n answers together
    finish_reason: str = "stop"
    logprobs: Optional[List[TokenLogprob]] = None  # of `text` (answer 0), when asked for
    choices: Optional[List[TextChoice]] = None  # n > 1: every answer, answer 0 first


class StructuredActionResult(_Model):
    action: Dict[str, Any]
    reasoning: str = ""
    text: str = ""
    parse_ok: bool = True  # False: the model's answer was unusable and `action` is the default
    prompt_tokens: int = 0
    completion_tokens: int = 0
    constrained: bool = False  # decoded under the action grammar


class PreferenceResult(_Model):
    label: Literal[-1, 0, 1]
    texts: List[str] = Field(default_factory=list)  # raw model outputs, in order
    scores: Optional[Dict[str, float]] = None  # one_pass: log-prob of "0", "1", "-1"
    mode: str = "two_step"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ActionChunkResult(_Model):
    chunk: Any  # float32 (chunk_size, action_dim)
    cache_hit: bool = False
    frames_encoded: int = 0


RESULT_MODELS: Dict[str, Type[_Model]] = {
    "action_chunk": ActionChunkResult,
    "preference": PreferenceResult,
    "text_action": TextActionResult,
    "structured_action": StructuredActionResult,
}


# ----------------------------------------------------------------------------- replies


class ErrorInfo(_Model):
    code: ErrorCode
    message: str
    # always present on the wire: a list of problems for `invalid`, else a map (docs/PROTOCOL.md 8)
    detail: Any = Field(default_factory=dict)


class Reply(_Model):
    v: int = PROTOCOL_VERSION
    request_id: str
    session_id: str
    step: int = 0
    kind: str
    ok: bool
    worker: str = ""
    created_at: float = 0.0  # echoed from the request
    received_at: float = 0.0  # when the worker read it
    replied_at: float = 0.0
    batch_size: int = 0
    delivery: int = 1  # how many times the request had been delivered
    timings: Dict[str, float] = Field(default_factory=dict)  # milliseconds, by stage
    result: Optional[Any] = None
    error: Optional[ErrorInfo] = None

    def to_wire(self) -> Dict[str, Any]:
        body = self.model_dump(exclude_none=True)
        if isinstance(self.result, BaseModel):
            body["result"] = self.result.model_dump(exclude_none=True)
        return body


class Partial(_Model):
    """A streamed piece of a reply (docs/PROTOCOL.md 6.1): the text decoded since the last
    piece. Partials never replace the reply: the reply still comes, once, with the whole
    answer; a client that missed pieces loses nothing but their timing."""

    partial: Literal[True] = True  # tells a partial from a reply where both can arrive
    v: int = PROTOCOL_VERSION
    request_id: str
    session_id: str
    kind: str
    index: int = 0  # which of the n answers
    seq: int = 0  # 0, 1, 2, ... per answer and delivery: a gap means pieces were lost
    text: str = ""  # visible text since the previous piece (answer text = pieces + the rest in the reply)
    token_ids: List[int] = Field(default_factory=list)
    logprobs: Optional[List[TokenLogprob]] = None
    worker: str = ""
    delivery: int = 1

    def to_wire(self) -> Dict[str, Any]:
        return self.model_dump(exclude_none=True)


def request_model(kind: str) -> Type[Request]:
    try:
        return REQUEST_MODELS[kind]
    except KeyError:
        raise ProtocolError(
            ErrorCode.UNKNOWN_KIND,
            f"unknown kind {kind[:64]!r}; known kinds: {', '.join(KINDS)}",
            {"kind": kind[:64], "known": list(KINDS)},
        ) from None


def result_model(kind: str) -> Type[_Model]:
    return RESULT_MODELS[kind]


# An error reply and its dead letter stay small whatever the input: a body with thousands of
# problems (or a field name of 200 KB) is described by its first few, each cut short.
_MAX_PROBLEMS_IN_MESSAGE = 10
_MAX_PROBLEMS_IN_DETAIL = 32
_MAX_LOC_CHARS = 64


def _loc(loc: Sequence[Any]) -> List[str]:
    out = []
    for x in loc:
        x = str(x)
        out.append(x if len(x) <= _MAX_LOC_CHARS else x[:_MAX_LOC_CHARS] + "...")
    return out


def describe_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = [f"{'.'.join(_loc(e['loc'])) or 'body'}: {e['msg']}" for e in errors[:_MAX_PROBLEMS_IN_MESSAGE]]
    if len(errors) > _MAX_PROBLEMS_IN_MESSAGE:
        parts.append(f"and {len(errors) - _MAX_PROBLEMS_IN_MESSAGE} more")
    return "; ".join(parts)


def _validate(model: Type[BaseModel], data: Any, limits: Limits, strict: bool = False) -> Any:
    try:
        return model.model_validate(data, strict=strict, context={"limits": limits})
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        detail = [
            {"loc": _loc(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in errors[:_MAX_PROBLEMS_IN_DETAIL]
        ]
        raise ProtocolError(ErrorCode.INVALID, describe_validation_error(exc), detail) from None


def read_body(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Dict[str, Any]:
    """bytes from the wire -> the body's map, before validation (bounded work, see codec)."""
    data = unpackb(body, limits)
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID, f"body must be a msgpack map, got {type(data).__name__}")
    return data


def validate_request(data: Dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Request:
    """A body's map -> a validated request. Types are strict: the wire has ints, floats,
    strings and booleans, so "3" is not a step and 1 is not true."""
    if data.get("v") is None:
        raise ProtocolError(
            ErrorCode.INVALID,
            "v: field required (the protocol version)",
            [{"loc": ["v"], "msg": "Field required", "type": "missing"}],
        )
    version = data["v"]
    if type(version) is not int:  # a bool is not a version; a list is unhashable
        raise ProtocolError(
            ErrorCode.INVALID,
            f"v: must be an int, got {type(version).__name__}",
            [{"loc": ["v"], "msg": "Input should be a valid integer", "type": "int_type"}],
        )
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this worker speaks {sorted(SUPPORTED_VERSIONS)}",
            {"version": version, "supported": sorted(SUPPORTED_VERSIONS)},
        )
    kind = data.get("kind")
    if kind is None:
        raise ProtocolError(
            ErrorCode.INVALID,
            "kind: field required",
            [{"loc": ["kind"], "msg": "Field required", "type": "missing"}],
        )
    return _validate(request_model(kind if isinstance(kind, str) else repr(kind)), data, limits, strict=True)


def decode_request(body: bytes, limits: Limits = DEFAULT_LIMITS, session_id: Optional[str] = None) -> Request:
    """bytes from the wire -> a validated request, or ProtocolError with its code.
    `session_id`, when given, fills in a body that leaves its session_id out or empty (the
    gateway's WebSocket: the socket is the session)."""
    data = read_body(body, limits)
    if session_id is not None and not data.get("session_id"):
        data["session_id"] = session_id
    return validate_request(data, limits)


def decode_partial(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Partial:
    data = unpackb(body, limits)
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "partial body must be a msgpack map")
    return _validate(Partial, data, limits)


def decode_reply(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Reply:
    data = unpackb(body, limits)
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "reply body must be a msgpack map")
    reply = _validate(Reply, data, limits)
    if reply.ok and isinstance(reply.result, dict) and reply.kind in RESULT_MODELS:
        reply.result = _validate(RESULT_MODELS[reply.kind], reply.result, limits)
    return reply
