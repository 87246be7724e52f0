"""A newcomer's mistakes get one line, not a traceback: Redis down, no redis-server,
`| head`; `make-model` works with no flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from broker.embedded import free_port
from tests.helpers import REPO


def vlmq(*args: str, env=None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kw,
    )


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["top", "--once"], ["tail"]])
def test_redis_unreachable_is_one_line_and_fast(command):
    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    t0 = time.monotonic()
    proc = vlmq(*command, "--redis-url", url)
    assert proc.returncode == 1 and time.monotonic() - t0 < 15
    err = _one_line(proc, f"vlmq {command[0]}: cannot reach Redis at redis://***@127.0.0.1")
    assert "secret" not in err


def test_worker_with_redis_unreachable_is_one_line(monkeypatch, capsys):
    """The worker retries for ~30 s (a Redis restart), then says so in one line."""
    from ops.cli import main

    monkeypatch.setenv("VLMQ_RETRY_ATTEMPTS", "0")
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["worker", "--backend", "synthetic", "--kinds", "text_action", "--redis-url", url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlmq worker: cannot reach Redis at {url}") and "\n" not in err


def test_demo_without_redis_server_is_one_line(tmp_path):
    (tmp_path / "python3").symlink_to(sys.executable)  # a PATH with Python and no redis-server
    env = {"PATH": str(tmp_path), "VLMQ_REDIS_SERVER": "", "PYTHONPATH": REPO}
    proc = vlmq("demo", "--backend", "synthetic", env=env)
    assert proc.returncode == 1
    _one_line(proc, "vlmq demo: no redis-server found", "--redis-url")


def test_inspect_into_a_closed_pipe_is_quiet(settings):
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "inspect", "--json", "--redis-url", settings.url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # buffered, as usual
    )
    proc.stdout.close()  # `| head` that has read enough before inspect writes
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Error" not in err and b"Traceback" not in err, err


def test_make_model_needs_no_flags(tmp_path, monkeypatch, capsys):
    from ops.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["make-model", "--preset", "tiny"]) == 0
    folder = tmp_path / "models" / "qwen2-vl-tiny"
    assert "to models/qwen2-vl-tiny" in capsys.readouterr().out
    assert json.loads((folder / "vlmq_model.json").read_text())["arch"] == "qwen2-vl"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(folder / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask
