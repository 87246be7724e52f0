"""End to end through a real model: the `openai` package and httpx -> `vlmq gateway` (the
CLI, as its own process) -> Redis -> a worker running a tiny random-weight Qwen2-VL (the
real architecture, built by the `tiny_qwen2_vl` fixture; its words are noise, its token
counts, greedy determinism and action dicts are real)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import uuid

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from broker.embedded import free_port
from broker.settings import BrokerSettings
from tests.helpers import REPO, WorkerThread, stop_process, wait_for

KEY = "sk-tiny"
MODEL = "qwen2-vl-tiny"
MINERL_KEYS = {"forward", "back", "left", "right", "jump", "sneak", "sprint", "attack", "camera", "ESC"}


def png_b64(seed: int = 0, side: int = 56) -> str:
    frame = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def gateway_url(redis_server, tiny_qwen2_vl):
    from inference_worker.settings import WorkerSettings

    broker = BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", partitions=2)
    worker = WorkerSettings(
        broker=broker,
        name="w-tiny",
        backend="hf",
        model_path=tiny_qwen2_vl,
        kinds=("text_action", "structured_action"),
        heartbeat_s=0.5,
    )
    port = free_port()
    cmd = [sys.executable, "-m", "ops.cli", "gateway", "--redis-url", broker.url, "--prefix", broker.prefix]
    cmd += ["--partitions", "2", "--port", str(port), "--api-key", KEY, "--models", MODEL]
    with WorkerThread(worker):
        gateway = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return gateway.poll() is not None  # exited: fail below with its output

        try:
            assert wait_for(ready, timeout=120, interval=0.2)
            assert gateway.poll() is None, gateway.stdout.read()
            yield url
        finally:
            code = stop_process(gateway)
            log = gateway.stdout.read()
            # uvicorn shuts down gracefully, then re-raises SIGTERM so managers see why it ended.
            assert code in (0, -15) and "Application shutdown complete" in log, log


def test_openai_sdk_gets_real_completions(gateway_url):
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
                {"type": "text", "text": "Describe the room."},
            ],
        }
    ]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert isinstance(first.choices[0].message.content, str)
    assert first.choices[0].message.content == again.choices[0].message.content  # greedy
    assert 1 <= first.usage.completion_tokens <= 6
    assert first.usage.prompt_tokens > 10  # the image's tokens and the chat template are counted
    assert first.model_extra["vlmq"]["worker"] == "w-tiny"

    pick = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "You are in a kitchen. What do you do?"}],
        extra_body={"admissible_commands": ["go north", "take apple", "open fridge"]},
    )
    ext = pick.model_extra["vlmq"]
    assert pick.choices[0].message.content in ("go north", "take apple", "open fridge")
    assert ext["choice"] == pick.choices[0].message.content and len(ext["scores"]) == 3


def test_qwen_style_http_client_and_minerl_client(gateway_url):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=gateway_url, timeout=120) as h:
        # An RL-VLM-F style client: Qwen-style image parts with data URLs.
        body = {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Which image shows more progress?"},
                        {"type": "image", "image": "data:image/png;base64," + png_b64(1)},
                        {"type": "image", "image": "data:image/png;base64," + png_b64(2)},
                    ],
                }
            ],
            "max_tokens": 4,
            "temperature": 0,
        }
        out = h.post("/v1/chat/completions", json=body, headers=headers)
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] >= 1

        # The MineRL policy client's API.
        assert h.get("/health").json()["ready"] is True
        payload = {
            "task_name": "MineRLBasaltFindCave-v0",
            "image": {"data": png_b64(3, 64)},
            "step": 5,
            "temperature": 0.0,
            "max_tokens": 16,
        }
        action = h.post("/get_action", json=payload, headers=headers)
        assert action.status_code == 200, action.text
        got = action.json()
        assert set(got["action"]) >= MINERL_KEYS and got["step"] == 5
        assert len(got["action"]["camera"]) == 2 and isinstance(got["parse_ok"], bool)
