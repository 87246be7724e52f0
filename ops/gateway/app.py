"""The gateway's ASGI app: the OpenAI and MineRL routes and the WebSocket, one Gateway behind them.

An unknown route (404) or method (405) is answered in the shape of the API it was meant
for: OpenAI's error object under /v1, the MineRL server's `{"detail": ...}` elsewhere."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ops.gateway import minerl_api, openai_api, websocket
from ops.gateway.errors import GatewayError
from ops.gateway.service import Gateway
from ops.gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings, redis=None) -> Starlette:
    gw = Gateway(settings, redis)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.close()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message, code = f"no route {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), "http_error"
        err = GatewayError(exc.status_code, message, code, dict(exc.headers or {}))
        body = err.openai_body() if request.url.path.startswith("/v1/") else err.detail_body()
        return JSONResponse(body, status_code=exc.status_code, headers=err.headers)

    app = Starlette(
        routes=[*openai_api.routes(gw), *minerl_api.routes(gw), websocket.route(gw)],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.gateway = gw
    return app
