"""Several agent processes write one trace file at once (vlmq agents --procs P --traces F)."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time


def _writer(path: str, proc: int, barrier) -> None:
    from env_agents.traces.store import TraceStore

    barrier.wait()  # everyone creates the file and its tables at the same moment
    store = TraceStore(path, run=f"proc-{proc}")
    for t in range(200):
        store._write("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (proc, t, "0", 0.0, 0, 0, 0, None))
        if t % 50 == 0:
            time.sleep(0.01)  # an env step: the write transaction stays open meanwhile
    store.close()


def test_processes_share_one_trace_file_without_database_locked(tmp_path):
    path = str(tmp_path / "traces.db")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_writer, args=(path, i, barrier)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM steps").fetchone() == (1200,)
