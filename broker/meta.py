"""The partition count, agreed between workers and clients through one key, `<prefix>:meta`.

A session's partition is crc32(session) mod P, so a client and the workers must use the
same P: a client with a larger P would publish to streams no worker reads. The first worker
to start writes P (HSETNX, so the first one wins); every later worker and every client
compares its own P with it and refuses to run on a mismatch, with an error that says what
to change. Nothing is written by clients, and a missing key (no worker yet, or a Redis that
lost its data) is not an error: the next worker writes it again.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

from broker.keys import Keys
from broker.responses import text
from broker.settings import BrokerSettings


class PartitionMismatch(RuntimeError):
    """This process's partition count differs from the one recorded in Redis."""


def _check(meta: Dict[str, str], settings: BrokerSettings, role: str, key: str) -> None:
    if "partitions" not in meta:
        return
    recorded = int(meta["partitions"])
    if recorded != settings.partitions:
        raise PartitionMismatch(
            f"{key} records {recorded} partition(s) (written by {meta.get('set_by') or '?'} at "
            f"{meta.get('set_at') or '?'}), but this {role} was started with {settings.partitions}. "
            f"Start every worker and client with --partitions {recorded} (VLMQ_PARTITIONS={recorded}); "
            f"to change the count, stop all workers and clients, let the request streams drain "
            f"(`vlmq inspect`), then DEL {key}."
        )


async def agree_partitions(redis, settings: BrokerSettings, role: str, name: Optional[str] = None) -> None:
    """Record this process's partition count if none is recorded yet (role 'worker' only),
    then raise PartitionMismatch if the recorded count differs from ours."""
    key = Keys(settings.prefix, settings.partitions).meta()
    if role == "worker" and await redis.hsetnx(key, "partitions", settings.partitions):
        await redis.hset(key, mapping={"set_by": name or role, "set_at": f"{time.time():.3f}"})
    meta = {text(k): text(v) for k, v in (await redis.hgetall(key)).items()}
    _check(meta, settings, role, key)


def read_meta(redis, settings: BrokerSettings) -> Dict[str, str]:
    """The recorded facts, read with a synchronous client (for `vlmq inspect`)."""
    key = Keys(settings.prefix, settings.partitions).meta()
    return {text(k): text(v) for k, v in redis.hgetall(key).items()}
