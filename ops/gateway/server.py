"""The gateway on uvicorn in a background thread: for tests, demos and notebooks that need
it beside other work in one process (`vlmq gateway` is the way to run it as a service)."""

from __future__ import annotations

import threading
import time
from typing import Optional

from ops.gateway.app import create_app
from ops.gateway.settings import GatewaySettings


class GatewayThread:
    """`with GatewayThread(settings) as gw: gw.url` -- started on enter, stopped on exit."""

    def __init__(self, settings: GatewaySettings) -> None:
        import uvicorn

        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host=settings.host, port=settings.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="vlmq-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.settings.host}:{self.settings.port}/v1/ws"

    def start(self, timeout: float = 30.0) -> GatewayThread:
        self.thread.start()
        give_up = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > give_up:
                raise RuntimeError("the gateway did not start (see the log above)")
            time.sleep(0.02)
        return self

    def stop(self, timeout: Optional[float] = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
