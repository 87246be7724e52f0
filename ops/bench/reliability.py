"""Faults under load, on CPU: nothing lost, nothing answered twice, nobody punished for a poison.

Real `vlmq worker` processes (synthetic backend: a fixed model latency), agent processes of
closed-loop sessions (ops/bench/reliability_agents.py: replies are counted from the reply
streams by a reader of their own, not from the client's bookkeeping), one private
redis-server; the runs are in ops/bench/fault_runs.py:
- kill: 64 sessions x 1,000 requests, 2 workers, worker 0 SIGKILLed at 50% (beside a pass
  without the kill, the throughput baseline); takeover = fault to the survivor's reply, for
  each request the victim held.
- stop: the same with SIGSTOP (64 x 300, at 30%), then SIGCONT: the stalled worker's
  results are fenced off.
- restart: Redis without persistence restarted at 50% of 64 x 300.
- poison: 32 sessions x 90, two of them send a request that SIGKILLs the worker running
  it; workers restarted as a supervisor would. Collateral: dead letters of valid requests.
- bad_input: 90 hostile entries (bad_inputs.py) while 4 good sessions run.
- record: `vlmq record` beside the stream-reading recorder it replaced, at a no-op
  worker's full rate.
Timings are the median of --runs runs; counts are totals over the runs; the figures of
scenarios not run are kept from the results file. Exits 1 if
anything was lost, answered twice, dead-lettered as collateral or missed by the recorder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable, Dict, List

from ops.bench import fault_runs as runs
from ops.bench.fault_runs import percentile

SCENARIOS = ("kill", "stop", "restart", "poison", "bad_input", "record")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (%(default)s)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs of each scenario (%(default)s)")
    p.add_argument("--agents", type=int, default=64, help="sessions of the kill run (%(default)s)")
    p.add_argument("--requests", type=int, default=1000, help="requests per session, kill run (%(default)s)")
    p.add_argument(
        "--agent-procs", type=int, default=8, help="processes the sessions are spread over (%(default)s)"
    )
    p.add_argument(
        "--kill-at", type=float, default=0.5, help="SIGKILL worker 0 at this fraction published (%(default)s)"
    )
    p.add_argument(
        "--kind", default="action_chunk", choices=["action_chunk", "text_action"], help="(%(default)s)"
    )
    p.add_argument("--image-side", type=int, default=64, help="raw uint8 frame side (%(default)s)")
    p.add_argument(
        "--latency-ms", type=float, default=2.0, help="synthetic model latency per batch (%(default)s)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="worker batch size (%(default)s)")
    p.add_argument(
        "--claim-min-idle-ms",
        type=int,
        default=3000,
        help="takeover delay of a dead worker's requests (%(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds an agent waits for one reply (%(default)s)"
    )


def _private_redis(url):
    from broker.embedded import EmbeddedRedis

    if url:
        return None, url
    server = EmbeddedRedis().start()
    return server, server.url


def _describe(name: str, res: Dict[str, Any]) -> None:
    keys = (
        "sent",
        "answered",
        "timed_out",
        "duplicates_in_streams",
        "misdelivered",
        "redelivered",
        "republished",
    )
    print(
        f"  {name}: " + ", ".join(f"{k} {res.get(k)}" for k in keys) + f", lost {len(res['lost'])}",
        flush=True,
    )


def _repeat(n: int, name: str, run: Callable[[], Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for i in range(n):
        res = run()
        _describe(f"{name} {i + 1}/{n}", res)
        out.append(res)
    return out


def _total(results: List[Dict[str, Any]], key: str) -> float:
    return sum(len(r[key]) if isinstance(r[key], list) else r[key] for r in results)


def _merged(path: str, records: List[Any]) -> List[Any]:
    """This run's records, after those of the results file that this run did not measure
    (a run of some scenarios updates their figures and keeps the others, each with its
    own commit and date)."""
    import json
    import os

    from ops.bench.records import Record

    if not os.path.exists(path):
        return records
    with open(path) as f:
        kept = [Record(**r) for r in json.load(f)]
    new = {r.metric for r in records}
    return [r for r in kept if r.metric not in new] + records


def run(args: argparse.Namespace) -> int:
    from ops.bench.records import current_commit, record, write_results

    current_commit()  # the code that runs now, whatever changes in the tree meanwhile

    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    records = []
    failures: List[str] = []
    server, url = _private_redis(args.redis_url)
    claim_s = args.claim_min_idle_ms / 1000.0

    def load(fault, agents, requests, at):
        return lambda: runs.load_run(
            url, fault, agents, requests, args.agent_procs, 2, at, args.claim_min_idle_ms,
            args.latency_ms, args.max_batch, args.kind, args.image_side, args.timeout,
        )  # fmt: skip

    def counts(results, suffix: str = "", duplicates_fail: bool = True) -> None:
        """Totals over the runs; lost or misdelivered replies fail the bench, and second
        replies too unless the fault makes them expected (a request published again after
        Redis lost it, which a worker that had read it before still answered)."""
        for metric, key, unit in (
            ("lost_requests", "lost", "requests"),
            ("duplicate_replies", "duplicates_in_streams", "replies"),
            ("duplicate_replies_to_application", "duplicates_delivered", "replies"),
            ("misdelivered_replies", "misdelivered", "replies"),
            ("requests_timed_out", "timed_out", "requests"),
            ("requests_sent", "sent", "requests"),
            ("requests_answered", "answered", "requests"),
        ):
            records.append(record(metric + suffix, _total(results, key), unit))
        bad = (
            _total(results, "lost")
            + _total(results, "misdelivered")
            + _total(results, "duplicates_delivered")
        )
        bad += _total(results, "duplicates_in_streams") if duplicates_fail else 0
        if bad:
            failures.append(f"{suffix or '_kill'}: {bad:g} lost, duplicated or misdelivered")

    try:
        if "kill" in chosen:
            print("kill: worker 0 SIGKILLed under load, beside runs without the kill", flush=True)
            base = _repeat(args.runs, "no kill", load(None, args.agents, args.requests, 0.0))
            kill = _repeat(args.runs, "SIGKILL", load("kill", args.agents, args.requests, args.kill_at))
            counts(kill)
            p95 = [percentile(r["takeover_s"], 0.95) for r in kill]
            records += [
                record("requests_held_by_killed_worker", [r["held"] for r in kill], "requests"),
                record("requests_redelivered", _total(kill, "redelivered"), "requests"),
                record("requests_reclaimed_by_survivor", _total(kill, "reclaimed"), "requests"),
                record("takeover_s_p95_under_load", p95, "s"),
                record("takeover_s_max_under_load", [max(r["takeover_s"] or [0.0]) for r in kill], "s"),
                record("takeover_bound_s", claim_s + 3.0, "s"),
                record("fenced_results", _total(kill, "fenced"), "results"),
                record(
                    "error_replies", sum(r["answered"] - r["codes"].get("ok", 0) for r in kill), "replies"
                ),
                record("left_pending", _total(kill, "left_pending"), "requests"),
                record(
                    "throughput",
                    [r["answered"] / r["seconds"] for r in kill],
                    "requests/s",
                    baseline=[r["answered"] / r["seconds"] for r in base],
                ),
                record("latency_p50", [statistics.median(r["latencies_ms"]) for r in kill], "ms"),
                record("latency_p99", [percentile(r["latencies_ms"], 0.99) for r in kill], "ms"),
                record("latency_max", [max(r["latencies_ms"]) for r in kill], "ms"),
                record("redis_used_memory_peak", [r["redis_peak_mb"] for r in kill], "MiB"),
            ]
            if statistics.median(p95) > claim_s + 3.0 or _total(kill, "takeover_missing"):
                failures.append(f"takeover p95 {statistics.median(p95):.1f} s > {claim_s + 3:.1f} s")
        if "stop" in chosen:
            print("stop: worker 0 SIGSTOPped under load, SIGCONT at the end", flush=True)
            stop = _repeat(args.runs, "SIGSTOP", load("stop", args.agents, 300, 0.3))
            counts(stop, "_sigstop")
            p95 = [percentile(r["takeover_s"], 0.95) for r in stop]
            records += [
                record("takeover_s_p95_under_load_sigstop", p95, "s"),
                record("requests_held_by_stopped_worker", [r["held"] for r in stop], "requests"),
                record("fenced_results_sigstop", _total(stop, "fenced"), "results"),
            ]
            if statistics.median(p95) > claim_s + 3.0 or _total(stop, "takeover_missing"):
                failures.append(
                    f"takeover (SIGSTOP) p95 {statistics.median(p95):.1f} s > {claim_s + 3:.1f} s"
                )
        if "restart" in chosen:
            print("restart: Redis without persistence restarted under load", flush=True)
            restart = _repeat(
                args.runs,
                "restart",
                lambda: runs.restart_run(64, 300, args.agent_procs, 0.5, args.kind, args.timeout),
            )
            counts(restart, "_redis_restart_no_persistence", duplicates_fail=False)
            records += [
                record(
                    "requests_republished_redis_restart_no_persistence",
                    _total(restart, "republished"),
                    "requests",
                ),
                record("workers_alive_after_redis_restart", [r["workers_alive"] for r in restart], "workers"),
            ]
        if "poison" in chosen:
            print("poison: requests that kill their worker, among valid ones", flush=True)
            poison = _repeat(
                args.runs, "poison", lambda: runs.poison_run(url, 32, 90, 2, args.kind, 1000, args.timeout)
            )
            records += [
                record("collateral_dead_letters_poison", _total(poison, "collateral"), "requests"),
                record("valid_requests_not_answered_ok_poison", _total(poison, "valid_not_ok"), "requests"),
                record("poison_requests_dead_lettered", _total(poison, "poisons_dead_lettered"), "requests"),
                record("poison_requests_sent", sum(len(r["poison_ids"]) for r in poison), "requests"),
                record("worker_crashes_poison", _total(poison, "crashes"), "crashes"),
                record("lost_requests_poison", _total(poison, "lost"), "requests"),
                record("requests_sent_poison", _total(poison, "sent"), "requests"),
            ]
            if _total(poison, "collateral") or _total(poison, "valid_not_ok") or _total(poison, "lost"):
                failures.append("poison: collateral or lost requests")
        if "bad_input" in chosen:
            print("bad_input: hostile entries while good sessions run", flush=True)
            bad = _repeat(args.runs, "bad input", lambda: runs.bad_input_run(url, 4, 300))
            bound = 1000 * (65536 + 3072)  # dlq_maxlen x (dlq_body_bytes + ~3 KiB), per stream
            records += [
                record("max_good_wait_s_bad_input", [r["max_good_wait_s"] for r in bad], "s"),
                record(
                    "dlq_bytes_after_bad_input_sweep",
                    [r["dlq_bytes"] for r in bad],
                    "bytes",
                    baseline=[r["dlq_bytes_whole_entries"] for r in bad],
                ),
                record("dlq_bytes_bound_per_stream", bound, "bytes"),
                record("bad_input_entries", _total(bad, "bad_entries"), "entries"),
                record("bad_input_entries_unanswered", _total(bad, "bad_unanswered"), "entries"),
                record(
                    "bad_input_entries_not_dead_lettered", _total(bad, "bad_not_dead_lettered"), "entries"
                ),
                record("bad_input_entries_answered_ok", _total(bad, "bad_answered_ok"), "entries"),
                record("worker_exits_bad_input", sum(not r["worker_alive"] for r in bad), "exits"),
                record("lost_requests_bad_input", _total(bad, "lost"), "requests"),
            ]
            if any(
                r["max_good_wait_s"] >= 1.0 or r["bad_unanswered"] or r["bad_not_dead_lettered"] for r in bad
            ):
                failures.append("bad input: a good request waited >= 1 s, or a bad entry went unanswered")
        if "record" in chosen:
            print("record: vlmq record beside the stream-reading recorder, no-op worker", flush=True)
            rec = _repeat(args.runs, "record", lambda: runs.record_run(url, 32, 300))
            records += [
                record(
                    "record_capture_fraction_max_rate",
                    [r["recorded"] / r["sent"] for r in rec],
                    "fraction",
                    baseline=[r["stream_tapped"] / r["sent"] for r in rec],
                ),
                record("record_run_throughput", [r["answered"] / r["seconds"] for r in rec], "requests/s"),
            ]
            if any(r["recorded"] != r["sent"] for r in rec):
                failures.append("record: the recording missed requests")
    finally:
        if server is not None:
            server.close()
    write_results(args.out, _merged(args.out, records))
    print(f"wrote {args.out}")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0
