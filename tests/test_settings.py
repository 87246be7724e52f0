"""One settings tree (schemas/settings.py): one boolean rule, VLMQ_* names generated from
field names, unknown keys refused with the known ones, and VLMQ_* typos refused at start."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest

from broker.settings import BrokerSettings, env
from inference_worker.engines.options import EngineOptions, SelfCheckOptions, VLLMOptions
from inference_worker.settings import OPTION_GROUPS, FaultOptions, VLAOptions, check_options, option_keys
from schemas import settings as tree
from schemas.limits import Limits
from tests.helpers import REPO


@dataclass(frozen=True)
class Sample:
    flag: bool = False
    count: int = 3
    ratio: float = 0.5
    name: str = "x"
    path: Optional[str] = None
    items: Tuple[str, ...] = ()
    mode: str = tree.setting("a", choices=("a", "b"))
    own: int = tree.setting(0, env="OWN_NAME")


# ----------------------------------------------------------------------------- the boolean rule


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "Yes", " on "])
def test_true_words(raw):
    assert tree.parse_bool(raw, "VLMQ_X") is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "OFF "])
def test_false_words(raw):
    assert tree.parse_bool(raw, "VLMQ_X") is False


@pytest.mark.parametrize("raw", ["maybe", "2", "y", "enabled", "-1"])
def test_any_other_word_is_refused_with_the_words_it_takes(raw):
    with pytest.raises(tree.SettingsError) as err:
        tree.parse_bool(raw, "VLMQ_X")
    assert str(err.value) == f"VLMQ_X={raw!r}: expected 1/0, true/false, yes/no or on/off"


def test_every_reader_of_a_boolean_uses_the_one_rule(monkeypatch):
    """Broker settings, limits' neighbours, engine and handler options, flag defaults."""
    cases = [
        (lambda: BrokerSettings.from_env().cluster, "VLMQ_CLUSTER"),
        (lambda: EngineOptions.parse({}).ignore_eos, "VLMQ_ENGINE_IGNORE_EOS"),
        (lambda: tree.load(VLAOptions).vla_cuda_graphs, "VLMQ_VLA_CUDA_GRAPHS"),
        (lambda: tree.load(SelfCheckOptions).self_check, "VLMQ_SELF_CHECK"),
        (lambda: tree.load(VLLMOptions).vllm_enforce_eager, "VLMQ_VLLM_ENFORCE_EAGER"),
        (lambda: env("STRICT", False), "VLMQ_STRICT"),
    ]
    for read, var in cases:
        for raw, want in [("on", True), ("no", False)]:
            monkeypatch.setenv(var, raw)
            assert read() is want, (var, raw)
        monkeypatch.setenv(var, "sure")
        with pytest.raises(ValueError, match=f"{var}='sure': expected 1/0"):
            read()
        monkeypatch.delenv(var)
    with pytest.raises(ValueError, match="option ignore_eos='sure'"):
        EngineOptions.parse({"ignore_eos": "sure"}, {})
    assert EngineOptions.parse({"ignore-eos": "yes"}, {}).ignore_eos is True


# ----------------------------------------------------------------------------- values


def test_values_are_typed_by_the_field():
    got = tree.load(
        Sample,
        {
            "VLMQ_FLAG": "yes",
            "VLMQ_COUNT": "7",
            "VLMQ_RATIO": "0.25",
            "VLMQ_NAME": "y",
            "VLMQ_PATH": "/p",
            "VLMQ_ITEMS": "a, b,,c",
            "VLMQ_MODE": "b",
            "VLMQ_OWN_NAME": "9",
        },
    )
    assert got == Sample(True, 7, 0.25, "y", "/p", ("a", "b", "c"), "b", 9)


def test_an_empty_value_leaves_the_default():
    assert tree.load(Sample, {f"VLMQ_{k.upper()}": " " for k in tree.keys(Sample)}) == Sample()
    assert tree.load(Sample, {}, pairs={"count": ""}) == Sample()


def test_pairs_win_over_variables_and_overrides_over_both():
    environ = {"VLMQ_COUNT": "1"}
    assert tree.load(Sample, environ).count == 1
    assert tree.load(Sample, environ, pairs={"count": "2"}).count == 2
    assert tree.load(Sample, environ, pairs={"count": "2"}, overrides={"count": 3}).count == 3
    assert tree.load(Sample, environ, overrides={"count": None}).count == 1


@pytest.mark.parametrize(
    "var, raw, message",
    [
        ("VLMQ_COUNT", "3.5", "VLMQ_COUNT='3.5': expected an integer"),
        ("VLMQ_RATIO", "half", "VLMQ_RATIO='half': expected a number"),
        ("VLMQ_MODE", "c", "VLMQ_MODE='c': choose a or b"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_takes(var, raw, message):
    with pytest.raises(tree.SettingsError) as err:
        tree.load(Sample, {var: raw})
    assert str(err.value) == message


def test_choices_of_the_real_settings(monkeypatch):
    monkeypatch.setenv("VLMQ_BACKLOG_POLICY", "sometimes")
    with pytest.raises(ValueError, match="VLMQ_BACKLOG_POLICY='sometimes': choose error or wait"):
        BrokerSettings.from_env()
    with pytest.raises(ValueError, match="option vla_cache='everything': choose features or frames"):
        tree.load(VLAOptions, {}, pairs={"vla_cache": "everything"})


# ----------------------------------------------------------------------------- generated names


def test_names_are_generated_from_field_names():
    assert tree.env_name(Sample, "count") == "VLMQ_COUNT"
    assert tree.env_name(Sample, "own") == "VLMQ_OWN_NAME"
    assert tree.env_name(EngineOptions, "kv_slots") == "VLMQ_ENGINE_KV_SLOTS"
    assert tree.env_name(VLAOptions, "vla") == "VLMQ_VLA"
    assert tree.env_name(FaultOptions, "fault_oom_over") == "VLMQ_FAULT_OOM_OVER"
    broker = tree.env_names(BrokerSettings)
    assert broker["VLMQ_REDIS_URL"] == "BrokerSettings.url"  # the flag's name, kept
    assert "VLMQ_URL" not in broker and "VLMQ_EXTRA" not in broker
    assert {"VLMQ_RETRY_BASE_S", "VLMQ_RETRY_CAP_S", "VLMQ_RETRY_ATTEMPTS"} <= set(broker)


@pytest.mark.parametrize("cls", [BrokerSettings, Limits, *OPTION_GROUPS.values()])
def test_every_generated_name_sets_its_field(cls, monkeypatch):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, tp = f.name, tree._unwrap(hints[f.name])
        if name not in tree.keys(cls) or f.metadata.get("vlmq_choices"):
            continue  # not a setting; or one of few values, covered above
        raw, want = {bool: ("1", True), int: ("7", 7), float: ("0.25", 0.25)}.get(tp, ("sample", "sample"))
        step = f.metadata.get("vlmq_multiple_of")
        if step:  # a value the field takes
            raw, want = str(7 * step), 7 * step
        var = tree.env_name(cls, name)
        with monkeypatch.context() as m:
            m.setenv(var, raw)
            got = BrokerSettings.from_env() if cls is BrokerSettings else tree.load(cls)
        assert getattr(got, name) == want, var


def test_existing_names_and_defaults_are_kept():
    """The names the README and docs list, with the defaults they list."""
    assert tree.load(BrokerSettings, {}) == BrokerSettings()
    assert BrokerSettings().url == "redis://127.0.0.1:6379/0" and BrokerSettings().max_backlog == 10_000
    assert Limits.from_env({}) == Limits()
    assert EngineOptions.parse({}, {}) == EngineOptions()
    named = set(tree.env_names(BrokerSettings, Limits, *OPTION_GROUPS.values()))
    for var in (
        "VLMQ_REDIS_URL",
        "VLMQ_CLUSTER",
        "VLMQ_PREFIX",
        "VLMQ_PARTITIONS",
        "VLMQ_MAX_BACKLOG",
        "VLMQ_BACKLOG_POLICY",
        "VLMQ_TENANT",
        "VLMQ_TLS_CA",
        "VLMQ_MAX_MESSAGE_BYTES",
        "VLMQ_MAX_NEW_TOKENS",
        "VLMQ_ENGINE_IGNORE_EOS",
        "VLMQ_VLA",
        "VLMQ_VLA_CACHE",
        "VLMQ_VLA_SESSIONS",
        "VLMQ_VLA_TTL_S",
        "VLMQ_VLA_STEPS",
        "VLMQ_VLA_CUDA_GRAPHS",
        "VLMQ_SELF_CHECK",
        "VLMQ_SELF_CHECK_TOL",
    ):
        assert var in named, var
    assert tree.load(VLAOptions, {}) == VLAOptions(None, "features", 1024, 600.0, 0, True)


# ----------------------------------------------------------------------------- unknown keys


def test_an_unknown_key_is_refused_with_the_known_ones():
    with pytest.raises(tree.SettingsError) as err:
        tree.load(Sample, {}, pairs={"cuont": "1"})
    assert str(err.value) == (
        "unknown --option key(s) cuont; known keys: count, flag, items, mode, name, own, path, ratio"
    )
    assert tree.load(Sample, {}, pairs={"cuont": "1"}, strict=False) == Sample()  # left to others


def test_worker_options_refuse_a_key_no_component_reads():
    known = option_keys()
    assert (
        known["decode"] == "engine"
        and known["vla"] == "VLA"
        and known["fault_kill_on"] == "synthetic backend"
    )
    check_options({"decode": "eager", "vla_sessions": "8", "fault_oom_over": "2", "self_check": "off"}, {})
    with pytest.raises(ValueError) as err:
        check_options({"not_a_key": "1", "decode": "eager"}, {})
    message = str(err.value)
    assert message.startswith("unknown --option key(s) not_a_key; known keys: ")
    assert set(message.split("known keys: ")[1].split(", ")) == set(known)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"decode": "fast"}, "option decode='fast': choose auto, eager, eager-bucketed or graphs"),
        ({"vla_sessions": "many"}, "option vla_sessions='many': expected an integer"),
        ({"self_check": "maybe"}, "option self_check='maybe': expected 1/0"),
        (
            {"vllm_gpu_memory_utilization": "most"},
            "option vllm_gpu_memory_utilization='most': expected a number",
        ),
        ({"prefill_width_step": "0"}, "option prefill_width_step='0': expected at least 1"),
        ({"decode_split": "-64"}, "option decode_split='-64': expected at least 0"),
        ({"decode_split": "100"}, "option decode_split='100': expected a multiple of 64"),
    ],
)
def test_worker_options_refuse_a_bad_value_before_anything_loads(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_options(options, {})


def test_the_worker_cli_refuses_a_bad_option_at_start():
    from inference_worker.cli import settings_from_args
    from ops.cli import build_parser

    parser = build_parser()
    for option, message in [
        ("not_a_key=1", "vlmq worker: unknown --option key(s) not_a_key; known keys: decode"),
        ("vla_ttl_s=soon", "vlmq worker: option vla_ttl_s='soon': expected a number"),
    ]:
        args = parser.parse_args(["worker", "--backend", "synthetic", "--option", option])
        with pytest.raises(SystemExit) as err:
            settings_from_args(args)
        assert str(err.value).startswith(message), err.value


def test_gil_switch_ms_sets_the_processs_switch_interval(monkeypatch):
    """--gil-switch-ms (and VLMQ_GIL_SWITCH_MS) reaches the settings and, at serve time,
    sys.setswitchinterval; 0 leaves Python's default; a negative value is a one-line error."""
    import sys

    from inference_worker.cli import set_gil_switch, settings_from_args
    from ops.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["worker", "--backend", "synthetic", "--gil-switch-ms", "0.5"])
    assert settings_from_args(args).gil_switch_ms == 0.5
    monkeypatch.setenv("VLMQ_GIL_SWITCH_MS", "2")
    assert (
        settings_from_args(build_parser().parse_args(["worker", "--backend", "synthetic"])).gil_switch_ms == 2
    )
    with pytest.raises(SystemExit, match="--gil-switch-ms must be 0"):
        settings_from_args(parser.parse_args(["worker", "--backend", "synthetic", "--gil-switch-ms", "-1"]))
    before = sys.getswitchinterval()
    try:
        set_gil_switch(0)
        assert sys.getswitchinterval() == before
        set_gil_switch(0.5)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


# ----------------------------------------------------------------------------- VLMQ_* typos


def test_a_typo_is_refused_with_the_closest_known_names():
    known = ["VLMQ_MAX_BACKLOG", "VLMQ_MAX_BATCH", "VLMQ_PREFIX"]
    tree.check_environ(
        known, {"VLMQ_PREFIX": "p", "PATH": "/bin", "VLMQ_ACL_PASSWORD_X": "s"}, ("VLMQ_ACL_PASSWORD_",)
    )
    with pytest.raises(tree.SettingsError) as err:
        tree.check_environ(known, {"VLMQ_MAX_BACKLGO": "5", "VLMQ_ZZZ": "1"})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown variables VLMQ_MAX_BACKLGO (did you mean VLMQ_MAX_BACKLOG")
    assert "; VLMQ_ZZZ:" in message  # nothing close: no suggestion


def test_every_vlmq_name_in_the_repository_is_known():
    """Nothing legitimate is refused: every VLMQ_* name the code, docs, compose file, scripts
    and tests mention is a flag's variable, a setting's, or one of OTHER_VARIABLES."""
    from ops.cli import OTHER_PREFIXES, build_parser, known_variables

    known = known_variables(build_parser())
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    this = os.path.relpath(__file__, REPO)  # its names are made up on purpose
    unknown = {}
    for path in files:
        if path == this or not os.path.isfile(os.path.join(REPO, path)):
            continue
        try:
            with open(os.path.join(REPO, path), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            continue
        for line in lines:
            if "did you mean" in line or "BACKLGO" in line:
                continue  # the typo the docs show
            for name in re.findall(r"VLMQ_[A-Z0-9_]*", line):
                if name.endswith("_") or name.startswith(OTHER_PREFIXES):
                    continue  # a family: VLMQ_ENGINE_<KEY>, VLMQ_<COMMAND>_<FLAG>, ...
                if name not in known:
                    unknown.setdefault(name, path)
    assert not unknown, f"VLMQ_* names vlmq would refuse as typos: {unknown}"


def _vlmq(*argv: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *argv],
        env={**clean, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["worker", "agents"])
def test_a_vlmq_typo_stops_worker_and_agents_at_start_in_one_line(command):
    # Port 1: nothing listens there; the refusal comes before any connection is tried.
    out = _vlmq(command, "--redis-url", "redis://127.0.0.1:1/0", env={"VLMQ_MAX_BACKLGO": "5"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(
        f"vlmq {command}: error: unknown variable VLMQ_MAX_BACKLGO (did you mean VLMQ_MAX_BACKLOG"
    )


def test_known_names_pass_the_check():
    from ops.cli import OTHER_VARIABLES, build_parser, check_variables

    parser = build_parser()
    environ = {name: "1" for name in OTHER_VARIABLES}
    environ.update(
        {"VLMQ_ACL_PASSWORD_AGENT_ACME": "s", "VLMQ_MAX_BATCH": "4", "VLMQ_ENGINE_DECODE": "eager"}
    )
    environ.update({"VLMQ_BENCH_SCALE_PROCS": "1,2", "VLMQ_VLA_SESSIONS": "8", "VLMQ_RETRY_CAP_S": "1"})
    check_variables(parser, environ)
