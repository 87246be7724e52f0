"""Hostile request stream entries, written as a client built from docs/PROTOCOL.md alone
might (or an attacker would): what `vlmq bench reliability` sweeps a worker with.

Each case is one raw entry for the text_action or action_chunk stream, in its own session
(`bad-<n>`), with what the worker must do with it: reject it (an error reply where the
session can be read, and a dead letter), or, for input only a model would refuse (an
image bomb: the synthetic backend never decodes images), answer it.
"""

from __future__ import annotations

import io
import math
import re
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import msgpack
import numpy as np

from schemas.codec import EXT_NDARRAY, packb
from schemas.messages import ID_PATTERN, ActionChunkRequest, ChatMessage, TextActionRequest

_ID = re.compile(ID_PATTERN)


@dataclass
class BadEntry:
    name: str
    stream_kind: str
    fields: Dict[str, Any]  # the entry, as XADDed
    session: Optional[str]  # where an answer can go (None: nowhere)
    rid: str  # the request id it is filed under (the entry's, or else the body's)
    rejected: bool = True  # an error reply and a dead letter; False: a model-only problem

    @property
    def size(self) -> int:
        return sum(
            len(str(k)) + (len(v) if isinstance(v, (bytes, str)) else 8) for k, v in self.fields.items()
        )


def _ext(dtype: Any, shape: Any, payload: bytes = b"") -> msgpack.ExtType:
    return msgpack.ExtType(EXT_NDARRAY, msgpack.packb([dtype, shape]) + payload)


def _png_bomb(side: int = 50_000) -> bytes:
    """A valid PNG header declaring side x side pixels, with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def _truncated_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[:40]


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def cases() -> List[BadEntry]:
    """About 90 hostile entries (built fresh: request ids are unique per call)."""
    out: List[BadEntry] = []
    n = iter(range(10_000))

    def add(
        name: str,
        body: Optional[bytes],
        kind: str = "text_action",
        rejected: bool = True,
        session: Optional[str] = None,
        rid: Optional[str] = "",
        entry: Optional[Dict[str, Any]] = None,
    ) -> None:
        """`session`: the entry's sid (None: the next bad-<n>); `entry` overrides the entry's
        fields (None: left out)."""
        sid = f"bad-{next(n)}" if session is None else session
        rid = rid or uuid.uuid4().hex
        fields: Dict[str, Any] = {"v": "1", "kind": kind, "rid": rid, "sid": sid}
        if body is not None:
            fields["body"] = body
        fields.update(entry or {})
        fields = {k: v for k, v in fields.items() if v is not None}
        # answered on the entry's sid when it is a session id; without one, on the body's
        answer = fields.get("sid", sid)
        out.append(BadEntry(name, kind, fields, answer if _ID.match(answer or "") else None, rid, rejected))

    def text(build: Callable[[Dict[str, Any]], Any], name: str, **kw: Any) -> None:
        """A text_action body for the next session, changed by `build`; ids kept consistent."""
        sid = f"bad-{next(n)}"
        req = TextActionRequest(session_id=sid, messages=[ChatMessage(role="user", content="look")])
        add(name, packb(build(req.to_wire())), session=sid, rid=req.request_id, **kw)

    def chunk(build: Callable[[Dict[str, Any]], Any], name: str, **kw: Any) -> None:
        sid = f"bad-{next(n)}"
        req = ActionChunkRequest(session_id=sid, image=np.zeros((8, 8, 3), np.uint8))
        add(name, packb(build(req.to_wire())), kind="action_chunk", session=sid, rid=req.request_id, **kw)

    # --- bytes that are not a message
    for i, raw in enumerate([b"\xc1", b"", b"\x80\x80", b"\xff" * 64, uuid.uuid4().bytes * 4]):
        add(f"not-msgpack-{i}", raw)
    add("bad-utf8", packb({"v": 1, "kind": "text_action"}).replace(b"text_action", b"text\xff\xfection"))
    add("no-body", None)
    add("nested-10k-deep", _nested(10_000))
    add("nested-33-deep", msgpack.packb({"v": 1, "stop": msgpack.unpackb(_nested(33))}))
    # --- the ndarray extension
    for i, ext in enumerate(
        [
            msgpack.ExtType(7, b"x"),
            msgpack.ExtType(EXT_NDARRAY, b"\xc1\xc1"),
            _ext("|O", [1], b"x" * 8),
            _ext(">f4", [1], b"x" * 4),
            _ext("|u1", [True], b"x"),
            _ext("|u1", [1] * 9, b"x"),
            _ext("|u1", [8, 8, 3], b"ab"),
            _ext("|u1", [2**64 - 1]),
            _ext("|u1", [2**32, 2**32]),
        ]
    ):
        chunk(lambda b, e=ext: {**b, "image": e}, f"ndarray-{i}")
    # --- too large
    for i in range(10):  # 9 MiB raw frames: over the 8 MiB frame limit
        chunk(lambda b: {**b, "image": np.zeros((1792, 1792, 3), np.uint8)}, f"frame-9MiB-{i}")
    text(lambda b: {**b, **{f"f{i}": 0 for i in range(1_000_000)}}, "a-million-unknown-fields")
    text(lambda b: {**b, "admissible_commands": [f"go {i}" for i in range(100_000)]}, "100k-commands")
    text(lambda b: {**b, "admissible_commands": [f"go {i}" for i in range(2_000)]}, "2k-commands")
    text(lambda b: {**b, "messages": [{"role": "user", "content": "x" * 300_000}]}, "string-over-limit")
    text(lambda b: {**b, "x" * 200_000: 1}, "200KB-field-name")
    text(lambda b: {**b, "messages": [{"role": "robot", "content": 1}] * 200}, "200-bad-messages")
    chunk(lambda b: {**b, "image": np.zeros((1, 5000, 3), np.uint8)}, "image-side-over-limit")
    # --- images only a model would refuse (the synthetic backend does not decode them)
    chunk(lambda b: {**b, "image": _png_bomb()}, "png-bomb-50k-square", rejected=False)
    chunk(lambda b: {**b, "image": _truncated_jpeg()}, "truncated-jpeg", rejected=False)
    chunk(lambda b: {**b, "image": b"GIF89a" + b"\0" * 32}, "gif-bytes")
    chunk(lambda b: {**b, "image": "data:image/png;base64,iVBORw0KGgo="}, "data-url-image")
    chunk(lambda b: {**b, "image": np.zeros((8, 8, 3), np.float32)}, "float-image")
    chunk(lambda b: {**b, "image": np.zeros((8, 8, 4), np.uint8)}, "rgba-image")
    chunk(lambda b: {**b, "state": np.zeros((2, 3), np.float32)}, "state-2d")
    chunk(lambda b: {**b, "prev_chunk": np.zeros(3, np.float32)}, "prev-chunk-1d")
    # --- numbers
    for name, value in [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("string", "soon")]:
        text(lambda b, v=value: {**b, "deadline": v}, f"deadline-{name}")
    for field, value in [
        ("step", "3"),
        ("step", True),
        ("step", -1),
        ("step", 1.5),
        ("max_tokens", 0),
        ("max_tokens", 10**9),
        ("temperature", math.nan),
        ("temperature", "hot"),
        ("temperature", 9.0),
        ("top_p", 0.0),
        ("stop", "x"),
        ("stop", ["x"] * 17),
        ("latest_only", 1),
        ("seed", "7"),
        ("created_at", "now"),
        ("messages", "hello"),
        ("messages", []),
        ("admissible_commands", []),
    ]:
        text(lambda b, f=field, v=value: {**b, f: v}, f"{field}={value!r}"[:40])
    # --- missing and unknown fields
    for field in ("v", "kind", "messages"):
        text(lambda b, f=field: {k: v for k, v in b.items() if k != f}, f"body-without-{field}")
    chunk(lambda b: {k: v for k, v in b.items() if k != "image"}, "body-without-image")
    text(lambda b: {**b, "surprise": 1}, "unknown-field")
    text(lambda b: {**b, "v": 99}, "version-99")
    text(lambda b: {**b, "v": "1"}, "version-string")
    text(lambda b: {**b, "kind": "dance"}, "unknown-kind")
    text(lambda b: {**b, "model": "m1"}, "model-not-of-the-stream")
    text(lambda b: [b], "body-a-list")
    # --- the entry's own fields
    for field in ("v", "kind", "rid", "sid"):
        text(lambda b: b, f"entry-without-{field}", entry={field: None})
    text(lambda b: b, "entry-kind-mismatch", entry={"kind": "action_chunk"})
    text(lambda b: b, "entry-v-mismatch", entry={"v": "2"})
    text(lambda b: {**b, "request_id": "other"}, "rid-mismatch")
    text(lambda b: {**b, "session_id": "victim-0"}, "sid-mismatch")
    text(lambda b: b, "100-extra-entry-fields", entry={f"extra{i}": "y" * 1024 for i in range(100)})
    # --- session ids nobody can be answered on
    for i, sid in enumerate(["../../etc", "", "a" * 200, "{p0}", "sess ion", "sé"]):
        add(f"bad-session-{i}", packb({"v": 1}), session=sid)
    return out
