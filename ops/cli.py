"""`vlmq`: the one console script. Each subcommand lives next to what it drives and
registers its own flags; heavy imports (torch) happen only when a command runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from broker.settings import BrokerSettings

COMMANDS = [
    "inference_worker.cli",  # worker
    "inference_worker.models.cli",  # make-model
    "ops.demo",  # demo
    "ops.inspect",  # inspect
    "ops.top",  # top
    "ops.tail",  # tail
    "ops.record",  # record
    "ops.replay",  # replay
    "ops.bench",  # bench
    "ops.acl.cli",  # acl
    "ops.gateway.cli",  # gateway
    "inference_worker.vla.cli",  # vla
    "env_agents.cli",  # agents
    "env_agents.traces.cli",  # traces
    "env_agents.envs.cli",  # envs
]


def argv(command: str, settings: BrokerSettings, *extra: str, log_level: Optional[str] = None) -> List[str]:
    """The command line that runs `vlmq COMMAND` in a new process on these broker settings
    (the demo, benchmarks and tests start workers, gateways and taps this way)."""
    cmd = [sys.executable, "-m", "ops.cli"]
    if log_level:
        cmd += ["--log-level", log_level]
    cmd += [command, "--redis-url", settings.url, "--prefix", settings.prefix]
    cmd += ["--partitions", str(settings.partitions)] + (["--cluster"] if settings.cluster else [])
    return cmd + list(extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq",
        description="vlmq: many environment processes sharing one GPU vision-language model over Redis streams.",
        epilog="Every flag has an environment variable (shown in [brackets]); `vlmq COMMAND --help` for details.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (%(default)s)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
