"""Property tests of the codec and message validation: any bytes give a clean ProtocolError.

"Clean" means: the exception is a ProtocolError with a documented code and a message, and
the worker can turn it into an error reply that itself encodes and decodes (the reply is
what the sender sees). Nothing else may escape: no TypeError, OverflowError, RecursionError,
numpy warning turned error, or a hang (each test runs under pytest-timeout).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.consumer import Delivery
from broker.settings import BrokerSettings
from inference_worker.settings import WorkerSettings
from inference_worker.worker import Worker, _Rejected
from schemas.codec import ALLOWED_DTYPES, EXT_NDARRAY, packb, unpackb
from schemas.errors import ErrorCode, ProtocolError
from schemas.limits import Limits
from schemas.messages import (
    ActionChunkRequest,
    ChatMessage,
    PreferenceRequest,
    StructuredActionRequest,
    TextActionRequest,
    decode_reply,
    decode_request,
)

pytestmark = pytest.mark.timeout(180)

LIMITS = Limits(max_message_bytes=64 * 1024, max_frame_bytes=16 * 1024, max_image_side=64)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_WORKER = Worker(WorkerSettings(broker=BrokerSettings(prefix="fuzz"), limits=LIMITS), handlers={})


def _delivery(body: bytes, kind: str = "text_action") -> Delivery:
    stream = _WORKER.keys.request_stream(kind, 0)
    fields = {b"v": b"1", b"kind": kind.encode(), b"body": body, b"sid": b"s1", b"rid": b"r1"}
    return Delivery(stream, "1-0", kind, None, 0, fields)


def check_clean(body: bytes, kind: str = "text_action") -> Any:
    """Decode as the worker does; a failure must be a ProtocolError, answered to the entry's
    session, that makes a valid reply."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow warning is a bug, not noise
        try:
            return _WORKER._decode(_delivery(body, kind))
        except _Rejected as rejected:
            exc = rejected.error
            assert isinstance(exc.code, ErrorCode)
            assert exc.code not in (ErrorCode.INTERNAL, ErrorCode.BACKLOG_FULL)
            assert isinstance(exc.message, str) and exc.message
            assert rejected.session == "s1" and rejected.request_id == "r1"
            outcome = _WORKER._error(_delivery(body, kind), None, exc, dead=True)
            reply = decode_reply(outcome.reply)
            assert not reply.ok and reply.error is not None and reply.error.code == exc.code
            assert reply.request_id == "r1" and reply.session_id == "s1"
            assert outcome.dead_letter is not None and outcome.dead_letter["code"] == exc.code.value
            return exc


# ----------------------------------------------------------------------------- valid requests

FRAME = np.zeros((8, 8, 3), np.uint8)


def valid_requests() -> Dict[str, Any]:
    msg = ChatMessage(
        role="user", content=[{"type": "text", "text": "go"}, {"type": "image", "image": FRAME}]
    )
    reqs = [
        ActionChunkRequest(session_id="s1", request_id="r1", image=FRAME, state=np.zeros(4, np.float32)),
        PreferenceRequest(session_id="s1", request_id="r1", image_a=FRAME, image_b=FRAME, task="open"),
        TextActionRequest(session_id="s1", request_id="r1", messages=[msg], admissible_commands=["a", "b"]),
        StructuredActionRequest(session_id="s1", request_id="r1", image=FRAME, task_name="tree"),
    ]
    return {r.kind: r.to_wire() for r in reqs}


VALID = valid_requests()
KINDS = sorted(VALID)

# msgpack-representable values, including the ndarray extension with arbitrary headers.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=64),
)


@st.composite
def ndarray_ext(draw) -> msgpack.ExtType:
    dtype = draw(
        st.one_of(st.sampled_from(sorted(ALLOWED_DTYPES)), st.text(max_size=6), st.integers(-99, 99))
    )
    shape = draw(
        st.one_of(
            st.lists(st.integers(min_value=-2, max_value=2**64 - 1), max_size=10),
            st.lists(st.integers(min_value=0, max_value=9), max_size=4),
            scalars,
        )
    )
    header = msgpack.packb([dtype, shape])
    if draw(st.booleans()):
        header = msgpack.packb(draw(st.lists(scalars, max_size=3)))
    payload = draw(st.binary(max_size=300))
    return msgpack.ExtType(draw(st.sampled_from([EXT_NDARRAY, EXT_NDARRAY, 0, 2, 127])), header + payload)


values = st.recursive(
    st.one_of(scalars, ndarray_ext()),
    lambda kids: st.one_of(
        st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=12), kids, max_size=5)
    ),
    max_leaves=25,
)


# ----------------------------------------------------------------------------- properties


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(KINDS))
def test_any_bytes_give_a_clean_error_or_a_request(body: bytes, kind: str) -> None:
    check_clean(body, kind)


@FUZZ
@given(values, st.sampled_from(KINDS))
def test_any_msgpack_value_gives_a_clean_error_or_a_request(value: Any, kind: str) -> None:
    check_clean(msgpack.packb(value, use_bin_type=True), kind)


@FUZZ
@given(
    st.sampled_from(KINDS),
    st.lists(
        st.tuples(st.sampled_from(["drop", "set", "add"]), st.integers(min_value=0), values), max_size=4
    ),
)
def test_mutated_valid_requests_fail_cleanly(kind: str, mutations) -> None:
    body = dict(VALID[kind])
    for op, index, value in mutations:
        keys = sorted(body)
        key = keys[index % len(keys)] if keys else "x"
        if op == "drop":
            body.pop(key, None)
        elif op == "set":
            body[key] = value
        else:
            body[f"extra{index % 7}"] = value
    out = check_clean(packb(body), kind)
    if isinstance(out, ProtocolError) and out.code == ErrorCode.UNKNOWN_KIND:
        assert body.get("kind") != kind


@FUZZ
@given(st.sampled_from(KINDS), st.data())
def test_byte_level_mutations_fail_cleanly(kind: str, data) -> None:
    raw = bytearray(packb(VALID[kind]))
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(min_value=0, max_value=max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif raw:
            del raw[pos]
    check_clean(bytes(raw), kind)


@FUZZ
@given(st.binary(max_size=1024))
def test_any_bytes_as_a_reply_give_a_clean_error(body: bytes) -> None:
    try:
        decode_reply(body, LIMITS)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@FUZZ
@given(
    st.sampled_from(KINDS),
    st.text(alphabet="abcXYZ019._-", min_size=1, max_size=20).filter(lambda s: s[0].isalnum()),
    st.integers(min_value=0, max_value=2**40),
    st.floats(min_value=0, max_value=2e9),
)
def test_valid_requests_round_trip(kind: str, session: str, step: int, deadline: float) -> None:
    body = {**VALID[kind], "session_id": session, "step": step, "deadline": deadline}
    req = decode_request(packb(body), LIMITS)
    again = decode_request(packb(req.to_wire()), LIMITS)
    assert (again.session_id, again.step, again.deadline, again.kind) == (session, step, deadline, kind)


# ----------------------------------------------------------------------------- pathological inputs


def _ext(dtype: Any, shape: Any, payload: bytes = b"") -> bytes:
    return msgpack.packb({"image": msgpack.ExtType(EXT_NDARRAY, msgpack.packb([dtype, shape]) + payload)})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param(b"\x91" * 60_000 + b"\xc0", ErrorCode.TOO_LARGE, id="nested-60k-deep"),
        pytest.param(b"\xdd\xff\xff\xff\xff", ErrorCode.MALFORMED, id="array-claims-4G-items"),
        pytest.param(b"\xdb\xff\xff\xff\xff" + b"a" * 10, ErrorCode.MALFORMED, id="str-claims-4GB"),
        pytest.param(b"\xc6\xff\xff\xff\xff", ErrorCode.MALFORMED, id="bin-claims-4GB"),
        pytest.param(_ext("|u1", [2**64 - 1]), ErrorCode.TOO_LARGE, id="shape-uint64-max"),
        pytest.param(_ext("|u1", [2**32, 2**32]), ErrorCode.TOO_LARGE, id="shape-product-wraps-int64"),
        pytest.param(_ext("|u1", [2**62, 4]), ErrorCode.TOO_LARGE, id="shape-product-over-int64"),
        pytest.param(_ext("|u1", [0, 2**63]), ErrorCode.MALFORMED, id="shape-zero-times-huge"),
        pytest.param(_ext("|u1", [True], b"x"), ErrorCode.MALFORMED, id="shape-bool"),
        pytest.param(_ext("|O", [1], b"x" * 8), ErrorCode.MALFORMED, id="object-dtype"),
        pytest.param(_ext(">f4", [1], b"x" * 4), ErrorCode.MALFORMED, id="big-endian-dtype"),
        pytest.param(b"\x81\xa1a\xc1", ErrorCode.MALFORMED, id="reserved-byte-0xc1"),
        pytest.param(b"\xd6\xff" + b"\x00" * 4, ErrorCode.INVALID, id="timestamp-ext-top-level"),
        pytest.param(b"\x80\x80", ErrorCode.MALFORMED, id="trailing-bytes"),
        pytest.param(b"", ErrorCode.MALFORMED, id="empty"),
    ],
)
def test_pathological_bodies(body: bytes, code: ErrorCode) -> None:
    out = check_clean(body)
    assert isinstance(out, ProtocolError)
    assert out.code == code, out


def test_big_array_header_is_refused_before_any_allocation() -> None:
    # 16 TB declared with only a few bytes sent: refused from the header, never allocated.
    out = check_clean(_ext("<f8", [2**20, 2**20, 2]))
    assert isinstance(out, ProtocolError) and out.code == ErrorCode.TOO_LARGE
    assert math.prod([2**20, 2**20, 2]) * 8 > LIMITS.max_frame_bytes


def test_unpackb_never_copies_or_pickles_objects() -> None:
    import pickle

    # A pickle of an object is just bytes to us: decoding it never runs code.
    with pytest.raises(ProtocolError) as err:
        unpackb(pickle.dumps(ValueError("boom")), LIMITS)
    assert err.value.code == ErrorCode.MALFORMED
