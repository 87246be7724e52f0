"""The agent side of `vlmq bench reliability` and of the fault tests: closed-loop sessions
that count what was sent and what came back, and print it as one JSON line.

    python -m ops.bench.reliability_agents --redis-url URL --prefix P --session-prefix a- \
        --sessions 8 --requests 100 [--out summary.json]

Each session is an AsyncAgentClient (send a frame, wait for its reply, send the next, like
an environment). What came back is counted twice, independently:
- by the application: replies in hand, their codes and latencies, requests that timed out
  (`timed_out`), a reply handed over twice (`duplicates_delivered`, which the client's
  de-duplication should keep at 0);
- from the reply stream itself, by a reader of its own that shares nothing with the client
  (`ReplyTally`): requests with no reply in the stream (`lost`), replies beyond the first to
  one request (`duplicates_in_streams`), replies whose body names another session
  (`misdelivered`), replies to requests this process never sent (`stale`). These do not
  depend on the client's bookkeeping, so a worker that answers twice, drops a reply or
  writes it to the wrong stream shows up here even if the client hid it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from broker import eventloop
from broker.responses import stream_entries, text
from broker.settings import BrokerSettings

POISON = "poison"  # the text that makes a worker started with --option fault_kill_on=poison die


def _request(kind: str, step: int, frame: np.ndarray, content: str):
    from schemas.messages import ActionChunkRequest, ChatMessage, TextActionRequest

    if kind == "action_chunk":
        return ActionChunkRequest(step=step, image=frame, instruction=content)
    return TextActionRequest(step=step, messages=[ChatMessage(role="user", content=content)])


class ReplyTally:
    """Reads one session's reply stream on its own (XREAD from where the client started) and
    counts the replies by request id."""

    def __init__(self, redis, session: str, stream: str) -> None:
        self.redis, self.session, self.stream = redis, session, stream
        self.position = "0-0"
        self.by_rid: Dict[str, int] = {}
        self.misdelivered = 0  # replies whose body names another session
        self._stop = False

    async def start(self) -> None:
        """Start after the newest reply already there (an earlier life's), as the client does."""
        newest = await self.redis.xrevrange(self.stream, count=1)
        if newest:
            self.position = text(newest[0][0])

    async def run(self) -> None:
        from schemas.messages import decode_reply

        while not self._stop:
            try:
                resp = await self.redis.xread({self.stream: self.position}, count=512, block=200)
            except Exception:  # Redis away (restart, killed connection): read on when it is back
                await asyncio.sleep(0.1)
                continue
            for _stream, entry_id, fields in stream_entries(resp):
                self.position = entry_id
                rid = text(fields.get(b"rid", b""))
                self.by_rid[rid] = self.by_rid.get(rid, 0) + 1
                try:
                    if decode_reply(fields.get(b"body") or b"").session_id != self.session:
                        self.misdelivered += 1
                except Exception:
                    self.misdelivered += 1

    async def finish(self, settle_s: float = 1.0) -> None:
        """Read up to the stream's newest entry (and a little longer, for late duplicates)."""
        give_up = time.monotonic() + settle_s + 10.0
        await asyncio.sleep(settle_s)
        while time.monotonic() < give_up:
            try:
                newest = await self.redis.xrevrange(self.stream, count=1)
            except Exception:
                await asyncio.sleep(0.1)
                continue
            if not newest or _id(text(newest[0][0])) <= _id(self.position):
                break
            await asyncio.sleep(0.02)
        self._stop = True


def _id(entry_id: str):
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _session(
    client,
    redis,
    kind: str,
    requests: int,
    frame: np.ndarray,
    timeout: float,
    out: Dict[str, Any],
    poison_at: Optional[int],
) -> None:
    tally = ReplyTally(redis, client.session_id, client.reply_stream)
    await tally.start()
    reader = asyncio.create_task(tally.run())
    sent: List[str] = []
    delivered: set = set()
    for step in range(requests):
        req = _request(kind, step, frame, POISON if step == poison_at else f"observation {step}")
        t0 = time.perf_counter()
        try:
            fut = await client.submit(req)
        except Exception as exc:  # refused at publish (backlog full, Redis gone for good): not accepted
            out["not_accepted"] += 1
            out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
            continue
        out["sent"] += 1
        sent.append(req.request_id)
        if step == poison_at:
            out["poison_ids"].append(req.request_id)
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            out["timed_out"] += 1
            continue
        out["latencies_ms"].append((time.perf_counter() - t0) * 1000.0)
        out["answered"] += 1
        if reply.request_id in delivered:
            out["duplicates_delivered"] += 1
        delivered.add(reply.request_id)
        if reply.delivery > 1:
            out["redelivered"] += 1
            out["redelivered_replied_at"][reply.request_id] = reply.replied_at
        code = "ok" if reply.ok else str(reply.error.code.value if reply.error else "error")
        out["codes"][code] = out["codes"].get(code, 0) + 1
        if not reply.ok:
            out["error_ids"][reply.request_id] = code
    await tally.finish()
    await reader
    mine = set(sent)
    out["lost"] += [rid for rid in sent if not tally.by_rid.get(rid)]
    out["duplicates_in_streams"] += sum(n - 1 for rid, n in tally.by_rid.items() if rid in mine and n > 1)
    out["misdelivered"] += tally.misdelivered
    out["stale"] += sum(n for rid, n in tally.by_rid.items() if rid not in mine)
    out["republished"] += client.republished


async def run_agents(
    settings: BrokerSettings,
    sessions: List[str],
    requests: int,
    kind: str = "action_chunk",
    image_side: int = 64,
    timeout: float = 120.0,
    poison_sessions: int = 0,
    poison_at: int = 0,
) -> Dict[str, Any]:
    """Closed-loop sessions sharing one connection pool; returns the counts the module
    docstring describes, every latency (ms), the ids of lost requests and, for requests
    answered after a redelivery, when the worker replied (takeover times)."""
    from broker.connection import connect_async
    from env_agents.client import AsyncAgentClient

    redis = connect_async(settings)
    frame = np.random.default_rng(0).integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
    out: Dict[str, Any] = {
        "sent": 0,
        "not_accepted": 0,
        "answered": 0,
        "timed_out": 0,
        "misdelivered": 0,
        "duplicates_delivered": 0,
        "duplicates_in_streams": 0,
        "stale": 0,
        "redelivered": 0,
        "republished": 0,
        "codes": {},
        "errors": {},
        "lost": [],
        "poison_ids": [],
        "latencies_ms": [],
        "redelivered_replied_at": {},
        "error_ids": {},
    }
    clients = [AsyncAgentClient(s, redis=redis, settings=settings, raise_on_error=False) for s in sessions]
    try:
        for c in clients:
            await c.start()
        out["started_at"] = time.time()
        await asyncio.gather(
            *(
                _session(
                    c, redis, kind, requests, frame, timeout, out, poison_at if i < poison_sessions else None
                )
                for i, c in enumerate(clients)
            )
        )
        out["finished_at"] = time.time()
    finally:
        for c in clients:
            await c.close()
        await redis.aclose()
    return out


def agent_main(argv: Optional[List[str]] = None) -> int:
    from broker.settings import add_broker_args, broker_settings_from_args

    p = argparse.ArgumentParser(
        prog="python -m ops.bench.reliability_agents",
        description="The agent side of `vlmq bench reliability`: closed-loop sessions that count "
        "what was sent, answered, lost and duplicated, and print it as one JSON line.",
    )
    add_broker_args(p)
    p.add_argument(
        "--session-prefix", default="agent-", help="sessions are PREFIX0, PREFIX1, ... (%(default)s)"
    )
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (%(default)s)")
    p.add_argument("--requests", type=int, default=100, help="requests per session (%(default)s)")
    p.add_argument(
        "--kind", default="action_chunk", choices=["action_chunk", "text_action"], help="(%(default)s)"
    )
    p.add_argument("--image-side", type=int, default=64, help="raw uint8 frame side (%(default)s)")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for each reply (%(default)s)"
    )
    p.add_argument(
        "--poison-sessions",
        type=int,
        default=0,
        help=f"the first N sessions send one {POISON!r} request each (%(default)s)",
    )
    p.add_argument("--poison-at", type=int, default=0, help="at this step (%(default)s)")
    p.add_argument("--out", default="", help="write the summary to this file instead of stdout")
    args = p.parse_args(argv)
    settings = broker_settings_from_args(args)
    sessions = [f"{args.session_prefix}{i}" for i in range(args.sessions)]
    out = eventloop.run(
        run_agents(
            settings,
            sessions,
            args.requests,
            args.kind,
            args.image_side,
            args.timeout,
            args.poison_sessions,
            args.poison_at,
        )
    )
    if args.out:  # a pipe can cut a large summary short (after uvloop ran): a file cannot
        with open(args.out, "w") as f:
            json.dump(out, f)
    else:
        print(json.dumps(out), flush=True)
    return 0


def agent_command(settings: BrokerSettings, session_prefix: str, sessions: int, requests: int, **kw: Any):
    """The argv of an agent process (for the benchmark and the fault tests)."""
    cmd = [
        sys.executable,
        "-m",
        "ops.bench.reliability_agents",
        "--redis-url",
        settings.url,
        "--prefix",
        settings.prefix,
        "--partitions",
        str(settings.partitions),
        "--session-prefix",
        session_prefix,
        "--sessions",
        str(sessions),
        "--requests",
        str(requests),
    ]
    for flag, value in (
        ("--tls-ca", settings.tls_ca),
        ("--tls-cert", settings.tls_cert),
        ("--tls-key", settings.tls_key),
    ):
        if value:
            cmd += [flag, value]
    if settings.cluster:
        cmd.append("--cluster")
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def merge(summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Add up agent summaries; the time span is from the first start to the last finish."""
    total: Dict[str, Any] = {"codes": {}, "errors": {}, "redelivered_replied_at": {}, "error_ids": {}}
    total["started_at"] = min(s["started_at"] for s in summaries)
    total["finished_at"] = max(s["finished_at"] for s in summaries)
    for s in summaries:
        for k, v in s.items():
            if k in ("started_at", "finished_at"):
                continue
            if isinstance(v, dict):
                for kk, vv in v.items():
                    keep = k in ("redelivered_replied_at", "error_ids")  # by request id
                    total[k][kk] = vv if keep else total[k].get(kk, 0) + vv
            elif isinstance(v, list):
                total[k] = total.get(k, []) + v
            else:
                total[k] = total.get(k, 0) + v
    return total


if __name__ == "__main__":
    sys.exit(agent_main())
