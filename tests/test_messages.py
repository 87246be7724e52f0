"""Message types: wire round trips for every kind, and errors a person can act on."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from schemas.codec import packb
from schemas.errors import ErrorCode, ProtocolError
from schemas.images import encode_jpeg, encode_png
from schemas.limits import Limits
from schemas.messages import (
    ActionChunkRequest,
    ActionChunkResult,
    ErrorInfo,
    PreferenceRequest,
    PreferenceResult,
    Reply,
    StructuredActionRequest,
    StructuredActionResult,
    TextActionRequest,
    TextActionResult,
    decode_reply,
    decode_request,
)

FRAME = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)


def wire(req):
    return decode_request(packb(req.to_wire()))


def test_action_chunk_round_trip():
    req = ActionChunkRequest(
        session_id="s1",
        step=4,
        image=FRAME,
        instruction="go to the red box",
        state=np.ones(3, np.float32),
        reset=True,
        prev_chunk=np.zeros((50, 7), np.float32),
        inference_delay=3,
        deadline=2e9,
    )
    out = wire(req)
    assert isinstance(out, ActionChunkRequest)
    assert out.step == 4 and out.reset and out.inference_delay == 3 and out.deadline == 2e9
    np.testing.assert_array_equal(out.image, FRAME)
    assert out.prev_chunk.shape == (50, 7)


@pytest.mark.parametrize("encode", [encode_jpeg, encode_png])
def test_encoded_images_are_accepted(encode):
    data = encode(FRAME)
    out = wire(StructuredActionRequest(session_id="s", image=data, task_name="FindCave"))
    assert out.image == data


def test_text_action_with_openai_style_image_url_parts():
    url = "data:image/png;base64," + base64.b64encode(encode_png(FRAME)).decode()
    req = TextActionRequest(
        session_id="s",
        messages=[
            {"role": "system", "content": "You play a text game."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            },
        ],
        admissible_commands=["go north", "look"],
        max_tokens=8,
        stop=["\n"],
    )
    out = wire(req)
    assert out.messages[1].text() == "look"
    assert out.messages[1].images()[0].startswith(b"\x89PNG")
    assert out.admissible_commands == ["go north", "look"]


def test_preference_round_trip():
    out = wire(
        PreferenceRequest(
            session_id="s", image_a=FRAME, image_b=FRAME, task="open the drawer", mode="one_pass"
        )
    )
    assert out.mode == "one_pass" and out.task == "open the drawer"


@pytest.mark.parametrize(
    "result",
    [
        ActionChunkResult(chunk=np.ones((50, 7), np.float32), cache_hit=True, frames_encoded=1),
        PreferenceResult(label=-1, texts=["a", "b"], scores={"0": -1.0, "1": -2.0, "-1": -0.5}),
        TextActionResult(text="go north", choice="go north", choice_index=0, scores=[-1.0, -3.0]),
        StructuredActionResult(
            action={"forward": 1, "camera": [0.0, 5.0]}, reasoning="cave ahead", parse_ok=False
        ),
    ],
)
def test_reply_round_trip_for_every_kind(result):
    kind = {
        ActionChunkResult: "action_chunk",
        PreferenceResult: "preference",
        TextActionResult: "text_action",
        StructuredActionResult: "structured_action",
    }[type(result)]
    reply = Reply(
        request_id="r1", session_id="s", kind=kind, ok=True, result=result, timings={"model_ms": 3.0}
    )
    out = decode_reply(packb(reply.to_wire()))
    assert type(out.result) is type(result)
    if kind == "action_chunk":
        np.testing.assert_array_equal(out.result.chunk, result.chunk)
    else:
        assert out.result == result


def test_error_reply_round_trip():
    reply = Reply(
        request_id="r",
        session_id="s",
        kind="text_action",
        ok=False,
        error=ErrorInfo(code="expired", message="late"),
    )
    out = decode_reply(packb(reply.to_wire()))
    assert not out.ok and out.error.code == ErrorCode.EXPIRED and out.result is None


def body(**fields):
    base = {
        "v": 1,
        "request_id": "r1",
        "session_id": "s1",
        "kind": "text_action",
        "messages": [{"role": "user", "content": "hi"}],
    }
    base.update(fields)
    return packb({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    "data, code, fragment",
    [
        (body(v=99), ErrorCode.UNSUPPORTED_VERSION, "protocol version 99"),
        (body(kind="dance"), ErrorCode.UNKNOWN_KIND, "unknown kind 'dance'"),
        (body(messages=None), ErrorCode.INVALID, "messages: Field required"),
        (body(max_tokens=0), ErrorCode.INVALID, "max_tokens"),
        (body(max_tokens=10**6), ErrorCode.INVALID, "VLMQ_MAX_NEW_TOKENS"),
        (body(session_id="has space"), ErrorCode.INVALID, "session_id"),
        (body(temperature="hot"), ErrorCode.INVALID, "temperature"),
        (body(max_token=5), ErrorCode.INVALID, "max_token: Extra inputs are not permitted"),
        (body(admissible_commands=[]), ErrorCode.INVALID, "must not be empty"),
        (packb([1, 2]), ErrorCode.INVALID, "must be a msgpack map"),
        (b"\xc1", ErrorCode.MALFORMED, "not valid msgpack"),
    ],
)
def test_invalid_requests_have_actionable_errors(data, code, fragment):
    with pytest.raises(ProtocolError) as err:
        decode_request(data)
    assert err.value.code == code
    assert fragment in err.value.message


@pytest.mark.parametrize(
    "image, code, fragment",
    [
        (np.zeros((8, 8, 3), np.float32), ErrorCode.INVALID, "must be uint8"),
        (np.zeros((8, 8), np.uint8), ErrorCode.INVALID, "shape (H, W, 3)"),
        (np.zeros((8, 8, 4), np.uint8), ErrorCode.INVALID, "shape (H, W, 3)"),
        (b"GIF89a....", ErrorCode.INVALID, "neither JPEG nor PNG"),
        (np.zeros((5000, 2, 3), np.uint8), ErrorCode.TOO_LARGE, "sides must be"),
    ],
)
def test_bad_images(image, code, fragment):
    data = packb({"v": 1, "request_id": "r", "session_id": "s", "kind": "action_chunk", "image": image})
    with pytest.raises(ProtocolError) as err:
        decode_request(data)
    assert err.value.code == code and fragment in err.value.message


def test_frame_limit_is_configurable():
    data = packb(ActionChunkRequest(session_id="s", image=FRAME).to_wire())
    decode_request(data)
    with pytest.raises(ProtocolError) as err:
        decode_request(data, Limits(max_frame_bytes=1000))
    assert err.value.code == ErrorCode.TOO_LARGE


def test_limits_from_env():
    assert Limits.from_env({"VLMQ_MAX_FRAME_BYTES": "123"}).max_frame_bytes == 123


def test_structured_action_needs_an_image_or_messages():
    with pytest.raises(ProtocolError) as err:
        decode_request(packb({"v": 1, "request_id": "r", "session_id": "s", "kind": "structured_action"}))
    assert "needs an image or messages" in err.value.message
