"""One retry policy for Redis I/O.

redis-py's reconnects (broker/connection.py) and every loop of ours that outlives a Redis
error (the client's reply readers, the worker's reads and reply commits, the per-partition
reads on a cluster) back off by the same rule: the n-th delay is `base_s * 2**n`, jittered
down by up to `jitter` of itself, then capped at `cap_s`. Full jitter (1.0) before the cap is
redis-py's own `ExponentialWithJitterBackoff`, so its reconnects keep their timing. The
bounds come from the broker settings (`BrokerSettings.retry`: VLMQ_RETRY_BASE_S,
VLMQ_RETRY_CAP_S, VLMQ_RETRY_ATTEMPTS); a loop that must never give up drops the attempt
count, one that must give up in time sets a deadline.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Iterator, Optional, TypeVar

from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import AbstractBackoff
from redis.retry import Retry

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.01  # the first delay, before jitter
    cap_s: float = 2.0  # no delay is longer
    # Each delay is drawn from [(1 - jitter) x d, d] before the cap: 1 = full jitter, 0 = none.
    # Retrying clients that all lost the same Redis then do not come back in lockstep.
    jitter: float = 1.0
    attempts: Optional[int] = None  # retries after the first try; None = no limit
    deadline_s: Optional[float] = None  # no delay that would end later than this after delays()

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"retry delays must be >= 0 (base {self.base_s}, cap {self.cap_s})")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"retry jitter must be in [0, 1], got {self.jitter}")
        if self.attempts is not None and self.attempts < 0:
            raise ValueError(f"retry attempts must be >= 0 or None, got {self.attempts}")

    def with_(self, **changes: Any) -> RetryPolicy:
        return replace(self, **changes)

    def delay(self, failures: int) -> float:
        """The delay after `failures` failures in a row (0: after the first)."""
        try:
            full = math.ldexp(self.base_s, failures)
        except OverflowError:
            full = math.inf
        if self.jitter:
            full *= 1.0 - self.jitter * random.random()
        return min(self.cap_s, full)

    def delays(self) -> Iterator[float]:
        """The delays between tries: at most `attempts` of them, and none that would end past
        `deadline_s` from now. The caller sleeps each one and tries again; when the iterator
        ends, it gives up."""
        give_up = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        return self._delays(give_up)

    def _delays(self, give_up: Optional[float]) -> Iterator[float]:
        n = 0
        while self.attempts is None or n < self.attempts:
            delay = self.delay(n)
            if give_up is not None and time.monotonic() + delay > give_up:
                return
            yield delay
            n += 1

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        retry_if: Callable[[Exception], bool] = lambda exc: True,
    ) -> T:
        """Await `fn()` until it returns, sleeping the policy's delays between failures.
        Raises the last error once the delays run out or `retry_if(error)` says no (it sees
        every error, so it may count or log them)."""
        delays = self.delays()
        while True:
            try:
                return await fn()
            except Exception as exc:
                delay = next(delays, None) if retry_if(exc) else None
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    def redis_retry(self, use_asyncio: bool) -> Any:
        """redis-py's `Retry` (sync or asyncio) with this policy's delays and attempts."""
        retries = -1 if self.attempts is None else self.attempts  # -1: redis-py's "forever"
        return (AsyncRetry if use_asyncio else Retry)(_PolicyBackoff(self), retries)


class _PolicyBackoff(AbstractBackoff):
    """A policy as redis-py's backoff (it counts failures from 1, as before the policy)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def compute(self, failures: int) -> float:
        return self.policy.delay(failures)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PolicyBackoff) and other.policy == self.policy

    def __hash__(self) -> int:
        return hash(self.policy)
