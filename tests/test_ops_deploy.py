"""What can be checked of the deployment files without a Docker engine: the compose file
parses and everything it references exists, the Prometheus config and alert rules parse
(promtool when installed), and every dashboard panel queries a metric the code exports."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from inference_worker.settings import WorkerSettings
from ops import dashboard
from ops.cli import build_parser
from ops.metrics import AgentMetrics, WorkerMetrics
from ops.metrics.scrape import fetch
from tests.helpers import REPO

OPS = os.path.join(REPO, "ops")
COMPOSE = os.path.join(OPS, "docker-compose.yml")
PROMETHEUS = os.path.join(OPS, "prometheus", "prometheus.yml")
RULES = os.path.join(OPS, "prometheus", "rules.yml")
DASHBOARD = os.path.join(OPS, "grafana", "dashboards", "vlmq.json")
METRIC = re.compile(r"\bvlmq_[a-z0-9_]+\b")


def _compose() -> dict:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_compose_services_build_files_mounts_commands_and_env():
    services = _compose()["services"]
    assert {"redis", "worker", "worker-cpu", "prometheus", "grafana", "agents"} <= set(services)
    assert services["agents"]["profiles"] == ["agents"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    (gpu,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]

    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = os.path.normpath(os.path.join(OPS, build["context"]))
            dockerfile = os.path.join(context, build["dockerfile"])
            assert os.path.isfile(dockerfile), f"{name}: {dockerfile}"
            with open(dockerfile) as f:
                text = f.read()
            if "target" in build:
                assert re.search(rf"^FROM \S+ AS {build['target']}$", text, re.M), (
                    f"{name}: no stage {build['target']}"
                )
            for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
                for src in line.split()[:-1]:
                    assert os.path.exists(os.path.join(context, src)), f"{name}: COPY {src} missing"
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith(".") and "${" not in volume:
                assert os.path.exists(os.path.join(OPS, src)), f"{name}: mount source {src} missing"
        command = svc.get("command")
        if isinstance(command, list) and command[0] == "vlmq":
            usage = _help(command[1])  # the subcommand exists
            for var in svc.get("environment", {}):
                if var.startswith("VLMQ_") and var not in ("VLMQ_REDIS_URL",):
                    assert f"[{var}]" in usage, f"{name}: `vlmq {command[1]}` reads no {var}"
    assert "[VLMQ_REDIS_URL]" in _help("worker")

    grafana = services["grafana"]["volumes"]
    with open(os.path.join(OPS, "grafana", "provisioning", "dashboards", "vlmq.yml")) as f:
        (provider,) = yaml.safe_load(f)["providers"]
    assert any(v.endswith(":" + provider["options"]["path"] + ":ro") for v in grafana)


def test_compose_validates_with_docker_compose():
    exe = shutil.which("docker-compose")
    cmd = [exe] if exe else None
    if cmd is None and shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        cmd = ["docker", "compose"] if probe.returncode == 0 else None
    if cmd is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    out = subprocess.run(
        [
            *cmd,
            "-f",
            COMPOSE,
            "--profile",
            "cpu",
            "--profile",
            "agents",
            "--profile",
            "setup",
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        cwd=OPS,
    )
    assert out.returncode == 0, out.stderr


def _exported_names(settings) -> set:
    """Every sample name the worker and agent /metrics endpoints can expose."""
    worker = WorkerMetrics(WorkerSettings(broker=settings)).serve(0, "127.0.0.1")
    agents = AgentMetrics().serve(0, "127.0.0.1")
    try:
        types = {**fetch(worker.server.url).types, **fetch(agents.server.url).types}
    finally:
        worker.close()
        agents.close()
    names = set()
    for family, kind in types.items():
        names |= {
            "counter": {family + "_total"},
            "histogram": {family + s for s in ("_bucket", "_sum", "_count")},
        }.get(kind, {family})
    return names


def _promtool():
    return shutil.which("promtool")


def test_dashboard_is_current_and_every_panel_queries_an_exported_metric(settings, tmp_path):
    with open(DASHBOARD) as f:
        text = f.read()
    assert text == dashboard.render(), (
        "regenerate: python -m ops.dashboard > ops/grafana/dashboards/vlmq.json"
    )
    board = json.loads(text)
    exported = _exported_names(settings)
    exprs = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used = set(METRIC.findall(t["expr"]))
            assert used, f"{panel['title']}: {t['expr']}"
            assert used <= exported, f"{panel['title']}: {sorted(used - exported)} are not exported"
            exprs.append(t["expr"])
    with open(RULES) as f:
        for group in yaml.safe_load(f)["groups"]:
            for rule in group["rules"]:
                missing = set(METRIC.findall(rule["expr"])) - exported
                assert not missing, f"{rule['alert']}: {sorted(missing)}"

    # The data source the dashboard expects is the one Grafana provisions.
    with open(os.path.join(OPS, "grafana", "provisioning", "datasources", "prometheus.yml")) as f:
        (source,) = yaml.safe_load(f)["datasources"]
    (ds_var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == source["uid"]

    if _promtool():  # PromQL syntax of every panel query, as recording rules
        rules = {
            "groups": [
                {
                    "name": "dashboard",
                    "rules": [
                        {
                            "record": f"dashboard:q{i}",
                            "expr": e.replace("$__rate_interval", "1m").replace("$kind", ".*"),
                        }
                        for i, e in enumerate(exprs)
                    ],
                }
            ]
        }
        path = tmp_path / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump(rules))
        out = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_config_and_rules_parse():
    if _promtool():
        out = subprocess.run([_promtool(), "check", "config", PROMETHEUS], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout and "rules found" in out.stdout
        return
    # Without promtool (Debian: apt-get install prometheus): the structure Prometheus requires.
    with open(PROMETHEUS) as f:
        config = yaml.safe_load(f)
    duration = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")
    assert duration.match(config["global"]["scrape_interval"])
    for rule_file in config["rule_files"]:
        assert os.path.isfile(os.path.join(os.path.dirname(PROMETHEUS), rule_file.split("#")[0].strip()))
    jobs = [c["job_name"] for c in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)) and {"vlmq-worker", "vlmq-agents"} <= set(jobs)
    for c in config["scrape_configs"]:
        assert set(c) & {"static_configs", "dns_sd_configs"}, c["job_name"]
    with open(RULES) as f:
        for group in yaml.safe_load(f)["groups"]:
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule) and rule["expr"]


def test_every_metric_is_documented():
    from ops.metrics import names

    with open(os.path.join(REPO, "docs", "OPS.md")) as f:
        doc = f.read()
    missing = [name for name in names.ALL if f"`{name}`" not in doc]
    assert not missing, f"docs/OPS.md lacks {missing}"


# ----------------------------------------------------------------------------- compose as documented

_DEFAULT = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def _defaults(value) -> str:
    """A compose value with every ${VAR:-default} replaced by its default (no .env, no shell)."""
    return _DEFAULT.sub(lambda m: m.group(2) or "", str(value))


def _env_of(svc: dict) -> dict:
    return {k: _defaults(v) for k, v in (svc.get("environment") or {}).items()}


def _parsed(svc: dict, monkeypatch):
    """The service's `vlmq` command parsed as its container would: its environment set."""
    with monkeypatch.context() as m:
        for k in [k for k in os.environ if k.startswith("VLMQ_")]:
            m.delenv(k)
        for k, v in _env_of(svc).items():
            m.setenv(k, v)
        return build_parser().parse_args(svc["command"][1:])


def _dockerfile_uid(svc: dict) -> str:
    build = svc["build"]
    with open(os.path.normpath(os.path.join(OPS, build["context"], build["dockerfile"]))) as f:
        text = f.read()
    stage = text.split(f" AS {build['target']}")[1] if "target" in build else text
    stage = stage.split("\nFROM ")[0]
    assert re.search(r"^USER vlmq$", stage, re.M), "the image runs as root"
    return re.search(r"useradd .*--uid (\d+) vlmq", stage).group(1)


def test_compose_defaults_parse_as_the_commands_their_containers_run(monkeypatch):
    """Every service that runs `vlmq ...`, with the compose defaults of its variables, is a
    command line the CLI accepts (subcommand, flags, choices, types)."""
    for name, svc in _compose()["services"].items():
        if svc.get("command", [None])[0] == "vlmq":
            try:
                _parsed(svc, monkeypatch)
            except SystemExit as exc:
                pytest.fail(f"{name}: `{' '.join(svc['command'])}` rejected its defaults ({exc})")


def test_compose_model_step_kinds_users_and_ports(monkeypatch, tiny_qwen2_vl):
    services = _compose()["services"]
    workers = {n: services[n] for n in ("worker", "worker-cpu")}

    # The model step writes the folder the workers serve, through the same host folder.
    make = services["make-model"]
    assert make["profiles"] == ["setup"] and make["command"][:2] == ["vlmq", "make-model"]
    made = _parsed(make, monkeypatch)
    (host_dir,) = [v.rsplit(":/models", 1)[0] for v in make["volumes"] if v.endswith(":/models")]
    for name, svc in workers.items():
        args = _parsed(svc, monkeypatch)
        assert args.model == made.out, f"{name} serves {args.model}, make-model writes {made.out}"
        assert f"{host_dir}:/models:ro" in svc["volumes"], name
    # ... which `vlmq make-model` run on the host from the repository root writes as well.
    from inference_worker.models.cli import default_out

    assert os.path.join(_defaults(host_dir), made.out.split("/models/")[1]) == os.path.join(
        "..", default_out(made.arch, made.preset)
    )

    # Users: the workers run as uid 10001; make-model as root or that uid, writing files
    # readable by others (transformers alone writes model.safetensors 0600).
    uids = {_dockerfile_uid(svc) for svc in workers.values()}
    assert uids == {"10001"}
    assert str(make.get("user", _dockerfile_uid(make))) in ("root", "0", "0:0", "10001")
    for f in os.listdir(tiny_qwen2_vl):
        mode = os.stat(os.path.join(tiny_qwen2_vl, f)).st_mode
        assert mode & 0o004, f"{f} is {oct(mode & 0o777)}: uid 10001 could not read it"

    # Agents ask only for kinds the compose workers serve.
    agents = _parsed(services["agents"], monkeypatch)
    for name, svc in workers.items():
        args = _parsed(svc, monkeypatch)
        kinds = args.kinds.split(",")
        assert agents.task in kinds, f"agents ask for {agents.task}; {name} serves {kinds}"
        if "action_chunk" in kinds:
            assert any(o.startswith("vla=") for o in args.option), f"{name}: action_chunk without a VLA"

    # Published ports: host address and port overridable, and documented.
    with open(os.path.join(REPO, "docs", "OPS.md")) as f:
        ops_doc = f.read()
    for name, svc in services.items():
        for port in svc.get("ports", []):
            variables = _DEFAULT.findall(port)
            assert len(variables) == 2, f"{name}: {port} needs an overridable address and port"
            for var, _ in variables:
                assert f"`{var}`" in ops_doc, f"docs/OPS.md does not mention {var} ({name})"


def _compose_commands(text: str) -> list:
    lines = re.findall(r"(?:^|#\s+|\$ )(docker compose [^\n#]*)", text, re.M)
    return [shlex.split(line) for line in lines]


def test_documented_docker_compose_commands_name_services_and_profiles_that_exist():
    services = _compose()["services"]
    profiles = {p for svc in services.values() for p in svc.get("profiles", [])}
    with open(COMPOSE) as f:
        commands = _compose_commands(f.read())
    for doc in ("README.md", os.path.join("docs", "OPS.md")):
        with open(os.path.join(REPO, doc)) as f:
            commands += _compose_commands(f.read())
    assert len(commands) >= 8
    for cmd in commands:
        args = cmd[2:]
        for i, a in enumerate(args):
            if a == "--profile":
                assert args[i + 1] in profiles, f"{' '.join(cmd)}: no profile {args[i + 1]}"
            if a == "--scale":
                assert args[i + 1].split("=")[0] in services, f"{' '.join(cmd)}: no service to scale"
        verb = next((a for a in args if a in ("up", "run", "exec", "build", "stop", "logs")), None)
        if verb is None:
            continue
        rest = args[args.index(verb) + 1 :]
        names, skip = [], False
        for a in rest:
            if skip:
                skip = False
            elif a in ("--scale", "-p", "--profile"):
                skip = True
            elif not a.startswith("-"):
                names.append(a)
        if verb in ("run", "exec"):
            names = names[:1]  # then the command the container runs
        missing = [n for n in names if n not in services]
        assert not missing, f"{' '.join(cmd)}: no service {missing}"
