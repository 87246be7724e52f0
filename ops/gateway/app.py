"""The gateway's ASGI app: the OpenAI and MineRL routes and the WebSocket, one Gateway behind them."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from starlette.applications import Starlette

from ops.gateway import minerl_api, openai_api, websocket
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

    app = Starlette(
        routes=[*openai_api.routes(gw), *minerl_api.routes(gw), websocket.route(gw)],
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
