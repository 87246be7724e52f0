"""Group reads on Redis Cluster: one concurrent XREADGROUP per partition.

Redis Cluster rejects a command whose keys hash to different slots, so the single
XREADGROUP over every request stream that a plain Redis serves becomes one command per
partition (all streams of a partition share its hash tag, hence its slot and node).

Each partition's read blocks on its own. A call returns as soon as any of them has
something; the others stay in flight and their results come with a later call, so an idle
partition never delays a busy one by its block time. A partition whose node is down backs
off on its own, by the retry policy (broker/retry.py), and never gives up (the rest keep
being served meanwhile); and `settle()` waits for the reads still in
flight when the worker stops, so nothing they took is left unserved in this consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, List

from broker.retry import RetryPolicy

if TYPE_CHECKING:
    from broker.consumer import Delivery

log = logging.getLogger("vlmq.broker")

ReadOne = Callable[[List[str], int, int], Awaitable[List["Delivery"]]]


class PartitionedReads:
    def __init__(
        self, read_one: ReadOne, streams_by_partition: Dict[int, List[str]], retry: RetryPolicy
    ) -> None:
        self._read_one = read_one
        self._groups = streams_by_partition
        self._retry = retry
        self._reads: Dict[int, asyncio.Task] = {}
        self._retry_at: Dict[int, float] = {}
        self._failures: Dict[int, int] = {}  # failed reads in a row, per partition

    async def read(self, count: int, block_ms: int) -> List[Delivery]:
        # Split the room between partitions so that all of them together take about
        # `count` (at most one extra per partition), however the load is spread.
        per = max(1, -(-count // len(self._groups)))
        now = time.monotonic()
        for p, streams in self._groups.items():
            if p not in self._reads and self._retry_at.get(p, 0.0) <= now:
                self._reads[p] = asyncio.ensure_future(self._read_one(streams, per, block_ms))
        if not self._reads:  # every partition is backing off
            await asyncio.sleep(max(0.0, min(self._retry_at.values()) - now))
            return []
        await asyncio.wait(list(self._reads.values()), return_when=asyncio.FIRST_COMPLETED)
        return self._collect()

    async def settle(self) -> List[Delivery]:
        """Wait for the reads in flight (each ends within its block time); their messages."""
        if self._reads:
            await asyncio.wait(list(self._reads.values()))
        return self._collect()

    def _collect(self) -> List[Delivery]:
        out: List[Delivery] = []
        for p, task in list(self._reads.items()):
            if not task.done():
                continue
            del self._reads[p]
            exc = task.exception()
            if exc is None:
                out += task.result()
                self._failures.pop(p, None)
                continue
            failures = self._failures.get(p, 0)
            delay = self._retry.delay(failures)
            self._failures[p] = failures + 1
            self._retry_at[p] = time.monotonic() + delay
            log.warning("reading partition %d failed (%s); retrying in %.2f s", p, exc, delay)
        return out
