"""Settings read from `VLMQ_*` variables, flags and `--option KEY=VALUE` pairs, by one set of rules.

A settings class is a frozen dataclass whose fields are its keys. Each field reads the
variable `VLMQ_<ENV_PREFIX><FIELD>` (upper case; `ENV_PREFIX` a class attribute, "" unless
set), so a name is generated once, from the field; `setting(env=...)` names a field's own
variable, `setting(env=None)` (or `field(metadata=NOT_SETTABLE)`) makes it no setting.
Values are converted by the field's type:

- bool: 1/true/yes/on or 0/false/no/off (any case); anything else is refused;
- int, float: Python's literals; str: as given; Optional[X]: X;
- tuples and lists: comma-separated items;
- an empty value is the same as no value: the default stands;
- a field with `choices` refuses any other value; one with `minimum` smaller values, one
  with `multiple_of` values that are not multiples of it.

A key a class does not have is refused with the list of those it has. Every error is a
`SettingsError` (a ValueError) whose message names the variable or key and the value.
Python 3.9 compatible: the env side imports this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

T = TypeVar("T")

PREFIX = "VLMQ_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BOOL_WORDS = "1/0, true/false, yes/no or on/off"

_AUTO = object()  # the variable's name comes from the field's
# `dataclasses.field(metadata=NOT_SETTABLE)`: a field that is neither a key nor read from a variable
NOT_SETTABLE: Mapping[str, Any] = {"vlmq_env": None}


class SettingsError(ValueError):
    """A value, key or variable that the settings refuse; the message says which and why."""


def parse_bool(raw: str, where: str) -> bool:
    """The one boolean rule of vlmq: `where` names the source in the error (a variable, a key)."""
    word = str(raw).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{where}={raw!r}: expected {BOOL_WORDS}")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    env: Any = _AUTO,
    choices: Optional[Sequence[Any]] = None,
    minimum: Any = None,
    multiple_of: Optional[int] = None,
    default_factory: Any = dataclasses.MISSING,
    **kwargs: Any,
) -> Any:
    """A dataclass field with a variable of its own name (`env="REDIS_URL"` reads
    VLMQ_REDIS_URL), none (`env=None`: not a key either), or the generated one (the default);
    and, with `choices`, the only values it takes; with `minimum` and `multiple_of`, the
    bounds of a number."""
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata["vlmq_env"] = env
    if choices is not None:
        metadata["vlmq_choices"] = tuple(choices)
    if minimum is not None:
        metadata["vlmq_minimum"] = minimum
    if multiple_of is not None:
        metadata["vlmq_multiple_of"] = multiple_of
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata, **kwargs)


def _settable(cls: type) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("vlmq_env", _AUTO) is not None]


def keys(cls: type) -> Tuple[str, ...]:
    """The keys of a settings class (its settable fields)."""
    return tuple(f.name for f in _settable(cls))


def env_name(cls: type, name: str) -> str:
    """The variable a field reads: VLMQ_<ENV_PREFIX><FIELD>, or the one it names."""
    f = next(f for f in _settable(cls) if f.name == name)
    own = f.metadata.get("vlmq_env", _AUTO)
    if own is not _AUTO:
        return PREFIX + own
    return PREFIX + getattr(cls, "ENV_PREFIX", "") + name.upper()


def env_names(*classes: type) -> Dict[str, str]:
    """Every variable the classes read, each to the `Class.field` it sets."""
    return {env_name(c, f.name): f"{c.__name__}.{f.name}" for c in classes for f in _settable(c)}


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def convert(raw: str, tp: Any, where: str) -> Any:
    """`raw` as a value of type `tp` (see the module's rules); `where` names it in errors."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else str
        items = [convert(x.strip(), item, where) for x in str(raw).split(",") if x.strip()]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        return parse_bool(raw, where)
    if tp in (int, float):
        try:
            return tp(str(raw).strip())
        except ValueError:
            kind = "an integer" if tp is int else "a number"
            raise SettingsError(f"{where}={raw!r}: expected {kind}") from None
    if tp in (str, Any):
        return str(raw)
    raise TypeError(f"{where}: no conversion to {tp!r}")


def convert_like(raw: str, default: Any, where: str) -> Any:
    """`raw` typed like `default` (for a flag's default read from its variable)."""
    if isinstance(default, (list, tuple)):
        return [x.strip() for x in str(raw).split(",") if x.strip()]
    for tp in (bool, int, float):  # bool first: a bool is an int
        if isinstance(default, tp):
            return convert(raw, tp, where)
    return str(raw)


def _check_value(f: dataclasses.Field, value: Any, where: str, raw: Any) -> None:
    """The field's `choices`, `minimum` and `multiple_of`, if it has them."""
    choices = f.metadata.get("vlmq_choices")
    if choices is not None and value not in choices:
        names = [str(c) for c in choices]
        listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
        raise SettingsError(f"{where}={raw!r}: choose {listed}")
    minimum = f.metadata.get("vlmq_minimum")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{where}={raw!r}: expected at least {minimum}")
    step = f.metadata.get("vlmq_multiple_of")
    if step is not None and value % step:
        raise SettingsError(f"{where}={raw!r}: expected a multiple of {step}")


def check_keys(given: Iterable[str], known: Iterable[str], what: str = "--option key") -> None:
    """Refuse keys (`-` read as `_`) that are not among `known`, listing the known ones."""
    known = set(known)
    unknown = sorted(k for k in given if k.replace("-", "_") not in known)
    if unknown:
        raise SettingsError(f"unknown {what}(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")


def load(
    cls: Type[T],
    environ: Optional[Mapping[str, str]] = None,
    pairs: Optional[Mapping[str, Any]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    *,
    strict: bool = True,
) -> T:
    """An instance of `cls`: each field from its variable, then from `pairs` (strings, as
    --option gives them; keys with `-` read as `_`), then from `overrides` (typed values;
    None leaves the field as it was). Unknown keys of `pairs` are refused when `strict`,
    else left to whoever else reads them."""
    env = os.environ if environ is None else environ
    fields = {f.name: f for f in _settable(cls)}
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}

    def take(f: dataclasses.Field, raw: Any, where: str) -> None:
        if isinstance(raw, str):
            if not raw.strip():
                return  # empty: the default (or the source below) stands
            value = convert(raw, hints[f.name], where)
        else:
            value = raw
        _check_value(f, value, where, raw)
        values[f.name] = value

    for name, f in fields.items():
        var = env_name(cls, name)
        raw = env.get(var)
        if raw is not None:
            take(f, raw, var)
    if pairs:
        if strict:
            check_keys(pairs, fields)
        for key, raw in pairs.items():
            name = key.replace("-", "_")
            if name in fields:
                take(fields[name], raw, f"option {name}")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in fields:
            raise TypeError(f"{cls.__name__} has no setting {name!r}")
        _check_value(fields[name], value, name, value)
        values[name] = value
    return cls(**values)


def check_environ(
    known: Iterable[str],
    environ: Optional[Mapping[str, str]] = None,
    prefixes: Sequence[str] = (),
) -> None:
    """Refuse VLMQ_* variables that are neither in `known` nor start with one of `prefixes`
    (families such as VLMQ_ACL_PASSWORD_<USER>): one message, each name with the closest
    known names, so a typo is caught before it silently leaves a default in place."""
    env = os.environ if environ is None else environ
    known = set(known)
    unknown = sorted(
        name
        for name in env
        if name.startswith(PREFIX) and name not in known and not name.startswith(tuple(prefixes))
    )
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
        parts.append(f"{name} (did you mean {' or '.join(close)}?)" if close else name)
    noun = "variable" if len(unknown) == 1 else "variables"
    raise SettingsError(
        f"unknown {noun} {'; '.join(parts)}: `vlmq COMMAND --help` lists each flag's variable"
    )
