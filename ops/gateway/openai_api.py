"""OpenAI-compatible chat completions: `POST /v1/chat/completions`, `GET /v1/models`.

A chat completion is a `text_action` request: the messages go through unchanged (image
parts as data URLs, OpenAI's `image_url` or Qwen's `image` form, as the vLLM and OpenAI
clients of the seeds send them) and the reply's text is the assistant message. vlmq
extensions ride in the body (the OpenAI SDK's `extra_body`): `admissible_commands` (the
reply then names the best-scoring command) and `latest_only`. Features vlmq does not have
(n > 1, tools, logprobs, structured output) are refused with a 400, never ignored.
`stream: true` is accepted for clients that always stream; the answer comes as one chunk,
since the worker replies with the whole text at once.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ops.gateway.bodies import read_json
from ops.gateway.errors import GatewayError, handle_errors
from ops.gateway.service import Gateway
from schemas.messages import Reply, TextActionRequest, describe_validation_error

_PART_TYPES = ("text", "image_url", "image")


class ChatCompletionBody(BaseModel):
    """The fields of OpenAI's request that vlmq reads; unknown ones are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: List[Dict[str, Any]] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[Dict[str, Any]] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    logprobs: Optional[bool] = None
    response_format: Optional[Dict[str, Any]] = None
    # vlmq extensions
    admissible_commands: Optional[List[str]] = None
    latest_only: bool = False


def _refuse_unsupported(body: ChatCompletionBody) -> None:
    problems = []
    if body.n not in (None, 1):
        problems.append("n must be 1")
    if body.tools or body.tool_choice not in (None, "none"):
        problems.append("tools are not supported")
    if body.logprobs:
        problems.append("logprobs are not supported")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        problems.append("response_format must be text")
    if problems:
        raise GatewayError(400, "; ".join(problems), "unsupported")


def _message(m: Dict[str, Any], i: int) -> Dict[str, Any]:
    role = m.get("role")
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
        raise GatewayError(400, f"messages.{i}.role {role!r} is not supported (no tool messages)", "invalid")
    content = m.get("content")
    if content is None:
        raise GatewayError(400, f"messages.{i}.content is required (tool calls are not supported)", "invalid")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _PART_TYPES:
                raise GatewayError(
                    400,
                    f"messages.{i}.content.{j}: part type {kind!r} is not one of {_PART_TYPES}",
                    "invalid",
                )
        # Keep what the schema knows: `detail` of image_url, `name` of a message, ... go.
        content = [
            {"type": "text", "text": p.get("text")}
            if p["type"] == "text"
            else {"type": p["type"], p["type"]: p.get(p["type"])}
            for p in content
        ]
    return {"role": role, "content": content}


def to_request(gw: Gateway, data: Dict[str, Any]) -> Tuple[TextActionRequest, ChatCompletionBody]:
    try:
        body = ChatCompletionBody.model_validate(data)
    except ValidationError as exc:
        raise GatewayError(400, describe_validation_error(exc), "invalid") from None
    _refuse_unsupported(body)
    fields: Dict[str, Any] = {
        "messages": [_message(m, i) for i, m in enumerate(body.messages)],
        "max_tokens": body.max_completion_tokens or body.max_tokens or gw.settings.default_max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "seed": body.seed,
        "admissible_commands": body.admissible_commands,
        "latest_only": body.latest_only,
        "model": gw.route(body.model),
    }
    return gw.build(TextActionRequest, {k: v for k, v in fields.items() if v is not None}), body


def _usage(reply: Reply) -> Dict[str, int]:
    p, c = reply.result.prompt_tokens, reply.result.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _extension(reply: Reply) -> Dict[str, Any]:
    r = reply.result
    out: Dict[str, Any] = {
        "request_id": reply.request_id,
        "session_id": reply.session_id,
        "worker": reply.worker,
        "batch_size": reply.batch_size,
        "timings": reply.timings,
    }
    if r.choice is not None:
        out.update(choice=r.choice, choice_index=r.choice_index, scores=r.scores)
    return out


def completion(reply: Reply, model: str) -> Dict[str, Any]:
    return {
        "id": f"chatcmpl-{reply.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.result.text},
                "finish_reason": reply.result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(reply),
        "vlmq": _extension(reply),
    }


async def _chunks(reply: Reply, model: str, include_usage: bool) -> AsyncIterator[str]:
    head = {
        "id": f"chatcmpl-{reply.request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
    }
    head["model"] = model
    deltas = [
        {"index": 0, "delta": {"role": "assistant", "content": reply.result.text}, "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": reply.result.finish_reason},
    ]
    for choice in deltas:
        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
    if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(reply)})}\n\n"
    yield "data: [DONE]\n\n"


def routes(gw: Gateway) -> List[Route]:
    started = int(time.time())

    async def chat_completions(request: Request) -> Response:
        gw.authorize(request.headers)
        data = await read_json(request, gw.settings.limits.max_message_bytes)
        req, body = to_request(gw, data)
        reply = await gw.call(req, request.headers.get("x-session-id"))
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_chunks(reply, body.model, usage), media_type="text/event-stream")
        return JSONResponse(completion(reply, body.model))

    def model_card(name: str) -> Dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "vlmq"}

    async def models(request: Request) -> Response:
        gw.authorize(request.headers)
        return JSONResponse({"object": "list", "data": [model_card(m) for m in gw.settings.models]})

    async def model(request: Request) -> Response:
        gw.authorize(request.headers)
        name = request.path_params["model"]
        gw.route(name)  # 404 unless served
        return JSONResponse(model_card(name))

    return [
        Route(
            "/v1/chat/completions",
            handle_errors(chat_completions, GatewayError.openai_body),
            methods=["POST"],
        ),
        Route("/v1/models", handle_errors(models, GatewayError.openai_body), methods=["GET"]),
        Route("/v1/models/{model:path}", handle_errors(model, GatewayError.openai_body), methods=["GET"]),
    ]
