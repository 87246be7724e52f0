"""Writing outcomes: the reply, the ack, and (for poison or bad input) the dead letter.

Everything for one partition goes in one Lua call: the reply lands exactly when the request
leaves the pending list, so a crash can't leave an answered request pending or an acked
request unanswered. On Redis Cluster all those keys share the partition's hash tag.

The call is fenced: an outcome is written only while its entry is still pending for this
consumer. A worker that stalled past claim_min_idle_ms (GC pause, frozen VM, SIGSTOP) has
lost its messages to another worker, and its late results are dropped instead of becoming
second replies; a commit retried after a lost connection finds its entries already acked
and writes nothing twice. If Redis lost its data since the entry was read (the group is
gone, or another worker already recreated it: the partition's epoch token tells), no
pending record can vouch for the entry, and the reply is written anyway: nobody else can
answer it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from broker.consumer import Delivery
from broker.keys import Keys
from broker.settings import BrokerSettings
from schemas.messages import ID_PATTERN

_SESSION = re.compile(ID_PATTERN)

# ARGV: group, consumer, reply_maxlen, reply_ttl_s, dlq_maxlen, then per outcome: stream key
# index, entry id, reply key index (0: none), rid, reply body, dead-letter key index (0: none),
# epoch key index and the epoch token the entry was read under (a different current token:
# Redis lost its data since, so no pending record can vouch for the entry), n, and n
# dead-letter field/value pairs. Returns 1 (written) or 0 (fenced off) per outcome.
_FENCED_COMMIT = """
local group, consumer = ARGV[1], ARGV[2]
local out, i = {}, 6
while i <= #ARGV do
  local stream, id = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local reply_key, dead_key, n = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 5]), tonumber(ARGV[i + 8])
  local orphaned = redis.call('GET', KEYS[tonumber(ARGV[i + 6])]) ~= ARGV[i + 7]
  local pending = redis.pcall('XPENDING', stream, group, id, id, 1)
  local lost = type(pending) == 'table' and pending.err ~= nil
  if lost and not string.find(pending.err, 'NOGROUP', 1, true) then
    return redis.error_reply(pending.err)
  end
  if lost or orphaned or (pending[1] ~= nil and pending[1][2] == consumer) then
    if reply_key > 0 then
      redis.call('XADD', KEYS[reply_key], 'MAXLEN', ARGV[3], '*', 'rid', ARGV[i + 3], 'body', ARGV[i + 4])
      redis.call('EXPIRE', KEYS[reply_key], ARGV[4])
    end
    if dead_key > 0 then
      redis.call('XADD', KEYS[dead_key], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, i + 9, i + 8 + 2 * n))
    end
    if not lost then
      redis.call('XACK', stream, group, id)
    end
    redis.call('XDEL', stream, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  i = i + 9 + 2 * n
end
return out
"""


@dataclass
class Outcome:
    delivery: Delivery
    reply: Optional[bytes]  # encoded Reply body; None when nobody can be answered
    dead_letter: Optional[Dict[str, str]] = None  # reason fields when it goes to dead letters
    code: Optional[str] = None  # the error code of an error reply, for metrics and logs
    committed: bool = False  # set once its commit ran: a retried commit skips it
    fenced: bool = False  # its entry was no longer ours: nothing was written for it


class ReplyWriter:
    def __init__(self, redis, settings: BrokerSettings, worker: str) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.worker = worker
        self._script = redis.register_script(_FENCED_COMMIT)

    def reply_stream(self, d: Delivery) -> Optional[str]:
        sid = d.field("sid")
        if not sid or not _SESSION.match(sid):
            return None
        return self.keys.reply_stream(sid, d.partition)

    async def commit(self, outcomes: List[Outcome]) -> int:
        """Write what this consumer still holds; returns how many outcomes were fenced off
        (their entries had been taken over or answered by another consumer)."""
        by_partition: Dict[int, List[Outcome]] = {}
        for o in outcomes:
            if not o.committed:
                by_partition.setdefault(o.delivery.partition, []).append(o)
        fenced = 0
        for partition, group in by_partition.items():
            keys, args = self._script_args(partition, group)
            written = await self._script(keys=keys, args=args)
            for o, ok in zip(group, written):
                o.committed = True
                o.fenced = not int(ok)
                fenced += o.fenced
        return fenced

    def _script_args(self, partition: int, group: List[Outcome]) -> Tuple[List[str], List[object]]:
        index: Dict[str, int] = {}  # key -> its 1-based position in KEYS (0 means "none")

        def key(name: Optional[str]) -> int:
            return index.setdefault(name, len(index) + 1) if name else 0

        args: List[object] = [
            self.settings.group,
            self.worker,
            self.settings.reply_maxlen,
            self.settings.reply_ttl_s,
            self.settings.dlq_maxlen,
        ]
        for o in group:
            d = o.delivery
            dead = self._dead_letter_fields(o) if o.dead_letter is not None else {}
            args += [
                key(d.stream),
                d.entry_id,
                key(self.reply_stream(d) if o.reply is not None else None),
                d.field("rid") or "",
                o.reply or b"",
                key(self.keys.dead_letters(d.kind, partition) if dead else None),
                key(self.keys.epoch(partition)),
                d.epoch,
                len(dead),
            ]
            for k, v in dead.items():
                args += [k, v]
        return list(index), args

    def _dead_letter_fields(self, o: Outcome) -> Dict[str, object]:
        d = o.delivery
        fields: Dict[str, object] = {k.decode(errors="replace"): v for k, v in d.fields.items()}
        fields.update(o.dead_letter or {})
        fields.update(
            stream=d.stream,
            entry_id=d.entry_id,
            deliveries=str(d.deliveries),
            worker=self.worker,
            failed_at=f"{time.time():.6f}",
        )
        return fields
