"""OpenAI and vLLM features through the real `openai` package: `vlmq gateway` -> Redis -> a
worker running a tiny random-weight Qwen2-VL (a real architecture; its words are noise, so
every answer that has the asked-for shape has it because the worker decoded under the
constraint). Structured output, `parse()`, vLLM's guided_*, tools, streaming, logprobs,
n, the default max_tokens, and the WebSocket's partial frames."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Literal

import openai
import pytest
import websockets
from pydantic import BaseModel

pytest.importorskip("torch")
pytest.importorskip("xgrammar")

from broker.embedded import free_port
from broker.settings import BrokerSettings
from inference_worker.engines.chat_engine import ChatEngine
from inference_worker.engines.options import EngineOptions
from inference_worker.handlers.structured_action import StructuredActionHandler
from inference_worker.handlers.text_action import TextActionHandler
from inference_worker.models import load_vlm
from ops.gateway.server import GatewayThread
from ops.gateway.settings import GatewaySettings
from schemas.codec import packb, unpackb
from schemas.messages import TextActionRequest, decode_partial, decode_reply
from tests.helpers import WorkerThread, synthetic_settings

MODEL = "qwen2-vl-tiny"
CONTEXT = 1024  # the worker's decode slots: a request without max_tokens runs to here
ASK = [{"role": "user", "content": "Which way should the agent go?"}]


class Move(BaseModel):
    direction: Literal["north", "south", "east", "west"]
    run: bool


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]},
    },
}


@pytest.fixture(scope="module")
def gateway(redis_server, tiny_qwen2_vl):
    broker = BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", partitions=2)
    settings = synthetic_settings(broker, kinds=("text_action", "structured_action"), max_wait_ms=1.0)
    engine = ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(max_context=CONTEXT), max_sequences=16)
    handlers = {
        "text_action": TextActionHandler(engine, settings.limits),
        "structured_action": StructuredActionHandler(engine, settings.limits),
    }
    gw_settings = GatewaySettings(broker=broker, port=free_port(), models=(MODEL,), timeout_s=120)
    with WorkerThread(settings, handlers=handlers) as worker:
        worker.wait_live()  # its warm-up runs the model first
        with GatewayThread(gw_settings) as gw:
            yield gw


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_structured_outputs_parse_json_schema_and_json_object(client):
    parsed = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Move, max_tokens=40)
    move = parsed.choices[0].message.parsed
    assert isinstance(move, Move) and parsed.choices[0].finish_reason == "stop"

    obj = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=30
    )
    text = obj.choices[0].message.content
    assert text.startswith("{")
    if obj.choices[0].finish_reason == "stop":  # random weights may fill a string up to max_tokens
        assert isinstance(json.loads(text), dict)


def test_vllm_guided_choice_regex_and_json(client):
    choice = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10, extra_body={"guided_choice": ["left", "right", "wait"]}
    )
    assert choice.choices[0].message.content in ("left", "right", "wait")
    regex = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10, extra_body={"guided_regex": r"[A-D]-[0-9]{3}"}
    )
    assert re.fullmatch(r"[A-D]-[0-9]{3}", regex.choices[0].message.content)
    guided = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, extra_body={"guided_json": Move.model_json_schema()}
    )
    Move.model_validate_json(guided.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as both:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={"type": "json_object"},
            extra_body={"guided_regex": "a"},
        )
    assert both.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError, match="cannot compile"):
        client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"guided_regex": "(unclosed"})


def test_tools_required_named_none_and_auto(client):
    required = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=120
    )
    c = required.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert set(args) == ({"city", "unit"} if call.function.name == "get_weather" else {"utc"})

    named = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
    )
    args = json.loads(named.choices[0].message.tool_calls[0].function.arguments)
    assert args["city"] in ("Paris", "Oslo") and args["unit"] in ("C", "F")

    # the call's result goes back as a tool message; tool_choice none: plain text
    follow = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [named.choices[0].message.tool_calls[0].model_dump()],
        },
        {"role": "tool", "tool_call_id": named.choices[0].message.tool_calls[0].id, "content": "12 C"},
    ]
    none = client.chat.completions.create(
        model=MODEL, messages=follow, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)

    streamed = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, stream=True
    )
    deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].tool_calls[0].function.name == "get_weather"
    assert set(json.loads(deltas[0].tool_calls[0].function.arguments)) == {"city", "unit"}

    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=120)
    a = auto.choices[0]
    if a.message.tool_calls:
        assert json.loads(a.message.tool_calls[0].function.arguments)["unit"] in ("C", "F")
    else:
        assert not a.message.content.startswith("{")


def test_streaming_sends_pieces_as_they_are_decoded(client):
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
    )
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 4, "the answer came in one piece: not streamed"
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    tokens = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert tokens == whole.usage.completion_tokens == chunks[-1].usage.completion_tokens

    guided = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, stream=True, response_format=_strict(Move)
    )
    Move.model_validate_json("".join(c.choices[0].delta.content or "" for c in guided if c.choices))


def _strict(model) -> dict:
    schema = {**model.model_json_schema(), "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": schema, "strict": True}}


def test_logprobs_and_n(client):
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=6, logprobs=True, top_logprobs=3, temperature=0
    )
    lp = out.choices[0].logprobs.content
    assert len(lp) == out.usage.completion_tokens
    for t in lp:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob
        assert bytes(t.bytes).decode(errors="replace") == t.token

    many = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=6, n=3, temperature=1.0, seed=4
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1
    assert many.usage.completion_tokens == 18  # three answers of 6 (random weights rarely stop)


def test_default_max_tokens_is_the_rest_of_the_context(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"ignore_eos": False})
    if out.choices[0].finish_reason == "length":
        # every column of the slot is used; the last token is never fed back, so needs none
        assert out.usage.prompt_tokens + out.usage.completion_tokens == CONTEXT + 1
    with pytest.raises(openai.BadRequestError) as zero:
        client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=0)
    assert zero.value.body["param"] == "max_completion_tokens"


def test_websocket_streams_partial_frames_then_the_reply(gateway):
    async def talk():
        async with websockets.connect(f"{gateway.ws_url}?session=ws-stream-1") as ws:
            req = TextActionRequest(messages=ASK, max_tokens=10, stream=True)
            await ws.send(packb(req.to_wire()))
            frames = []
            while True:
                raw = await asyncio.wait_for(ws.recv(), 120)
                if unpackb(raw).get("partial"):
                    frames.append(decode_partial(raw))
                else:
                    return frames, decode_reply(raw)

    pieces, reply = asyncio.run(talk())
    assert len(pieces) >= 3 and reply.ok
    assert reply.result.text.startswith("".join(p.text for p in pieces))
