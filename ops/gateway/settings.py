"""Gateway settings: one object; `vlmq gateway --help` lists the flag and env var of each."""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Optional, Tuple

from broker.settings import BrokerSettings, add_broker_args, broker_settings_from_args, env, flag
from schemas.limits import Limits
from schemas.messages import MODEL_PATTERN


def default_gateway_name() -> str:
    return f"gw-{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class GatewaySettings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = 8000
    # Keys accepted as `Authorization: Bearer KEY` or `X-API-Key: KEY` (WebSocket also
    # `?api_key=KEY`); empty: no authentication.
    api_keys: Tuple[str, ...] = ()
    # Model names served. The first is the default: requests naming it go to the shared
    # streams every worker reads. Each other name goes to its model-specific streams, read
    # by workers started with `--model-name NAME`. Any other name is answered 404.
    models: Tuple[str, ...] = ("vlmq",)
    timeout_s: float = 120.0  # longest wait for a reply; also the request's deadline
    # max_tokens of an OpenAI request that names none; 0: the rest of the context (the worker
    # stops at the end of its decode slot), at most VLMQ_MAX_NEW_TOKENS, as vLLM does
    default_max_tokens: int = 0
    sessions: int = 8  # pooled sessions for requests that name none
    max_sessions: int = 1024  # named sessions (X-Session-Id, WebSocket) kept open at once
    ws_max_in_flight: int = 256  # requests one WebSocket may have waiting
    name: str = field(default_factory=default_gateway_name)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("the gateway needs at least one model name")
        for m in self.models[1:]:
            if not re.match(MODEL_PATTERN, m):
                raise ValueError(
                    f"model name {m!r} must match {MODEL_PATTERN}: it becomes part of stream keys"
                )

    def route(self, model: Optional[str]) -> Optional[str]:
        """The request's `model` field for a served model name (None: the shared streams)."""
        if model is None or model == self.models[0]:
            return None
        if model in self.models[1:]:
            return model
        raise LookupError(model)


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    d = GatewaySettings()
    g = p.add_argument_group("gateway")
    flag(g, "--host", var="GATEWAY_HOST", default=d.host, help="bind address")
    flag(g, "--port", var="GATEWAY_PORT", default=d.port, type=int, help="port")
    g.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require this API key (repeatable); unset: no authentication "
        "[VLMQ_GATEWAY_API_KEYS, comma-separated]",
    )
    flag(
        g,
        "--models",
        var="GATEWAY_MODELS",
        default=",".join(d.models),
        help="comma-separated model names served; the first goes to the shared streams, the others to the "
        "streams of workers started with --model-name NAME",
    )
    flag(
        g,
        "--timeout-s",
        var="GATEWAY_TIMEOUT_S",
        default=d.timeout_s,
        type=float,
        help="longest wait for a reply, also sent as the request deadline",
    )
    flag(
        g,
        "--default-max-tokens",
        var="GATEWAY_DEFAULT_MAX_TOKENS",
        default=d.default_max_tokens,
        type=int,
        help="max_tokens of OpenAI requests that give none; 0: the rest of the context, at most "
        "VLMQ_MAX_NEW_TOKENS",
    )
    flag(
        g,
        "--sessions",
        var="GATEWAY_SESSIONS",
        default=d.sessions,
        type=int,
        help="pooled sessions for requests without X-Session-Id",
    )
    flag(
        g,
        "--max-sessions",
        var="GATEWAY_MAX_SESSIONS",
        default=d.max_sessions,
        type=int,
        help="named sessions kept open at once",
    )
    flag(
        g,
        "--ws-max-in-flight",
        var="GATEWAY_WS_MAX_IN_FLIGHT",
        default=d.ws_max_in_flight,
        type=int,
        help="requests one WebSocket may have waiting",
    )
    flag(
        g,
        "--name",
        var="GATEWAY_NAME",
        default="",
        help="gateway name, unique per gateway; pooled session ids derive from it",
        shown="gw-host-pid",
    )


def gateway_settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    keys = args.api_key if args.api_key is not None else env("GATEWAY_API_KEYS", "").split(",")
    return GatewaySettings(
        broker=broker_settings_from_args(args),
        limits=Limits.from_env(),
        host=args.host,
        port=args.port,
        api_keys=tuple(k.strip() for k in keys if k.strip()),
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        timeout_s=args.timeout_s,
        default_max_tokens=args.default_max_tokens,
        sessions=args.sessions,
        max_sessions=args.max_sessions,
        ws_max_in_flight=args.ws_max_in_flight,
        name=args.name or default_gateway_name(),
    )
