"""The gateway's three doors, driven by real clients: the `openai` package, httpx (the
MineRL policy client's calls) and a `websockets` client speaking msgpack. Every call goes
gateway -> Redis -> a real worker (synthetic backend: a model-free handler) -> back."""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import time
import uuid

import httpx
import numpy as np
import openai
import pytest
import redis
import websockets
from PIL import Image

from broker.embedded import free_port
from broker.keys import Keys
from broker.settings import BrokerSettings
from ops.gateway.server import GatewayThread
from ops.gateway.settings import GatewaySettings
from schemas.codec import packb
from schemas.messages import ActionChunkRequest, TextActionRequest, decode_reply
from tests.helpers import WorkerThread, synthetic_settings, wait_for

KEY = "sk-test-123"
MINERL_KEYS = {"forward", "back", "left", "right", "jump", "sneak", "sprint", "attack", "camera", "ESC"}


def png_b64(side: int = 24) -> str:
    """The seed MineRL client's encoding: PIL PNG, base64."""
    frame = (np.arange(side * side * 3) % 251).astype(np.uint8).reshape(side, side, 3)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def stack(redis_server):
    """Two workers (one also serving the model-specific streams of "big") and a gateway."""
    broker = BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", partitions=2)
    gw_settings = GatewaySettings(broker=broker, port=free_port(), api_keys=(KEY,), models=("vlmq", "big"))
    with (
        WorkerThread(synthetic_settings(broker, name="w-shared")),
        WorkerThread(synthetic_settings(broker, name="w-big", kinds=("text_action",), model_name="big")),
        GatewayThread(gw_settings) as gw,
    ):
        yield gw


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ----------------------------------------------------------------------------- OpenAI


def test_openai_chat_with_an_image_data_url(client):
    image_url = {"url": "data:image/png;base64," + png_b64(), "detail": "auto"}
    out = client.chat.completions.create(
        model="vlmq",
        messages=[
            {"role": "system", "content": "You are a robot."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": image_url},
                    {"type": "text", "text": "what now?"},
                ],
            },
        ],
        max_tokens=32,
        temperature=0,
    )
    assert out.object == "chat.completion" and out.model == "vlmq"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "what now?"  # the synthetic handler echoes the text
    assert out.choices[0].finish_reason == "stop"
    ext = out.model_extra["vlmq"]
    assert ext["worker"] in ("w-shared", "w-big") and out.id == f"chatcmpl-{ext['request_id']}"


def test_openai_qwen_style_image_parts_and_admissible_commands(client):
    out = client.chat.completions.create(
        model="vlmq",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "data:image/png;base64," + png_b64()},
                    {"type": "text", "text": "pick one"},
                ],
            }
        ],
        extra_body={"admissible_commands": ["go north", "open door"]},
    )
    assert out.choices[0].message.content == "go north"
    assert out.model_extra["vlmq"]["choice_index"] == 0


def test_openai_stream_gives_the_answer_and_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="vlmq",
            messages=[{"role": "user", "content": "streamed hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None


def test_openai_models_and_model_routing(client):
    assert [m.id for m in client.models.list()] == ["vlmq", "big"]
    assert client.models.retrieve("big").id == "big"
    served = collections.Counter(
        client.chat.completions.create(
            model="big", messages=[{"role": "user", "content": f"q{i}"}]
        ).model_extra["vlmq"]["worker"]
        for i in range(6)
    )
    assert served == {"w-big": 6}, "requests for 'big' must go to its own streams only"


def test_openai_errors_come_back_as_the_sdk_exceptions(stack, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="synthetic backend has no model"):
        client.chat.completions.create(model="vlmq", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty") as refused:
        client.chat.completions.create(
            model="vlmq", messages=[{"role": "user", "content": "x"}], frequency_penalty=0.5
        )
    assert refused.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError, match="not a parameter vlmq supports"):
        client.chat.completions.create(
            model="vlmq", messages=[{"role": "user", "content": "x"}], extra_body={"guided_jsn": {}}
        )
    with pytest.raises(openai.BadRequestError) as zero:
        client.chat.completions.create(
            model="vlmq", messages=[{"role": "user", "content": "x"}], max_tokens=0
        )
    assert zero.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(
            model="vlmq", messages=[{"role": "user", "content": "x"}], temperature=9
        )
    assert hot.value.body["param"] == "temperature"
    bad_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    with pytest.raises(openai.BadRequestError, match="neither JPEG nor PNG"):
        client.chat.completions.create(model="vlmq", messages=[{"role": "user", "content": [bad_image]}])
    with pytest.raises(openai.BadRequestError, match="only data: URLs"):
        remote = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
        client.chat.completions.create(model="vlmq", messages=[{"role": "user", "content": [remote]}])


def test_unknown_routes_and_methods_answer_in_each_apis_shape(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as h:
        missing = h.get("/v1/embeddings-nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        wrong = h.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
        assert "POST" in wrong.headers["allow"]
        assert h.get("/nope").json()["code"] == "not_found"  # the MineRL server's shape


def test_named_session_over_http(stack):
    body = {"model": "vlmq", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEY}", "X-Session-Id": "episode-42"}
    with httpx.Client(base_url=stack.url, timeout=60) as h:
        out = h.post("/v1/chat/completions", json=body, headers=headers)
        assert out.status_code == 200, out.text
        assert out.json()["vlmq"]["session_id"] == "episode-42"
        bad = h.post("/v1/chat/completions", json=body, headers={**headers, "X-Session-Id": "no spaces"})
        assert bad.status_code == 400 and "session id" in bad.json()["error"]["message"]
        assert h.post("/v1/chat/completions", content=b"{", headers=headers).status_code == 400


# ----------------------------------------------------------------------------- MineRL


def test_minerl_status_health_and_get_action(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as h:
        root = h.get("/").json()
        assert root["status"] == "online" and root["model_loaded"] is True and root["device"] == "cpu"
        health = h.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "healthy" and health.json()["ready"] is True
        payload = {
            "task_name": "MineRLBasaltFindCave-v0",
            "image": {"data": png_b64(64)},
            "step": 7,
            "temperature": 0.7,
            "max_tokens": 512,
        }
        out = h.post("/get_action", json=payload, headers={"Authorization": f"Bearer {KEY}"})
        assert out.status_code == 200, out.text
        body = out.json()
        assert set(body["action"]) >= MINERL_KEYS and body["step"] == 7
        assert isinstance(body["reasoning"], str) and body["parse_ok"] is True

        assert h.post("/get_action", json=payload).status_code == 401
        bad = h.post("/get_action", json={**payload, "image": {"data": "%%%"}}, headers={"X-API-Key": KEY})
        assert bad.status_code == 400 and "base64" in bad.json()["detail"]
        missing = h.post("/get_action", json={"task_name": "x"}, headers={"X-API-Key": KEY})
        assert missing.status_code == 400


def test_no_worker_means_503_then_a_silent_one_504_then_429(redis_server):
    broker = BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", max_backlog=1)
    settings = GatewaySettings(broker=broker, port=free_port(), timeout_s=1.0, sessions=1)
    body = {"model": "vlmq", "messages": [{"role": "user", "content": "anyone?"}]}
    with GatewayThread(settings) as gw, httpx.Client(base_url=gw.url, timeout=60) as h:
        health = h.get("/health")
        assert health.status_code == 503 and health.json()["ready"] is False
        none = h.post("/v1/chat/completions", json=body)  # at once, and the SDK may retry after 2 s
        assert none.status_code == 503 and none.json()["error"]["code"] == "no_worker"
        assert none.headers["retry-after"] == "2"
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=1, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="no live worker"):
            sdk.chat.completions.create(model="vlmq", messages=body["messages"])
        assert 1.9 < time.monotonic() - t0 < 10  # one retry, after Retry-After: not 2 x the timeout
        # a worker that advertises text_action but never reads: the request waits, then 504
        ghost = Keys(broker.prefix, broker.partitions).worker("ghost")
        redis.Redis.from_url(broker.url).hset(ghost, mapping={"name": "ghost", "kinds": "text_action"})
        late = h.post("/v1/chat/completions", json=body)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert late.headers["x-should-retry"] == "false"
        full = h.post("/v1/chat/completions", json=body)  # the first is still queued: backlog 1 of 1
        assert full.status_code == 429 and full.json()["error"]["code"] == "backlog_full"
        assert full.headers["retry-after"] == "1"


# ----------------------------------------------------------------------------- WebSocket


def test_websocket_msgpack_pipelined_and_bad_frames(stack):
    frame = np.full((32, 32, 3), 7, np.uint8)

    async def talk():
        async with websockets.connect(f"{stack.ws_url}?session=robot-9&api_key={KEY}") as ws:
            sent = [ActionChunkRequest(image=frame, step=i, instruction="reach") for i in range(6)]
            for req in sent:
                await ws.send(packb(req.to_wire()))
            await ws.send(b"\xc1")  # never valid msgpack
            await ws.send("a text frame")
            invalid = {
                **TextActionRequest(messages=[{"role": "user", "content": "x"}]).to_wire(),
                "messages": [],
            }
            await ws.send(packb(invalid))
            other = TextActionRequest(session_id="someone-else", messages=[{"role": "user", "content": "x"}])
            await ws.send(packb(other.to_wire()))
            replies = [decode_reply(await asyncio.wait_for(ws.recv(), 60)) for _ in range(10)]
        return sent, invalid, other, replies

    sent, invalid, other, replies = asyncio.run(talk())
    ok = {r.request_id: r for r in replies if r.ok}
    assert set(ok) == {r.request_id for r in sent}
    for req in sent:
        rep = ok[req.request_id]
        assert rep.session_id == "robot-9" and rep.step == req.step
        assert rep.result.chunk.shape == (50, 7)
    errors = [r for r in replies if not r.ok]
    assert sorted(r.error.code.value for r in errors) == ["invalid", "invalid", "malformed", "malformed"]
    by_rid = {r.request_id: r for r in errors}
    assert "messages" in by_rid[invalid["request_id"]].error.message
    assert "this socket's session is 'robot-9'" in by_rid[other.request_id].error.message


def test_websocket_needs_the_api_key(stack):
    async def connect():
        async with websockets.connect(stack.ws_url) as ws:
            await ws.recv()

    with pytest.raises(websockets.exceptions.InvalidStatus):
        asyncio.run(connect())


def test_idle_named_sessions_are_closed_beyond_the_limit(redis_server):
    broker = BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}")
    settings = GatewaySettings(broker=broker, port=free_port(), sessions=1, max_sessions=2)
    body = {"model": "vlmq", "messages": [{"role": "user", "content": "hi"}]}
    with (
        WorkerThread(synthetic_settings(broker, name="w-lru", kinds=("text_action",))),
        GatewayThread(settings) as gw,
        httpx.Client(base_url=gw.url, timeout=60) as h,
    ):
        for i in range(5):
            out = h.post("/v1/chat/completions", json=body, headers={"X-Session-Id": f"episode-{i}"})
            assert out.status_code == 200 and out.json()["vlmq"]["session_id"] == f"episode-{i}"
        pool = gw.app.state.gateway.sessions
        assert wait_for(lambda: len(pool.open_sessions) <= 2)
        assert "episode-4" in pool.open_sessions
