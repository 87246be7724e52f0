"""`vlmq`: the one console script. Each subcommand lives next to what it drives and
declares itself there (`COMMAND`, a `broker.commands.Command`); this module builds every
parser from those declarations. Heavy imports (torch) happen only when a command runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from typing import Any, Iterator, List, Optional, Sequence, Set

from broker.commands import Command
from broker.settings import BrokerSettings
from ops.metrics.plug import plug as plug_metrics
from schemas import settings as tree

COMMANDS = [
    "inference_worker.cli",  # worker
    "inference_worker.models.cli",  # make-model
    "ops.demo",  # demo
    "ops.inspect",  # inspect
    "ops.top",  # top
    "ops.tail",  # tail
    "ops.record",  # record
    "ops.replay",  # replay
    "ops.bench.cli",  # bench
    "ops.acl.cli",  # acl
    "ops.gateway.cli",  # gateway
    "ops.vla.cli",  # vla
    "env_agents.cli",  # agents
    "env_agents.traces.cli",  # traces
    "env_agents.envs.cli",  # envs
]

# VLMQ_* variables read neither as a flag's default nor through a settings class, each
# where it is read; with the flags' and the settings' variables they are every known name
# (`check_variables`), so none of them is refused as a typo.
OTHER_VARIABLES = {
    "VLMQ_BENCH_GPU": "ops/bench/records.py: the card a benchmark result names",
    "VLMQ_BENCH_MACHINE": "ops/bench/records.py: the machine a benchmark result names",
    "VLMQ_BENCH_COMMIT": "ops/bench/records.py: the commit, where there is no checkout",
    "VLMQ_REDIS_SERVER": "broker/embedded.py: the redis-server binary of embedded Redis",
    "VLMQ_TEXTWORLD_DIR": "env_agents/envs/textworld.py: the cache of generated games",
    "VLMQ_MODEL_DIR": "ops/docker-compose.yml: the model folder the workers serve",
    "VLMQ_MODELS": "ops/docker-compose.yml: the host folder of models",
    "VLMQ_PUBLISH_ADDR": "ops/docker-compose.yml: the address ports are published on",
    "VLMQ_REDIS_PORT": "ops/docker-compose.yml: Redis's published port",
    "VLMQ_GPUS": "ops/docker-compose.yml: GPUs reserved for a worker",
    "VLMQ_VLLM_VENV": "ops/vllm_cpu/setup.sh: where the vLLM venv goes",
    "VLMQ_VLLM_VERSION": "ops/vllm_cpu/setup.sh: the vLLM version it installs",
    "VLMQ_FUZZ_RUNS": "tests/test_fuzz_atheris.py: runs of the coverage-guided fuzzer",
}
OTHER_PREFIXES = ("VLMQ_ACL_PASSWORD_",)  # ops/acl/cli.py: one variable per ACL user
_VAR = re.compile(r"\[(VLMQ_[A-Z0-9_]+)")
_DEFAULT_NOTE = re.compile(r"\s*\([^()]*%\(default\)s[^()]*\)\s*$")


def argv(command: str, settings: BrokerSettings, *extra: str, log_level: Optional[str] = None) -> List[str]:
    """The command line that runs `vlmq COMMAND` in a new process on these broker settings
    (the demo, benchmarks and tests start workers, gateways and taps this way)."""
    cmd = [sys.executable, "-m", "ops.cli"]
    if log_level:
        cmd += ["--log-level", log_level]
    cmd += [command, "--redis-url", settings.url, "--prefix", settings.prefix]
    cmd += ["--partitions", str(settings.partitions)] + (["--cluster"] if settings.cluster else [])
    return cmd + list(extra)


def env_var(path: Sequence[str], action: argparse.Action) -> str:
    """The variable of a flag that `flag()` did not name: VLMQ_<SUBCOMMANDS>_<FLAG>, e.g.
    `vlmq bench scale --procs` reads VLMQ_BENCH_SCALE_PROCS."""
    name = max(action.option_strings, key=len).lstrip("-")
    return "VLMQ_" + re.sub(r"[^A-Z0-9]+", "_", "_".join([*path, name]).upper())


def flag_var(action: argparse.Action) -> Optional[str]:
    """The VLMQ_* variable a flag's help names, if any."""
    m = _VAR.search(action.help or "")
    return m.group(1) if m else None


def _env_error(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(2, f"{parser.prog}: error: {message}\n")  # the usage would not help here


def _truthy(parser: argparse.ArgumentParser, var: str, raw: str) -> bool:
    try:
        return tree.parse_bool(raw, var)
    except tree.SettingsError as exc:
        _env_error(parser, str(exc))
        raise  # not reached: _env_error exits


def _value(parser: argparse.ArgumentParser, action: argparse.Action, var: str, raw: str) -> Any:
    try:
        value = action.type(raw) if callable(action.type) else raw
    except (TypeError, ValueError) as exc:
        _env_error(parser, f"{var}={raw!r}: {exc}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        _env_error(parser, f"{var}={raw!r}: choose from {choices}")
    return value


def _env_default(parser: argparse.ArgumentParser, action: argparse.Action, var: str, raw: str) -> Any:
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false too
        return action.const if _truthy(parser, var, raw) else action.default
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return [_value(parser, action, var, item.strip()) for item in raw.split(",") if item.strip()]
    if isinstance(action, argparse._StoreAction):
        return _value(parser, action, var, raw)
    raise TypeError(f"{var}: no environment reading for {type(action).__name__}")


def add_env_vars(parser: argparse.ArgumentParser, path: Sequence[str] = ()) -> None:
    """Give every flag a VLMQ_* variable: flags declared through `broker.settings.flag()`
    (or whose help names a variable) keep theirs; every other flag reads `env_var()`,
    shown in its help. A variable set in the environment becomes the flag's default (an
    empty one leaves it); repeatable flags take comma-separated values, switches the
    boolean words of schemas/settings.py."""
    seen = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases share one parser
                    seen.add(id(sub))
                    add_env_vars(sub, (*path, name))
            continue
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        named = flag_var(action)
        if named:
            raw = os.environ.get(named)
            if raw and raw.strip() and action.choices is not None and isinstance(action.default, str):
                _value(parser, action, named, raw)  # flag() does not check choices
            continue
        var = env_var(path, action)
        raw = os.environ.get(var)
        if raw is not None and raw.strip():
            action.default = _env_default(parser, action, var, raw)
            action.required = False
        if action.help != argparse.SUPPRESS:
            text = action.help or ""
            note = _DEFAULT_NOTE.search(text)
            cut = note.start() if note else len(text)
            action.help = f"{text[:cut]} [{var}]{text[cut:]}".lstrip()


def flag_vars(parser: argparse.ArgumentParser) -> Iterator[str]:
    """The variable of every flag of the parser tree (after `add_env_vars`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from flag_vars(sub)
        else:
            var = flag_var(action)
            if var:
                yield var


def known_variables(parser: argparse.ArgumentParser) -> Set[str]:
    """Every VLMQ_* name vlmq reads: the flags', the settings classes', OTHER_VARIABLES."""
    from inference_worker.settings import OPTION_GROUPS
    from schemas.limits import Limits

    names = set(flag_vars(parser)) | set(OTHER_VARIABLES)
    return names | set(tree.env_names(BrokerSettings, Limits, *OPTION_GROUPS.values()))


def check_variables(parser: argparse.ArgumentParser, environ: Optional[dict] = None) -> None:
    """Refuse a VLMQ_* variable that vlmq does not read (a typo would leave a default in
    place without a word): SettingsError naming it and the closest known names."""
    tree.check_environ(known_variables(parser), environ, prefixes=OTHER_PREFIXES)


def add_command(sub: argparse._SubParsersAction, command: Command) -> argparse.ArgumentParser:
    """The parser of one declared command, and of its subcommands below it."""
    extra = {"formatter_class": command.formatter_class} if command.formatter_class else {}
    p = sub.add_parser(
        command.name, help=command.help, description=command.description, epilog=command.epilog, **extra
    )
    if command.add_args:
        command.add_args(p)
    if command.subcommands:
        steps = p.add_subparsers(dest=f"{command.name}_command", metavar=command.metavar)
        for step in command.subcommands:
            add_command(steps, step)
        # a group without its step has nothing to run: say what there is, as a usage error
        p.set_defaults(func=lambda args: p.print_help() or 2)
    else:
        p.set_defaults(func=command.run)
    p.set_defaults(**command.defaults)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq",
        description="vlmq: many environment processes sharing one GPU vision-language model over Redis streams.",
        epilog="Every flag has an environment variable (shown in [brackets]); `vlmq COMMAND --help` for details.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (%(default)s)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        add_command(sub, importlib.import_module(module).COMMAND)
    plug_metrics(sub)
    add_env_vars(parser)
    return parser


def _user_errors() -> tuple:
    """Failures that are the user's setup, not a bug: one line, no traceback."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from broker.embedded import EmbeddedRedisError

    return (RedisConnectionError, RedisTimeoutError, EmbeddedRedisError)


def _describe(exc: BaseException, args: argparse.Namespace) -> str:
    from broker.connection import safe_url
    from broker.embedded import EmbeddedRedisError

    if isinstance(exc, EmbeddedRedisError):
        return str(exc)
    url = getattr(args, "redis_url", None)
    where = f" at {safe_url(url)}" if url else ""
    return f"cannot reach Redis{where}: {exc}"


def main(argv: Optional[List[str]] = None) -> int:
    try:
        parser = build_parser()
    except ValueError as exc:  # a VLMQ_* variable of the wrong type (schemas/settings.py)
        print(f"vlmq: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_variables(parser)
    except ValueError as exc:
        print(f"vlmq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `vlmq inspect --json | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except _user_errors() as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"vlmq {args.command}: {_describe(exc, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
