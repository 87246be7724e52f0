"""Is a published request still in Redis? What a client asks when a reply is overdue.

A request entry lives in its stream from the XADD until the commit that writes its reply
deletes it (broker/replies.py). So an entry that is neither waiting (not yet delivered to
any worker) nor pending (delivered, not yet answered) was answered, or lost: Redis lost its
data, a failover promoted a replica that never had it, or someone deleted it. The client
tells the two apart by reading its reply stream up to its newest entry (env_agents/client.py).

An id after the group's last-delivered id is waiting, unless the group says nothing waits
(`lag` 0). Only the consumer group's bookkeeping is read (XINFO GROUPS, XPENDING), never an entry, so
a tenant may ask this about its own streams without being able to read anyone's requests
(ops/acl/rules.py grants exactly these two commands).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from redis.exceptions import ResponseError

from broker.responses import text

WAITING, PENDING, GONE = "waiting", "pending", "gone"


def _id(entry_id: str) -> Tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def entry_states(redis, group: str, stream: str, entry_ids: Iterable[str]) -> Dict[str, str]:
    """WAITING, PENDING or GONE for each entry id of one request stream."""
    ids: List[str] = list(entry_ids)
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return {e: GONE for e in ids}
        raise
    info = next((g for g in groups if text(g.get("name", b"")) == group), None)
    if info is None:  # no worker ever read this stream: nothing in it was delivered yet
        return {e: WAITING for e in ids}
    last = _id(text(info.get("last-delivered-id", b"0-0")))
    # lag: entries not yet delivered (None where Redis cannot tell, after deletions). 0 means
    # nothing waits: an id after the last delivered one is then not there (a group recreated
    # after Redis lost its data).
    nothing_waits = info.get("lag") == 0
    out: Dict[str, str] = {}
    delivered = [e for e in ids if _id(e) <= last]
    for e in ids:
        if _id(e) > last:
            out[e] = GONE if nothing_waits else WAITING
    if delivered:
        pipe = redis.pipeline(transaction=False)
        for e in delivered:
            pipe.xpending_range(stream, group, min=e, max=e, count=1)
        for e, pending in zip(delivered, await pipe.execute()):
            out[e] = PENDING if pending else GONE
    return out
