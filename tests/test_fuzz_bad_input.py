"""Each kind of bad input, sent raw to a real worker: an error reply with its documented code
to the sender, a dead-letter entry that keeps the original fields, and a worker that goes on
serving. The senders here write stream entries by hand, as a buggy or hostile client would."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any, Dict, Optional

import msgpack
import numpy as np
import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from schemas.codec import EXT_NDARRAY, packb
from schemas.errors import ErrorCode
from schemas.limits import Limits
from schemas.messages import (
    PROTOCOL_VERSION,
    ActionChunkRequest,
    ChatMessage,
    TextActionRequest,
    decode_reply,
)
from tests.helpers import WorkerThread, synthetic_settings, wait_for

pytestmark = pytest.mark.timeout(120)

LIMITS = Limits(
    max_message_bytes=256 * 1024,
    max_frame_bytes=64 * 1024,
    max_image_side=256,
    max_text_bytes=32 * 1024,
    max_body_items=4096,
)


@pytest.fixture(scope="module")
def served(redis_server):
    from broker.settings import BrokerSettings

    broker = BrokerSettings(url=redis_server.url, prefix=f"bad{uuid.uuid4().hex[:8]}", claim_min_idle_ms=1000)
    worker = WorkerThread(synthetic_settings(broker, limits=LIMITS))
    with worker:
        yield broker, connect_sync(broker), worker


def _text(sid: str, **over: Any) -> Dict[str, Any]:
    req = TextActionRequest(session_id=sid, messages=[ChatMessage(role="user", content="look")])
    return {**req.to_wire(), **over}


def _chunk(sid: str, **over: Any) -> Dict[str, Any]:
    req = ActionChunkRequest(session_id=sid, image=np.zeros((8, 8, 3), np.uint8))
    return {**req.to_wire(), **over}


def _send(
    served, stream_kind: str, sid: Optional[str], rid: Optional[str], body: Optional[bytes], **fields: Any
) -> str:
    """XADD an entry by hand to the request stream of `stream_kind`; `fields` override the
    entry's own (None: left out)."""
    broker, r, _ = served
    entry = {"v": str(PROTOCOL_VERSION), "kind": stream_kind, "rid": rid, "sid": sid}
    if body is not None:
        entry["body"] = body
    entry.update(fields)
    entry = {k: v for k, v in entry.items() if v is not None}
    return r.xadd(Keys(broker.prefix).request_stream(stream_kind, 0), entry)


def _reply(served, sid: str):
    broker, r, _ = served
    stream = Keys(broker.prefix).reply_stream(sid)
    got = []
    assert wait_for(lambda: bool(got.extend(r.xrange(stream)) or got), timeout=30), "no reply"
    assert len(got) == 1, got
    return decode_reply(got[0][1][b"body"])


def _dead_letter(served, kind: str, rid: str) -> Dict[bytes, bytes]:
    broker, r, _ = served
    entries = r.xrange(Keys(broker.prefix).dead_letters(kind, 0))
    found = [f for _, f in entries if f.get(b"rid") == rid.encode()]
    assert len(found) == 1, entries
    return found[0]


def _rid(body: bytes) -> str:
    """The request id inside a body when it has one (the entry's rid field must match it)."""
    try:
        rid = msgpack.unpackb(body, strict_map_key=False, unicode_errors="replace").get("request_id")
    except Exception:
        rid = None
    return rid if isinstance(rid, str) else uuid.uuid4().hex


def _bad_utf8() -> bytes:
    body = packb(_text("x"))
    return body.replace(b"\xa4look", b"\xa4lo\xff\xfe")


def _nested(depth: int) -> list:
    value: list = ["x"]
    for _ in range(depth):
        value = [value]
    return value


def _raw_ext(dtype: str, shape, payload: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_NDARRAY, msgpack.packb([dtype, shape]) + payload)


CASES = {
    # name: (kind, body builder(sid) -> bytes, expected code)
    "oversize-frame": (
        "action_chunk",
        lambda sid: packb(_chunk(sid, image=np.zeros((200, 200, 3), np.uint8))),
        ErrorCode.TOO_LARGE,
    ),
    "oversize-message": (
        "text_action",
        lambda sid: packb(_text(sid, messages=[{"role": "user", "content": "x" * 300_000}])),
        ErrorCode.TOO_LARGE,
    ),
    "string-over-limit": (
        "text_action",
        lambda sid: packb(_text(sid, messages=[{"role": "user", "content": "x" * 40_000}])),
        ErrorCode.TOO_LARGE,
    ),
    "image-side-over-limit": (
        "action_chunk",
        lambda sid: packb(_chunk(sid, image=np.zeros((1, 300, 3), np.uint8))),
        ErrorCode.TOO_LARGE,
    ),
    "wrong-image-dtype": (
        "action_chunk",
        lambda sid: packb(_chunk(sid, image=np.zeros((8, 8, 3), np.float32))),
        ErrorCode.INVALID,
    ),
    "wrong-image-shape": (
        "action_chunk",
        lambda sid: packb(_chunk(sid, image=np.zeros((8, 8, 4), np.uint8))),
        ErrorCode.INVALID,
    ),
    "wrong-state-shape": (
        "action_chunk",
        lambda sid: packb(_chunk(sid, state=np.zeros((2, 3), np.float32))),
        ErrorCode.INVALID,
    ),
    "disallowed-wire-dtype": (
        "action_chunk",
        lambda sid: msgpack.packb({**_chunk(sid, image=None), "image": _raw_ext(">u2", [2], b"abcd")}),
        ErrorCode.MALFORMED,
    ),
    "array-bytes-do-not-match-shape": (
        "action_chunk",
        lambda sid: msgpack.packb({**_chunk(sid, image=None), "image": _raw_ext("|u1", [8, 8, 3], b"ab")}),
        ErrorCode.MALFORMED,
    ),
    "bad-utf8": ("text_action", lambda sid: _bad_utf8(), ErrorCode.MALFORMED),
    "not-msgpack": ("text_action", lambda sid: b"\xc1\xc1\xc1", ErrorCode.MALFORMED),
    "not-a-map": ("text_action", lambda sid: packb([1, 2, 3]), ErrorCode.INVALID),
    "unknown-version": ("text_action", lambda sid: packb(_text(sid, v=99)), ErrorCode.UNSUPPORTED_VERSION),
    "missing-version": (
        "text_action",
        lambda sid: packb({k: v for k, v in _text(sid).items() if k != "v"}),
        ErrorCode.INVALID,
    ),
    "version-not-an-int": ("text_action", lambda sid: packb(_text(sid, v="1")), ErrorCode.INVALID),
    "unknown-kind": ("text_action", lambda sid: packb(_text(sid, kind="dance")), ErrorCode.UNKNOWN_KIND),
    "kind-not-of-this-stream": (
        "text_action",
        lambda sid: packb(_chunk(sid)),
        ErrorCode.UNKNOWN_KIND,
    ),
    "missing-field": (
        "text_action",
        lambda sid: packb({k: v for k, v in _text(sid).items() if k != "messages"}),
        ErrorCode.INVALID,
    ),
    "wrong-field-type": ("text_action", lambda sid: packb(_text(sid, step="three")), ErrorCode.INVALID),
    "unknown-field": ("text_action", lambda sid: packb(_text(sid, surprise=1)), ErrorCode.INVALID),
    "max-tokens-over-limit": (
        "text_action",
        lambda sid: packb(_text(sid, max_tokens=10**6)),
        ErrorCode.INVALID,
    ),
    "too-many-values": (
        "text_action",
        lambda sid: packb(_text(sid, **{f"x{i}": 0 for i in range(20_000)})),
        ErrorCode.TOO_LARGE,
    ),
    "nested-too-deep": (
        "text_action",
        lambda sid: msgpack.packb({**_text(sid), "stop": _nested(40)}),
        ErrorCode.TOO_LARGE,
    ),
    "step-as-a-string": ("text_action", lambda sid: packb(_text(sid, step="3")), ErrorCode.INVALID),
    "bool-as-an-int": ("text_action", lambda sid: packb(_text(sid, step=True)), ErrorCode.INVALID),
    "nan-deadline": ("text_action", lambda sid: packb(_text(sid, deadline=float("nan"))), ErrorCode.INVALID),
    "data-url-as-action-chunk-image": (
        "action_chunk",
        lambda sid: packb(_chunk(sid, image="data:image/png;base64,iVBORw0KGgo=")),
        ErrorCode.INVALID,
    ),
    "model-not-of-this-stream": ("text_action", lambda sid: packb(_text(sid, model="m1")), ErrorCode.INVALID),
    "many-problems": (
        "text_action",
        lambda sid: packb(_text(sid, messages=[{"role": "robot", "content": 1}] * 200)),
        ErrorCode.INVALID,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_an_error_reply_and_a_dead_letter(served, case: str) -> None:
    kind, build, code = CASES[case]
    sid = f"bad-{case}"
    body = build(sid)
    rid = _rid(body)
    _send(served, kind, sid, rid, body)
    reply = _reply(served, sid)
    assert not reply.ok and reply.error is not None
    assert reply.error.code == code, reply.error
    assert reply.error.message
    assert len(reply.error.message) < 2048 and len(packb(reply.error.detail)) < 8192  # bounded
    assert reply.request_id == rid and reply.session_id == sid
    dl = _dead_letter(served, kind, rid)
    assert dl[b"code"] == code.value.encode()
    assert dl[b"reason"]
    if len(body) <= 65_536:
        assert dl[b"body"] == body  # the original bytes are kept for inspection
    else:  # dead letters are bounded in bytes: an oversize body leaves its length and digest
        assert b"body" not in dl
        assert int(dl[b"body_bytes"]) == len(body)
        assert dl[b"body_sha256"].decode() == hashlib.sha256(body).hexdigest()
    assert int(dl[b"deliveries"]) == 1


def test_entry_without_body_or_with_mismatched_ids(served) -> None:
    _send(served, "text_action", "bad-nobody", "rid-nobody", None)
    reply = _reply(served, "bad-nobody")
    assert reply.error.code == ErrorCode.MALFORMED
    _dead_letter(served, "text_action", "rid-nobody")

    body = packb(_text("bad-mismatch"))
    _send(served, "text_action", "bad-mismatch", "not-the-body-rid", body)
    reply = _reply(served, "bad-mismatch")
    assert reply.error.code == ErrorCode.INVALID
    _dead_letter(served, "text_action", "not-the-body-rid")


def test_envelope_fields_are_checked_and_answers_go_where_they_can_be_read(served) -> None:
    """The entry's kind must be the stream's; an entry without rid (or sid) is answered with
    the body's request_id (or to the body's session); an entry whose sid differs from the
    body's is answered to the entry's session only (the routing field), never the body's."""
    broker, r, _ = served
    body = packb(_text("bad-kindfield"))
    _send(served, "text_action", "bad-kindfield", _rid(body), body, kind="action_chunk")
    assert _reply(served, "bad-kindfield").error.code == ErrorCode.UNKNOWN_KIND

    body = packb(_text("bad-noversion"))
    _send(served, "text_action", "bad-noversion", _rid(body), body, v=None)
    assert _reply(served, "bad-noversion").error.code == ErrorCode.INVALID

    body = packb(_text("bad-norid"))
    _send(served, "text_action", "bad-norid", None, body)
    reply = _reply(served, "bad-norid")
    assert reply.error.code == ErrorCode.INVALID and reply.request_id == _rid(body)
    _dead_letter(served, "text_action", _rid(body))

    body = packb(_text("bad-nosid"))
    _send(served, "text_action", None, _rid(body), body)
    reply = _reply(served, "bad-nosid")
    assert reply.error.code == ErrorCode.INVALID and reply.request_id == _rid(body)

    body = packb(_text("bad-body-session"))
    _send(served, "text_action", "bad-entry-session", _rid(body), body)
    reply = _reply(served, "bad-entry-session")
    assert reply.error.code == ErrorCode.INVALID and reply.session_id == "bad-entry-session"
    assert r.xlen(Keys(broker.prefix).reply_stream("bad-body-session")) == 0


def test_null_for_an_optional_field_means_absent(served) -> None:
    sid = "null-fields"
    nulls = dict.fromkeys(
        [
            "step",
            "created_at",
            "latest_only",
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "deadline",
        ]
    )
    body = packb(_text(sid, **nulls))
    _send(served, "text_action", sid, _rid(body), body)
    reply = _reply(served, sid)
    assert reply.ok and reply.step == 0


def test_a_body_of_a_million_fields_does_not_hold_up_a_good_request(redis_server) -> None:
    """~9 MB of map entries is refused from its map header (too_large) before anything is
    built; a good request sent right after it is answered in well under a second, and the
    dead letter keeps the header and a digest, not the 9 MB."""
    from broker.settings import BrokerSettings

    broker = BrokerSettings(url=redis_server.url, prefix=f"big{uuid.uuid4().hex[:8]}", claim_min_idle_ms=1000)
    r = connect_sync(broker)
    keys = Keys(broker.prefix)
    with WorkerThread(synthetic_settings(broker, kinds=("text_action",))):
        bomb = msgpack.packb({**_text("bomb"), **{f"f{i}": 0 for i in range(1_000_000)}})
        stream = keys.request_stream("text_action", 0)
        for i in range(3):
            r.xadd(
                stream,
                {
                    "v": str(PROTOCOL_VERSION),
                    "kind": "text_action",
                    "rid": f"bomb{i}",
                    "sid": "bomb",
                    "body": bomb,
                },
            )
        good = packb(_text("good"))
        sent = time.time()
        r.xadd(
            stream,
            {
                "v": str(PROTOCOL_VERSION),
                "kind": "text_action",
                "rid": _rid(good),
                "sid": "good",
                "body": good,
            },
        )
        assert wait_for(lambda: r.xlen(keys.reply_stream("good")) == 1, 30)
        waited = decode_reply(r.xrange(keys.reply_stream("good"))[0][1][b"body"]).replied_at - sent
        assert wait_for(lambda: r.xlen(keys.dead_letters("text_action", 0)) == 3, 30)
    assert waited < 1.0, waited
    assert [decode_reply(f[b"body"]).error.code for _, f in r.xrange(keys.reply_stream("bomb"))] == [
        ErrorCode.TOO_LARGE
    ] * 3
    assert r.memory_usage(keys.dead_letters("text_action", 0)) < 64 * 1024
    letter = r.xrange(keys.dead_letters("text_action", 0))[0][1]
    assert int(letter[b"body_bytes"]) == len(bomb) and b"body" not in letter


def test_entry_without_a_valid_session_only_goes_to_dead_letters(served) -> None:
    broker, r, _ = served
    _send(served, "text_action", "../../etc", "rid-evil-sid", b"\xc1")
    assert wait_for(
        lambda: any(
            f.get(b"rid") == b"rid-evil-sid"
            for _, f in r.xrange(Keys(broker.prefix).dead_letters("text_action", 0))
        ),
        timeout=30,
    )
    # no key was made from the hostile session id
    assert not list(r.scan_iter(match=f"{broker.prefix}:reply:*etc*"))


def test_worker_keeps_serving_and_nothing_is_left_pending(served) -> None:
    broker, r, worker = served
    body = packb(_text("good-after-bad"))
    rid = msgpack.unpackb(body)["request_id"]
    _send(served, "text_action", "good-after-bad", rid, body)
    reply = _reply(served, "good-after-bad")
    assert reply.ok and reply.result.text == "look"
    assert worker.thread.is_alive() and worker.error is None
    keys = Keys(broker.prefix)
    for kind in ("text_action", "action_chunk"):
        stream = keys.request_stream(kind, 0)
        assert wait_for(lambda s=stream: r.xlen(s) == 0, timeout=30), r.xrange(stream)
        assert r.xpending(stream, broker.group)["pending"] == 0
