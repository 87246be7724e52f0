"""`/v1/ws`: vlmq's own msgpack protocol over a WebSocket, for low-latency clients.

Each binary frame a client sends is one request body, exactly as it would go into a
request stream (`packb(request.to_wire())`); each binary frame the gateway sends back is
one reply body, exactly as a reply stream holds it (decode with `decode_reply`). Requests
may be pipelined: replies come back as they are ready, matched by `request_id`. A request
with `stream: true` also gets its partial replies first, one frame each (maps with
`partial: true`; decode with `decode_partial`). The socket
is one session: `?session=ID` names it (the default is a fresh id), and requests that
leave `session_id` empty are filled in. A frame that can't be a request is answered with
an error reply at once and never reaches a worker.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Optional, Set, Union

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from broker.publisher import BacklogFull
from ops.gateway.errors import GatewayError
from ops.gateway.service import Gateway
from schemas.codec import packb, unpackb
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import ErrorInfo, Partial, Reply, decode_request

_POLICY_VIOLATION = 1008


def _error_reply(gw: Gateway, session: str, exc: ProtocolError, body: Optional[bytes] = None) -> Reply:
    """An error reply that names the request when its header can still be read."""
    head = {}
    if body is not None:
        try:
            data = unpackb(body, gw.settings.limits)
            head = data if isinstance(data, dict) else {}
        except ProtocolError:
            pass
    rid, kind = head.get("request_id"), head.get("kind")
    return Reply(
        request_id=rid if isinstance(rid, str) else "",
        session_id=session,
        kind=kind if isinstance(kind, str) else "",
        step=head.get("step") if isinstance(head.get("step"), int) else 0,
        ok=False,
        worker=gw.settings.name,
        error=ErrorInfo(code=exc.code, message=exc.message, detail=exc.detail),
    )


def route(gw: Gateway) -> WebSocketRoute:
    async def endpoint(ws: WebSocket) -> None:
        try:
            gw.authorize(ws.headers, ws.query_params)
            session = ws.query_params.get("session") or f"ws-{uuid.uuid4().hex[:16]}"
            if not gw.sessions.valid(session):
                raise GatewayError(400, f"session id {session!r} is not valid", "invalid")
        except GatewayError as exc:
            await ws.close(code=_POLICY_VIOLATION, reason=exc.message[:120])
            return
        await ws.accept()
        client = await gw.sessions.get(session)
        send_lock = asyncio.Lock()
        tasks: Set[asyncio.Task] = set()

        async def send(reply: Union[Reply, Partial]) -> None:
            async with send_lock:
                await ws.send_bytes(packb(reply.to_wire()))

        async def serve(body: bytes) -> None:
            try:
                req = decode_request(body, gw.settings.limits, session_id=session)
                if req.session_id != session:
                    raise ProtocolError(
                        ErrorCode.INVALID,
                        f"session_id {req.session_id!r}: this socket's session is {session!r}",
                    )
                if client.outstanding >= gw.settings.ws_max_in_flight:
                    raise ProtocolError(
                        ErrorCode.BACKLOG_FULL,
                        f"{client.outstanding} requests of this socket are waiting; the limit is "
                        f"{gw.settings.ws_max_in_flight}",
                    )
                if getattr(req, "stream", False):
                    async for event in client.stream(req):
                        await send(event)
                    return
                fut = await client.submit(req)
            except (ProtocolError, BacklogFull) as exc:
                await send(_error_reply(gw, session, exc, body))
                return
            await send(await fut)

        def spawn(body: bytes) -> None:
            task = asyncio.ensure_future(serve(body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    spawn(message["bytes"])
                else:
                    exc = ProtocolError(
                        ErrorCode.MALFORMED, "send requests as binary msgpack frames, not text"
                    )
                    await send(_error_reply(gw, session, exc))
        except WebSocketDisconnect:
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gw.sessions.release(session)

    return WebSocketRoute("/v1/ws", endpoint)
