"""`vlmq replay FILE`: re-send recorded requests to a running worker and diff the replies.

Each recorded session is replayed as a new session (`rp<run>-<session>`), its requests in
recorded order and one at a time, so per-session state on the worker (the VLA feature
cache) evolves as it did; sessions run concurrently. created_at is now, and a deadline
keeps its original budget (deadline - created_at). Replies are compared by ops/diff.py.
Exit status: 0 no differences, 1 differences, 2 requests without a reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from broker import eventloop
from broker.commands import Command
from broker.connection import check_reachable, connect_async, connect_sync, safe_url
from broker.settings import BrokerSettings, add_broker_args, broker_settings_from_args
from env_agents.client import AsyncAgentClient
from ops import summary
from ops.diff import Difference, Tolerance, compare_replies, not_comparable
from ops.inspect import snapshot
from ops.recording import Entry, Recording, read_recording
from schemas.errors import ProtocolError
from schemas.limits import Limits
from schemas.messages import Reply, Request, decode_reply, decode_request

MATCH, DIFFER, SKIPPED, FAILED, UNMATCHED = "match", "differ", "skipped", "failed", "no_record"


@dataclass
class Case:
    entry: Entry
    request: Optional[Request] = None
    recorded: Optional[Reply] = None
    replayed: Optional[Reply] = None
    status: str = ""
    reason: str = ""
    diffs: List[Difference] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return {
            "rid": self.entry.rid,
            "session": self.entry.session,
            "kind": self.entry.kind,
            "step": self.request.step if self.request else None,
            "status": self.status,
            "reason": self.reason,
            "differences": [
                {
                    "path": d.path,
                    "recorded": summary.value(d.recorded),
                    "replayed": summary.value(d.replayed),
                    "detail": d.detail,
                }
                for d in self.diffs
            ],
        }


@dataclass
class ReplayOptions:
    concurrency: int = 16
    timeout: float = 60.0
    tolerance: Tolerance = field(default_factory=Tolerance)
    model: Optional[str] = None  # send to this model's streams instead of the recorded one
    limit: int = 0  # replay only the first N requests (0 = all)
    limits: Limits = field(default_factory=Limits)


def replay_session_id(run: str, session: str) -> str:
    sid = f"{run}-{session}"
    if len(sid) <= 128:
        return sid
    return f"{run}-{zlib.crc32(session.encode()):08x}-{session[-100:]}".replace("--", "-")[:128]


def prepare(rec: Recording, opts: ReplayOptions) -> List[Case]:
    replies = rec.replies_by_rid()
    cases: List[Case] = []
    for entry in sorted(rec.requests(), key=lambda e: e.id_key):
        case = Case(entry)
        got = replies.get(entry.rid)
        if got is not None:
            try:
                case.recorded = decode_reply(got.body, opts.limits)
            except ProtocolError as exc:
                case.status, case.reason = SKIPPED, f"recorded reply undecodable ({exc.code.value})"
        try:
            case.request = decode_request(entry.body, opts.limits)
        except ProtocolError as exc:
            case.status, case.reason = SKIPPED, f"recorded request undecodable ({exc.code.value})"
        cases.append(case)
    if opts.limit:
        cases = cases[: opts.limit]
    return cases


async def _replay_session(
    redis, settings: BrokerSettings, run: str, cases: List[Case], opts: ReplayOptions
) -> None:
    sid = replay_session_id(run, cases[0].entry.session)
    client = AsyncAgentClient(sid, redis=redis, settings=settings, limits=opts.limits, raise_on_error=False)
    stuck = False  # once a request of the session got no reply, the rest are not sent
    try:
        for case in cases:
            if case.status or case.request is None:
                continue
            if stuck:
                case.status, case.reason = FAILED, "not sent: an earlier request of its session got no reply"
                continue
            orig = case.request
            now = time.time()
            changes: Dict[str, Any] = {"session_id": sid, "request_id": orig.request_id, "created_at": now}
            if orig.deadline is not None:
                changes["deadline"] = now + (orig.deadline - orig.created_at)
            if opts.model is not None:
                changes["model"] = opts.model or None
            req = orig.model_copy(update=changes)
            try:
                case.replayed = await client.request(req, timeout=opts.timeout)
            except asyncio.TimeoutError:
                case.status, case.reason = FAILED, f"no reply within {opts.timeout:g} s"
                stuck = True
            except ProtocolError as exc:  # backlog full, undecodable reply
                case.status, case.reason = FAILED, f"{exc.code.value}: {exc.message}"
    finally:
        await client.close()


def judge(case: Case, tol: Tolerance) -> None:
    if case.status:
        return
    if case.recorded is None:
        case.status, case.reason = (
            UNMATCHED,
            "no recorded reply (the recording started or stopped mid-request)",
        )
        return
    why = not_comparable(case.request, case.recorded)
    if why:
        case.status, case.reason = SKIPPED, why
        return
    case.diffs = compare_replies(case.recorded, case.replayed, tol)
    case.status = DIFFER if case.diffs else MATCH


async def replay(settings: BrokerSettings, rec: Recording, opts: ReplayOptions) -> List[Case]:
    cases = prepare(rec, opts)
    by_session: Dict[str, List[Case]] = {}
    for c in cases:
        by_session.setdefault(c.entry.session, []).append(c)
    run = "rp" + uuid.uuid4().hex[:6]
    redis = connect_async(settings)
    gate = asyncio.Semaphore(max(1, opts.concurrency))

    async def one(session_cases: List[Case]) -> None:
        async with gate:
            await _replay_session(redis, settings, run, session_cases, opts)

    try:
        await asyncio.gather(*(one(cs) for cs in by_session.values()))
    finally:
        await redis.aclose()
    for c in cases:
        judge(c, opts.tolerance)
    return cases


# ----------------------------------------------------------------------------- report


def _latency_ms(replies: List[Reply]) -> str:
    vals = sorted((r.replied_at - r.created_at) * 1000 for r in replies if r.created_at and r.replied_at)
    if not vals:
        return "-"
    pick = lambda q: vals[min(len(vals) - 1, int(q * len(vals)))]  # noqa: E731
    return f"p50 {pick(0.5):.1f} ms  p95 {pick(0.95):.1f} ms"


def counts(cases: List[Case]) -> Dict[str, int]:
    out = {s: 0 for s in (MATCH, DIFFER, SKIPPED, FAILED, UNMATCHED)}
    for c in cases:
        out[c.status] = out.get(c.status, 0) + 1
    return out


def report(
    path: str, rec: Recording, cases: List[Case], settings: BrokerSettings, seconds: float, show: int
) -> str:
    h = rec.header
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started_at", 0)))
    sessions = len({c.entry.session for c in cases})
    lines = [
        f"replay of {path} (recorded {when} on {h.get('host', '?')}, prefix {h.get('prefix')})",
        f"{len(cases)} requests in {sessions} sessions, against {safe_url(settings.url)} prefix "
        f"{settings.prefix}, in {seconds:.1f} s",
        "",
    ]
    n = counts(cases)
    labels = {
        MATCH: "match",
        DIFFER: "differ",
        SKIPPED: "skipped",
        FAILED: "failed",
        UNMATCHED: "no record",
    }
    for status, label in labels.items():
        reasons: Dict[str, int] = {}
        for c in cases:
            if c.status == status and c.reason:
                reasons[c.reason] = reasons.get(c.reason, 0) + 1
        why = "; ".join(f"{r}: {k}" for r, k in reasons.items())
        lines.append(f"  {label:<10} {n[status]:>6}" + (f"   {why}" if why else ""))
    lines += [
        "",
        "latency, created -> replied:  recorded "
        + _latency_ms([c.recorded for c in cases if c.recorded])
        + "   replayed "
        + _latency_ms([c.replayed for c in cases if c.replayed]),
    ]
    differing = [c for c in cases if c.status == DIFFER]
    if differing:
        lines += ["", f"differences ({len(differing)} requests):"]
        for c in differing[:show]:
            step = c.request.step if c.request else "?"
            lines.append(f"  {c.entry.kind:<17} session {c.entry.session} step {step} rid {c.entry.rid}")
            lines += [f"      {d.render()}" for d in c.diffs[:8]]
            if len(c.diffs) > 8:
                lines.append(f"      ... and {len(c.diffs) - 8} more fields")
        if len(differing) > show:
            lines.append(f"  ... and {len(differing) - show} more requests (--show, --json)")
    else:
        compared = n[MATCH]
        lines += [
            "",
            f"no differences in {compared} compared replies" if compared else "nothing was compared",
        ]
    return "\n".join(lines)


def exit_status(cases: List[Case]) -> int:
    n = counts(cases)
    if n[FAILED]:
        return 2
    return 1 if n[DIFFER] else 0


def run(args: argparse.Namespace) -> int:
    settings = broker_settings_from_args(args)
    rec = read_recording(args.file)
    opts = ReplayOptions(
        concurrency=args.concurrency,
        timeout=args.timeout,
        tolerance=Tolerance(args.atol, args.rtol),
        model=args.model,
        limit=args.limit,
        limits=Limits.from_env(),
    )
    if not rec.requests():
        print(f"{args.file}: no requests recorded", file=sys.stderr)
        return 2
    check_reachable(settings)
    live = snapshot(connect_sync(settings), settings)["workers"]
    if not live:
        print(
            f"warning: no live worker on prefix {settings.prefix} at {safe_url(settings.url)}; "
            f"requests will wait up to --timeout {opts.timeout:g} s",
            file=sys.stderr,
        )
    result: List[List[Case]] = []
    started = time.time()

    async def main() -> None:
        result.append(await replay(settings, rec, opts))

    eventloop.run(main())
    cases = result[0]
    print(report(args.file, rec, cases, settings, time.time() - started, args.show))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"recording": args.file, "counts": counts(cases), "cases": [c.to_json() for c in cases]},
                f,
                indent=1,
            )
    return exit_status(cases)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a recording from `vlmq record`")
    add_broker_args(p)
    p.add_argument("--concurrency", type=int, default=16, help="sessions replayed at once (%(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply (%(default)s)")
    p.add_argument(
        "--atol", type=float, default=1e-4, help="absolute tolerance for floats and chunks (%(default)s)"
    )
    p.add_argument(
        "--rtol", type=float, default=1e-3, help="relative tolerance for floats and chunks (%(default)s)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="send every request to this model's streams ('' = the generic streams) instead of the recorded one",
    )
    p.add_argument("--limit", type=int, default=0, help="replay only the first N requests (0 = all)")
    p.add_argument("--show", type=int, default=20, help="requests with differences to print (%(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full report as JSON here")


COMMAND = Command(
    "replay",
    help="re-send recorded requests to a running worker and diff the replies",
    description="Replay a recording made by `vlmq record` against the workers of --redis-url/--prefix "
    "and compare each new reply with the recorded one: strings and ints exactly (greedy decoding is "
    "deterministic), floats and action chunks within --atol/--rtol. Sampled requests without a seed "
    "and outcomes that depended on timing (expired, superseded) are skipped. "
    "Exit status: 0 no differences, 1 differences, 2 requests without a reply.",
    add_args=add_args,
    run=run,
)
