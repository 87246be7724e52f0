"""The MineRL policy server's API (`qwen_policy_server.py`), unchanged for its client.

`GET /` and `GET /health` report whether a worker serving `structured_action` is alive;
`POST /get_action` takes `{"task_name", "image": {"data": base64 PNG/JPEG}, "step",
"temperature", "max_tokens"}` and answers `{"action": {...MineRL action dict...},
"reasoning", "step"}` (plus `parse_ok`: false when the model's answer was unusable and the
action is the all-zero default; the worker decodes under the action grammar unless the
body says `"constrained": false`, so it is true). A session may be named with
`X-Session-Id` or a `session_id` field; otherwise the gateway's pooled sessions carry the
call.
"""

from __future__ import annotations

from typing import Any, Dict, List

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ops.gateway.bodies import b64_image, read_json
from ops.gateway.errors import GatewayError, handle_errors
from ops.gateway.service import Gateway
from schemas.messages import StructuredActionRequest

KIND = "structured_action"
SERVICE = "vlmq MineRL policy gateway"


def _devices(workers: List[Dict[str, str]]) -> str:
    return ",".join(sorted({w.get("device") or "?" for w in workers})) or "none"


def routes(gw: Gateway) -> List[Route]:
    async def root(request: Request) -> Response:
        try:
            workers = await gw.serving(KIND)
        except RedisError:
            workers = []
        return JSONResponse(
            {
                "status": "online",
                "service": SERVICE,
                "model_loaded": bool(workers),
                "device": _devices(workers),
            }
        )

    async def health(request: Request) -> Response:
        try:
            workers = await gw.serving(KIND)
        except RedisError as exc:
            return JSONResponse({"status": "unhealthy", "ready": False, "reason": f"redis: {exc}"}, 503)
        ready = bool(workers)
        body: Dict[str, Any] = {
            "status": "healthy" if ready else "unhealthy",
            "model": gw.settings.models[0],
            "device": _devices(workers),
            "ready": ready,
            "workers": len(workers),
        }
        if not ready:
            body["reason"] = f"no live worker serves {KIND}"
        return JSONResponse(body, status_code=200 if ready else 503)

    async def get_action(request: Request) -> Response:
        gw.authorize(request.headers)
        data = await read_json(request, gw.settings.limits.max_message_bytes)
        image = data.get("image")
        raw = b64_image(image.get("data") if isinstance(image, dict) else image, "image.data")
        fields: Dict[str, Any] = {
            "image": raw,
            "task_name": data.get("task_name") or "",
            "step": data.get("step", 0),
            "temperature": data.get("temperature"),
            "max_tokens": data.get("max_tokens"),
            "constrained": data.get("constrained"),  # vlmq extension: false for free text
            "model": gw.route(data.get("model")),
        }
        req = gw.build(StructuredActionRequest, {k: v for k, v in fields.items() if v is not None})
        session = request.headers.get("x-session-id") or data.get("session_id")
        reply = await gw.call(req, session)
        result = reply.result
        return JSONResponse(
            {
                "action": result.action,
                "reasoning": result.reasoning,
                "step": req.step,
                "parse_ok": result.parse_ok,
            }
        )

    return [
        Route("/", root, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/get_action", handle_errors(get_action, GatewayError.detail_body), methods=["POST"]),
    ]
