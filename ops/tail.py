"""`vlmq tail`: print request and reply traffic live (or from a recording), frames summarised.

12:00:01.234 > text_action       robot-7 #12 ab12cd34  2 msgs, 1 image: 'go to the door'  greedy
12:00:01.256 < text_action       robot-7 #12 ab12cd34  ok 21.8ms batch=4  'north' choice='north'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any, Dict, List, TextIO

from broker import eventloop
from broker.commands import Command
from broker.connection import check_reachable, connect_async, safe_url
from broker.settings import add_broker_args, broker_settings_from_args
from ops import summary
from ops.tap import StreamTap, TapEvent, TapFilter
from schemas.errors import ProtocolError
from schemas.limits import Limits
from schemas.messages import decode_reply, decode_request


def describe(
    type_: str, kind: str, session: str, rid: str, body: bytes, seen_at: float, limits: Limits
) -> Dict[str, Any]:
    """A printable view of one message: the fields worth a glance, and a one-line summary."""
    out: Dict[str, Any] = {"type": type_, "seen_at": seen_at, "kind": kind, "session": session, "rid": rid}
    try:
        if type_ == "request":
            req = decode_request(body, limits)
            out.update(step=req.step, summary=summary.request(req), created_at=req.created_at)
        else:
            rep = decode_reply(body, limits)
            out.update(step=rep.step, ok=rep.ok, summary=summary.reply(rep), batch_size=rep.batch_size)
            out["kind"] = rep.kind
            if not rep.ok and rep.error is not None:
                out["code"] = getattr(rep.error.code, "value", rep.error.code)
            if rep.created_at and rep.replied_at:
                out["latency_ms"] = round((rep.replied_at - rep.created_at) * 1000, 3)
            out["timings"] = rep.timings
    except ProtocolError as exc:  # tail shows bad messages too: that is often why one tails
        out.update(step=None, summary=f"UNDECODABLE {exc.code.value}: {summary.clip(exc.message, 80)}")
    return out


def line(d: Dict[str, Any]) -> str:
    clock = (
        time.strftime("%H:%M:%S", time.localtime(d["seen_at"])) + f".{int(d['seen_at'] * 1000) % 1000:03d}"
    )
    arrow = ">" if d["type"] == "request" else "<"
    step = f"#{d['step']}" if d.get("step") is not None else "#?"
    return f"{clock} {arrow} {d['kind']:<17} {d['session']} {step} {d['rid'][:8]}  {d['summary']}"


class Printer:
    def __init__(self, out: TextIO, as_json: bool, limits: Limits) -> None:
        self.out = out
        self.as_json = as_json
        self.limits = limits
        self.count = 0

    def __call__(self, events: List[TapEvent]) -> None:
        for ev in sorted(events, key=lambda e: (e.type != "request", e.entry_id)):
            self.show(describe(ev.type, ev.kind, ev.session, ev.request_id, ev.body, ev.seen_at, self.limits))

    def show(self, d: Dict[str, Any]) -> None:
        self.out.write((json.dumps(d, default=str) if self.as_json else line(d)) + "\n")
        self.out.flush()
        self.count += 1


async def tail_live(args: argparse.Namespace, printer: Printer) -> None:
    settings = broker_settings_from_args(args)
    redis = connect_async(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    tap = StreamTap(redis, settings, filter_from_args(args))
    await tap.start()
    print(
        f"tailing {settings.prefix}:* on {safe_url(settings.url)} (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        await tap.run(printer, stop)
    finally:
        await redis.aclose()


def tail_file(args: argparse.Namespace, printer: Printer) -> None:
    from ops.recording import read_recording

    only = filter_from_args(args)
    for e in read_recording(args.file).entries:
        if only.type_ok(e.type) and only.session_ok(e.session):
            d = describe(e.type, e.kind, e.session, e.rid, e.body, e.seen_at, printer.limits)
            if only.kind_ok(d["kind"]):
                printer.show(d)


def filter_from_args(args: argparse.Namespace) -> TapFilter:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    return TapFilter(not args.replies_only, not args.requests_only, kinds, args.sessions)


def add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", default="", help="comma-separated task kinds to include (all)")
    p.add_argument(
        "--sessions", default=None, metavar="GLOB", help="only sessions matching this glob, e.g. 'robot-*'"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--requests-only", action="store_true", help="requests, not replies")
    g.add_argument("--replies-only", action="store_true", help="replies, not requests")


def run(args: argparse.Namespace) -> int:
    printer = Printer(sys.stdout, args.json, Limits.from_env())
    if args.file:
        tail_file(args, printer)
        return 0
    check_reachable(broker_settings_from_args(args))
    eventloop.run(tail_live(args, printer))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    add_filter_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument(
        "--file", default=None, metavar="RECORDING", help="print this recording instead of live traffic"
    )
    p.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0 = until Ctrl-C)"
    )


COMMAND = Command(
    "tail",
    help="print request and reply traffic live, frames summarised",
    description="Follow every request and reply stream of the prefix without consuming anything "
    "(XREAD, no consumer group): one line per message, frames and chunks summarised, bad messages "
    "shown as UNDECODABLE. With --file, print a recording made by `vlmq record` instead.",
    add_args=add_args,
    run=run,
)
