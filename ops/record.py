"""`vlmq record FILE`: every request answered while it runs, with its reply, into a recording
(format: ops/recording.py).

The recorder holds the workers' commit tap (ops/commit_tap.py): each worker copies what it
answers, in the commit that writes the reply, to a stream the recorder reads and trims. It
takes no work from the workers and misses nothing, at any rate. Stop it with Ctrl-C/SIGTERM,
--duration or --max-entries; it then reads the last copies, lets go of the tap and writes a
footer with its counts (and the copies it missed, if it fell more than VLMQ_TAP_MAXLEN
behind).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Callable, List, Optional

from broker import eventloop
from broker.commands import Command
from broker.connection import check_reachable, connect_async, safe_url
from broker.settings import BrokerSettings, add_broker_args, broker_settings_from_args
from ops.commit_tap import CommitTap, TapBusy
from ops.recording import RecordingWriter
from ops.tail import add_filter_args, filter_from_args
from ops.tap import TapEvent, TapFilter


async def record(
    settings: BrokerSettings,
    path: str,
    stop: asyncio.Event,
    only: TapFilter,
    max_entries: int = 0,
    on_start: Optional[Callable[[], None]] = None,
) -> RecordingWriter:
    """Record until `stop` is set (or max_entries were written); returns the closed writer.
    on_start is called once the tap is held: every request answered after it is recorded."""
    redis = connect_async(settings)
    tap = CommitTap(redis, settings, only)
    try:
        await tap.start()
    except BaseException:
        await redis.aclose()
        raise
    writer = RecordingWriter(path, settings.prefix, settings.partitions)

    def write(events: List[TapEvent]) -> None:
        for ev in events:
            writer.write(ev)
        writer.flush()
        if max_entries and writer.counts["request"] + writer.counts["reply"] >= max_entries:
            stop.set()

    started = time.time()
    try:
        print(
            f"recording {settings.prefix}:* on {safe_url(settings.url)} to {path} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        if on_start is not None:
            on_start()
        await tap.run(write, stop)
    finally:
        writer.missed = tap.missed
        writer.close()
        await redis.aclose()
    c = writer.counts
    print(
        f"recorded {c['request']} requests and {c['reply']} replies ({writer.size / 1e6:.1f} MB) "
        f"in {time.time() - started:.1f} s to {path}"
        + (f"; {writer.orphan_replies} replies to requests not seen" if writer.orphan_replies else "")
        + (f"; MISSED {tap.missed} (fell more than VLMQ_TAP_MAXLEN behind)" if tap.missed else ""),
        file=sys.stderr,
        flush=True,
    )
    return writer


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    await record(broker_settings_from_args(args), args.file, stop, filter_from_args(args), args.max_entries)


def run(args: argparse.Namespace) -> int:
    check_reachable(broker_settings_from_args(args))
    try:
        eventloop.run(_main(args))
    except TapBusy as exc:
        raise SystemExit(f"vlmq record: {exc}") from None
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="where to write the recording (.gz: compressed)")
    add_broker_args(p)
    add_filter_args(p)
    p.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0 = until Ctrl-C)"
    )
    p.add_argument(
        "--max-entries", type=int, default=0, help="stop after this many requests + replies (0 = no limit)"
    )


COMMAND = Command(
    "record",
    help="record every request answered, and its reply, into a file",
    description="Record every request answered while it runs, with its reply, into FILE (a "
    "sequence of msgpack maps, gzip-compressed if FILE ends in .gz): workers copy each one in "
    "the commit that writes its reply, so nothing is missed at any rate, and no work is taken "
    "from them. One recorder per prefix at a time. Replay it with `vlmq replay FILE`, print it "
    "with `vlmq tail --file FILE`.",
    add_args=add_args,
    run=run,
)
