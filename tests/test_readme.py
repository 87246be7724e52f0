"""README's two commands stay true: CI runs exactly the test command it shows."""

from __future__ import annotations

import os
import re

from tests.helpers import REPO


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _commands(section: str) -> list:
    text = _read("README.md").split(f"## {section}")[1]
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)[0].strip().splitlines()


def test_ci_runs_exactly_the_readme_test_command():
    (test_cmd,) = _commands("Run the tests")
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert test_cmd in ci_lines


def test_readme_demo_command_installs_and_runs_the_demo():
    (demo_cmd,) = _commands("Run the demo")
    assert "pip install" in demo_cmd and demo_cmd.endswith("vlmq demo")


def test_readme_commands_take_the_cpu_torch_wheel_from_the_public_cpu_index():
    """On the public index `torch==2.13.0` is the multi-GB CUDA build: both commands name
    PyTorch's CPU index for torch, before anything else could pull torch in."""
    for section in ("Run the demo", "Run the tests"):
        (cmd,) = _commands(section)
        steps = [s.strip() for s in cmd.split("&&")]
        (torch_step,) = [s for s in steps if re.search(r"pip install .*torch==", s)]
        assert "--index-url https://download.pytorch.org/whl/cpu" in torch_step, section
        assert steps.index(torch_step) < next(
            i for i, s in enumerate(steps) if re.search(r"pip install .*-e \S", s)
        )


def test_readme_agent_example_runs_against_a_worker(settings):
    from tests.helpers import WorkerThread, synthetic_settings

    (code,) = re.findall(r"## An agent in ten lines\n\n```python\n(.*?)```", _read("README.md"), re.S)
    assert len(code.strip().splitlines()) <= 10
    code = code.replace('url="redis://localhost:6379"', "settings=settings")
    with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
        namespace = {"settings": settings}
        exec(compile(code, "README.md", "exec"), namespace)
        namespace["client"].close()
