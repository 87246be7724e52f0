"""The CLI as documented: every flag has the VLMQ_* variable the README promises (shown in
--help, and setting it sets the flag's default), and every `vlmq ...` command in README.md
and docs/*.md names subcommands and flags that exist."""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
from typing import Dict, Iterator, List, Tuple

import pytest

from ops.cli import build_parser, flag_var
from tests.helpers import REPO

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
# Variables read when the command runs rather than as the flag's default.
READ_AT_RUN_TIME = {"VLMQ_GATEWAY_API_KEYS"}


def _flags(parser: argparse.ArgumentParser, path: Tuple[str, ...] = ("vlmq",)) -> Iterator[tuple]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, (*path, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield path, parser, action


def _converts(convert, raw: str) -> bool:
    try:
        convert(raw)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return False
    return True


def _effective(action: argparse.Action) -> object:
    """The default as parse_args hands it over (argparse converts string defaults)."""
    if isinstance(action.default, str) and callable(action.type):
        return action.type(action.default)
    return action.default


def _sample(action: argparse.Action) -> Tuple[str, object]:
    """A value for the variable and the default it must produce."""
    if isinstance(action, argparse._StoreConstAction):
        return "1", action.const
    if action.choices is not None:
        pick = next(c for c in action.choices if c not in (action.default, None, ""))
        return str(pick), pick
    convert = action.type if callable(action.type) else str
    raw = next(r for r in ("7", "0.25", "sample-value") if _converts(convert, r))
    if isinstance(action, argparse._AppendAction):
        return f"{raw},{raw}", [convert(raw), convert(raw)]
    return raw, convert(raw)


def test_every_flag_has_a_vlmq_variable_shown_in_help_that_sets_it(monkeypatch):
    flags = list(_flags(build_parser()))
    assert len(flags) > 200
    missing = [f"{' '.join(p)} {max(a.option_strings, key=len)}" for p, _, a in flags if not flag_var(a)]
    assert not missing, f"flags without a [VLMQ_*] variable in --help: {missing}"
    for path, parser, action in flags:  # the variable is printed by --help itself
        assert f"[{flag_var(action)}" in " ".join(parser.format_help().split()), (path, action.option_strings)

    expected: Dict[Tuple[tuple, str], object] = {}
    values: Dict[str, str] = {}
    for path, _, action in flags:
        var = flag_var(action)
        if var in READ_AT_RUN_TIME or var in values:
            continue  # a variable shared by several flags is sampled once, from its first flag
        values[var], expected[(path, action.dest)] = _sample(action)
    for var, raw in values.items():
        monkeypatch.setenv(var, raw)
    wrong = []
    for path, _, action in _flags(build_parser()):
        want = expected.get((path, action.dest))
        if (path, action.dest) in expected and _effective(action) != want:
            wrong.append(
                f"{' '.join(path)} {action.option_strings[-1]}: {flag_var(action)} -> {action.default!r}"
            )
    assert not wrong, f"the variable does not set the flag's default: {wrong}"


def test_bad_variable_values_are_one_line_errors(monkeypatch, capsys):
    from ops.cli import main

    for var, raw in [("VLMQ_TOP_ONCE", "maybe"), ("VLMQ_AGENTS_TASK", "bogus"), ("VLMQ_MAX_BATCH", "x")]:
        with monkeypatch.context() as m:
            m.setenv(var, raw)
            try:
                code = main(["inspect", "--help"])
            except SystemExit as exc:
                code = exc.code
            err = capsys.readouterr().err
            assert code == 2 and var in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- documented commands

_FENCE = re.compile(r"```([a-z]*)\n(.*?)```", re.S)
_INLINE = re.compile(r"`(vlmq [^`]+)`")
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|^<.*>$|^\.\.\.$|^…$")


def documented_commands(text: str) -> List[str]:
    """Every `vlmq ...` invocation in the shell blocks and inline code of a Markdown text."""
    out = []
    for lang, body in _FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            out += [p.strip() for p in re.split(r"&&|\|\||;|\s\|\s", line) if p.strip().startswith("vlmq ")]
    return out + _INLINE.findall(text.replace("\\|", "|"))


def _subcommands(parser: argparse.ArgumentParser):
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _option(parser: argparse.ArgumentParser, name: str):
    return next((a for a in parser._actions if name in a.option_strings), None)


def problems(command: str, root: argparse.ArgumentParser) -> List[str]:
    """What `command` names that the parser tree lacks. Placeholders (COMMAND, <x>, ...),
    [optional] brackets and a|b alternatives are understood; printed output is skipped."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        tokens = command.split()
    tokens = [t.strip("[]") for t in tokens[1:] if t.strip("[]")]
    parser, path, out, wants_value = root, ["vlmq"], [], False
    for t in tokens:
        if t.startswith("-") and len(t) > 1 and not re.match(r"^-\d", t):
            action = _option(parser, t.split("=", 1)[0])
            if action is None:
                out.append(f"`{' '.join(path)}` has no {t.split('=', 1)[0]}")
            wants_value = action is not None and action.nargs != 0 and "=" not in t
            continue
        subs = _subcommands(parser)
        if wants_value or subs is None:  # a flag's value or a positional argument
            wants_value = False
            continue
        if _PLACEHOLDER.match(t) or t.endswith(":"):  # `vlmq COMMAND`, or a printed message
            return out
        names = re.split(r"[|/]", t)
        missing = [n for n in names if n not in subs]
        if missing:
            return [*out, f"`{' '.join(path)}` has no subcommand {', '.join(missing)}"]
        if len(names) > 1:
            return out
        parser, path = subs[t], [*path, t]
    return out


def test_the_checker_finds_what_does_not_exist():
    root = build_parser()
    assert problems("vlmq worker --no-such-flag 3", root) == ["`vlmq worker` has no --no-such-flag"]
    assert problems("vlmq no-such-command --x", root)
    assert problems("vlmq bench no-such-bench", root)
    assert problems("vlmq vla record|convert|nope", root)
    assert not problems("vlmq --log-level DEBUG bench scale --procs 1,2,4 [--cluster-nodes 3]", root)
    assert not problems("vlmq record traffic.vlmqrec.gz --duration 60 --kinds a,b", root)
    assert not problems("vlmq agents -g 0.5 --rate-hz -1", root)
    text = "```bash\nvlmq a --b && vlmq c | head\n```\nthen `vlmq d --e` and `vlmq:req:x`"
    assert documented_commands(text) == ["vlmq a --b", "vlmq c", "vlmq d --e"]


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_exist(doc):
    with open(os.path.join(REPO, doc)) as f:
        commands = documented_commands(f.read())
    root = build_parser()
    found = [f"{c!r}: {p}" for c in commands for p in problems(c, root)]
    assert not found, f"{doc} documents what the CLI lacks: {found}"


def test_readme_install_commands_name_extras_that_exist():
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        section = f.read().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([a-z0-9_-]+) = \[", section, re.M))
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    named = {e for group in re.findall(r"\.\[([a-z0-9_,-]+)\]", readme) for e in group.split(",")}
    named |= set(re.findall(r"vlmq\[([a-z0-9_-]+)\]", readme))
    assert named and named <= extras, f"README names extras pyproject.toml lacks: {named - extras}"
