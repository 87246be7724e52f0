"""`vlmq gateway`: serve the HTTP and WebSocket APIs on uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging

from broker.commands import Command
from ops.gateway.settings import add_gateway_args, gateway_settings_from_args

log = logging.getLogger("vlmq.gateway")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from broker.meta import PartitionMismatch
    from ops.gateway.app import create_app

    settings = gateway_settings_from_args(args)
    log.info(
        "gateway %s on http://%s:%d (models: %s; API keys: %s)",
        settings.name,
        settings.host,
        settings.port,
        ",".join(settings.models),
        "required" if settings.api_keys else "off",
    )
    try:
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=str(args.log_level).lower(),
            loop="auto",  # uvloop when installed
            lifespan="on",
        )
    except PartitionMismatch as exc:
        raise SystemExit(f"vlmq gateway: {exc}") from None
    return 0


COMMAND = Command(
    "gateway",
    help="HTTP and WebSocket APIs (OpenAI, MineRL server, msgpack) in front of the streams",
    description="Turn each HTTP or WebSocket request into a stream message and wait for its reply: "
    "POST /v1/chat/completions and GET /v1/models (OpenAI-compatible), GET /, GET /health and "
    "POST /get_action (the MineRL policy server API), and /v1/ws (vlmq's msgpack protocol). "
    "See docs/GATEWAY.md.",
    add_args=add_gateway_args,
    run=run,
)
