"""`vlmq inspect`: stream lengths, pending entries, consumers, workers and dead letters."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

from broker.commands import Command
from broker.connection import check_reachable, connect_sync
from broker.keys import Keys
from broker.meta import read_meta
from broker.settings import BrokerSettings, add_broker_args, broker_settings_from_args


def _s(x: Any) -> Any:
    return x.decode(errors="replace") if isinstance(x, bytes) else x


def _scan(r, pattern: str) -> List[str]:
    if hasattr(r, "get_nodes"):  # cluster: scan every primary
        keys = set()
        for node in r.get_primaries():
            keys.update(_s(k) for k in r.scan_iter(match=pattern, count=1000, target_nodes=node))
        return sorted(keys)
    return sorted(_s(k) for k in r.scan_iter(match=pattern, count=1000))


def snapshot(r, settings: BrokerSettings, dead_letters: int = 0) -> Dict[str, Any]:
    """Everything `inspect` shows, as plain data (also used by `vlmq top`)."""
    keys = Keys(settings.prefix, settings.partitions)
    streams = []
    for key in _scan(r, f"{settings.prefix}:req:*"):
        try:
            kind, model, partition, tenant = keys.parse_request_stream(key)
        except ValueError:
            continue
        row: Dict[str, Any] = {
            "stream": key,
            "kind": kind,
            "model": model,
            "partition": partition,
            "tenant": tenant,
            "length": r.xlen(key),
        }
        if hasattr(r, "get_node_from_key"):  # cluster: where this partition lives
            row["node"] = r.get_node_from_key(key).name
        row["pending"] = row["lag"] = 0
        row["consumers"] = []
        for g in r.xinfo_groups(key):
            g = {_s(k): _s(v) for k, v in g.items()}
            if g.get("name") != settings.group:
                continue
            row["pending"] = int(g.get("pending") or 0)
            row["lag"] = g.get("lag")
            for c in r.xinfo_consumers(key, settings.group):
                c = {_s(k): _s(v) for k, v in c.items()}
                row["consumers"].append(
                    {"name": c["name"], "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
                )
        streams.append(row)
    dlq = []
    for key in _scan(r, f"{settings.prefix}:dlq:*"):
        entry: Dict[str, Any] = {"stream": key, "length": r.xlen(key), "recent": []}
        if dead_letters:
            for entry_id, fields in r.xrevrange(key, count=dead_letters):
                f = {_s(k): _s(v) for k, v in fields.items() if k != b"body"}
                entry["recent"].append({"id": _s(entry_id), **f})
        dlq.append(entry)
    workers = []
    now = time.time()
    for key in _scan(r, keys.workers_pattern()):
        info = {_s(k): _s(v) for k, v in r.hgetall(key).items()}
        if info:
            info["age_s"] = round(now - float(info.get("seen_at", now)), 1)
            # health: seconds since its last commit while it held requests (0 when idle)
            info["stalled_s"] = round(float(info.get("stalled_s") or 0.0), 1)
            workers.append(info)
    replies = len(_scan(r, f"{settings.prefix}:reply:*"))
    return {
        "meta": read_meta(r, settings),
        "streams": streams,
        "dead_letters": dlq,
        "workers": workers,
        "reply_streams": replies,
    }


def render(snap: Dict[str, Any]) -> str:
    meta = snap.get("meta") or {}
    lines = [f"partitions: {meta.get('partitions', '(not recorded yet)')}", "request streams:"]
    if not snap["streams"]:
        lines.append("  (none)")
    for s in snap["streams"]:
        node = f" node={s['node']}" if "node" in s else ""
        lines.append(
            f"  {s['stream']:<44} length={s['length']:<6} pending={s['pending']:<5} lag={s['lag']}{node}"
        )
        for c in s["consumers"]:
            lines.append(f"      consumer {c['name']:<30} pending={c['pending']:<5} idle={c['idle_ms']} ms")
    lines.append("workers:")
    if not snap["workers"]:
        lines.append("  (none alive)")
    for w in snap["workers"]:
        lines.append(
            f"  {w.get('name'):<32} kinds={w.get('kinds')} backend={w.get('backend')} "
            + (f"engine={w['engine_path']!r} " if w.get("engine_path") else "")
            + f"requests={w.get('requests')} batches={w.get('batches')} errors={w.get('errors')} "
            f"queued={w.get('queued')} in_flight={w.get('in_flight')} stalled={w['stalled_s']} s "
            f"redis_errors={w.get('redis_errors', 0)} seen {w['age_s']} s ago"
        )
    lines.append("dead letters:")
    if not snap["dead_letters"]:
        lines.append("  (none)")
    for d in snap["dead_letters"]:
        lines.append(f"  {d['stream']:<44} length={d['length']}")
        for e in d["recent"]:
            lines.append(
                f"      {e['id']} rid={e.get('rid')} sid={e.get('sid')} code={e.get('code')}: {e.get('reason')}"
            )
    lines.append(f"reply streams: {snap['reply_streams']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = broker_settings_from_args(args)
    check_reachable(settings)
    r = connect_sync(settings)
    snap = snapshot(r, settings, args.dead_letters)
    print(json.dumps(snap, indent=2) if args.json else render(snap))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    p.add_argument(
        "--dead-letters",
        type=int,
        default=5,
        metavar="N",
        help="show the N newest dead letters per stream (%(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


COMMAND = Command(
    "inspect",
    help="show streams, pending entries, consumers, workers and dead letters",
    description="A one-shot view of what is queued, what is in flight and with whom, and what failed.",
    add_args=add_args,
    run=run,
)
