"""One way to declare a `vlmq` command, in the lowest package that every CLI module
(inference_worker, env_agents, ops) may import; ops/cli.py builds the parsers from these."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Command:
    """`vlmq NAME`: its texts, `add_args(parser)` for its flags and `run(args) -> exit
    status`; or, for a group (`vlmq vla STEP`), its `subcommands` under `metavar`, where
    no step given prints the group's help and exits 2."""

    name: str
    help: str
    description: Optional[str] = None
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    run: Optional[Callable[[argparse.Namespace], int]] = None
    subcommands: Sequence[Command] = ()
    metavar: str = "ACTION"
    epilog: Optional[str] = None
    formatter_class: Optional[type] = None
    # set on the parsed arguments besides `func`: what `vlmq` replaces (ops/metrics/plug.py)
    defaults: Mapping[str, Any] = field(default_factory=dict)
