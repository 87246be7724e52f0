"""Traces in SQLite: one row per episode, env step and request (with its reply).

    episodes  id, run, session, episode, seed, env_id, kind, task, started_at, stats (JSON)
    steps     episode_id, t, action (JSON), reward, terminated, truncated, success, progress
    requests  episode_id, t, request_id, kind, request (JSON, images as data URLs),
              frame (JPEG of the observation), reply (JSON), ok, rtt_ms, timings (JSON)

Many sessions of a process share one store (one connection: the event loop is one
thread); processes share the file through SQLite's WAL and a busy timeout.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Dict, Tuple

from env_agents.control.tracer import Tracer
from env_agents.envs.base import Observation, StepResult
from env_agents.traces.wire import jsonable, request_json
from schemas.images import encode_jpeg
from schemas.messages import Reply, Request

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT, session TEXT, episode INTEGER, seed INTEGER,
    env_id TEXT, kind TEXT, task TEXT, started_at REAL, stats TEXT);
CREATE TABLE IF NOT EXISTS steps (
    episode_id INTEGER, t INTEGER, action TEXT, reward REAL, terminated INTEGER, truncated INTEGER,
    success INTEGER, progress REAL);
CREATE TABLE IF NOT EXISTS requests (
    episode_id INTEGER, t INTEGER, request_id TEXT, kind TEXT, request TEXT, frame BLOB,
    reply TEXT, ok INTEGER, rtt_ms REAL, timings TEXT);
CREATE INDEX IF NOT EXISTS steps_ep ON steps (episode_id, t);
CREATE INDEX IF NOT EXISTS requests_ep ON requests (episode_id, t);
"""


def connect(path: str, timeout: float = 30.0) -> sqlite3.Connection:
    """Open (and create) a trace file. Several processes may do this at once: switching to
    WAL and creating the tables can fail with "database is locked" without waiting for the
    busy timeout, so those are retried."""
    give_up = time.time() + timeout
    while True:
        db = sqlite3.connect(path, timeout=timeout)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or time.time() > give_up:
                raise
            time.sleep(0.05)


class TraceStore(Tracer):
    def __init__(self, path: str, run: str = "", jpeg_quality: int = 90, commit_every_s: float = 0.5) -> None:
        self.db = connect(path)
        self.run = run
        self.quality = jpeg_quality
        # An open write transaction locks out every other process's writes: commit often.
        self.commit_every_s = commit_every_s
        self._last_commit = time.monotonic()
        self._episode: Dict[str, int] = {}  # session -> episode row id
        self._rows: Dict[Tuple[str, str], Tuple[int, int, Any]] = {}  # (session, request_id) -> frame

    def _write(self, sql: str, args: tuple) -> int:
        cur = self.db.execute(sql, args)
        if time.monotonic() - self._last_commit >= self.commit_every_s:
            self._commit()
        return int(cur.lastrowid or 0)

    def _commit(self) -> None:
        self.db.commit()
        self._last_commit = time.monotonic()

    def episode_start(self, session: str, episode: int, seed: int, obs: Observation) -> None:
        self._episode[session] = self._write(
            "INSERT INTO episodes (run, session, episode, seed, env_id, kind, task, started_at) "
            "VALUES (?, ?, ?, ?, '', '', ?, ?)",
            (self.run, session, episode, seed, obs.text[:2000], time.time()),
        )

    def request(self, session: str, t: int, obs: Observation, req: Request) -> None:
        self._rows[(session, req.request_id)] = (self._episode.get(session, 0), t, obs.frame)

    def reply(self, session: str, t: int, req: Request, reply: Reply, rtt_ms: float) -> None:
        ep, t0, frame = self._rows.pop((session, req.request_id), (self._episode.get(session, 0), t, None))
        # Chat requests carry their frames inside the messages already (as data URLs).
        blob = (
            encode_jpeg(frame, self.quality)
            if frame is not None and not getattr(req, "messages", None)
            else None
        )
        body = reply.result if reply.ok else reply.error
        self._write(
            "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ep,
                t0,
                req.request_id,
                req.kind,
                json.dumps(request_json(req)),
                blob,
                json.dumps(jsonable(body)),
                int(reply.ok),
                rtt_ms,
                json.dumps(reply.timings),
            ),
        )

    def failed(self, session: str, t: int, req: Request, code: str) -> None:
        """A request without a usable reply: its row says why (ok = 0, reply {"code": ...})."""
        ep, t0, _frame = self._rows.pop((session, req.request_id), (self._episode.get(session, 0), t, None))
        self._write(
            "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ep, t0, req.request_id, req.kind, json.dumps(request_json(req)), None,
             json.dumps({"code": code}), 0, None, "{}"),
        )  # fmt: skip

    def step(self, session: str, t: int, item: Any, env_action: Any, result: StepResult) -> None:
        self._write(
            "INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self._episode.get(session, 0),
                t,
                json.dumps(jsonable(env_action)),
                result.reward,
                int(result.terminated),
                int(result.truncated),
                int(result.success),
                result.obs.progress,
            ),
        )

    def episode_end(self, stats: Any) -> None:
        ep = self._episode.pop(stats.session, None)
        if ep is not None:
            self.db.execute(
                "UPDATE episodes SET env_id = ?, kind = ?, stats = ? WHERE id = ?",
                (stats.env_id, stats.kind, json.dumps(stats.to_dict()), ep),
            )
        self._commit()

    def close(self) -> None:
        self._commit()
        self.db.close()
