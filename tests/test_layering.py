"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and an import that
breaks one fails the check, naming the contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from importlinter.api import read_configuration

from tests.helpers import REPO

PACKAGES = ("schemas", "broker", "inference_worker", "env_agents", "ops")
CONTRACTS = {
    c["id"]: c["name"] for c in read_configuration(os.path.join(REPO, "pyproject.toml"))["contracts_options"]
}


def lint(root: str) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under root: a process of its own, because the graph is
    built from the packages an import would find, and this one has the repository's loaded."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": root, "COLUMNS": "400"}  # one line per contract
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_packages_keep_their_contracts():
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in out.stdout


@pytest.mark.parametrize(
    "module, line, contract, why",
    [
        ("inference_worker/timing.py", "import ops.metrics", "packages", "inference_worker is not allowed to import ops"),
        ("env_agents/recording/actions.py", "import inference_worker.vla", "packages", "env_agents is not allowed to import inference_worker"),
        ("schemas/errors.py", "import broker.keys", "packages", "schemas is not allowed to import broker"),
        ("inference_worker/engines/sampling.py", "import inference_worker.handlers", "worker", "inference_worker.engines is not allowed to import inference_worker.handlers"),
        ("env_agents/client.py", "import torch", "light-client", "env_agents is not allowed to import torch"),
    ],
)  # fmt: skip
def test_an_import_against_the_layers_fails_the_check(tmp_path, module, line, contract, why):
    root = str(tmp_path)
    for name in PACKAGES:
        shutil.copytree(
            os.path.join(REPO, name), os.path.join(root, name), ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(os.path.join(REPO, "pyproject.toml"), root)
    assert lint(root).returncode == 0  # the copy alone passes

    with open(os.path.join(root, module), "a") as f:
        f.write(f"\n{line}  # noqa: E402, F401\n")
    out = lint(root)
    assert out.returncode != 0
    assert f"{CONTRACTS[contract]} BROKEN" in out.stdout
    assert why in out.stdout
    assert module[: -len(".py")].replace("/", ".") in out.stdout  # the offending module is named
