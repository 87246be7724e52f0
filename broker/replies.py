"""Settling delivered entries: the reply, the ack, and (for poison or bad input) the dead letter.

Everything for one partition goes in one Lua call: the reply lands exactly when the request
leaves the pending list, so a crash can't leave an answered request pending or an acked
request unanswered. On Redis Cluster all those keys share the partition's hash tag.

The call is fenced: a settlement is written only while its entry is still pending for this
consumer. A worker that stalled past claim_min_idle_ms (GC pause, frozen VM, SIGSTOP) has
lost its messages to another worker, and its late results are dropped instead of becoming
second replies; a commit retried after a lost connection finds its entries already acked
and writes nothing twice. If Redis lost its data since the entry was read (the group is
gone, or another worker already recreated it: the partition's epoch token tells), no
pending record can vouch for the entry, and the reply is written anyway: nobody else can
answer it.

The same call drops the entry's count of runs alone (broker/consumer.py), and, while a
recorder holds the partition's tap (ops/record.py), copies the request entry and its reply
to the tap stream: every request committed while the tap is held is recorded, at any rate.
Dead letters are bounded in bytes: the envelope fields, the body up to `dlq_body_bytes`
(else its length and SHA-256), and the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from broker.consumer import Delivery
from broker.keys import Keys
from broker.settings import BrokerSettings
from schemas.messages import ID_PATTERN

_SESSION = re.compile(ID_PATTERN)

# KEYS: the keys the settlements name, then (last three) the partition's suspects hash, tap
# stream and tap owner. ARGV: group, consumer, reply_maxlen, reply_ttl_s, dlq_maxlen,
# tap_maxlen, then per settlement: stream key index, entry id, reply key index (0: none), rid,
# reply body, dead-letter key index (0: none), epoch key index and the epoch token the entry
# was read under (a different current token: Redis lost its data since, so no pending record
# can vouch for the entry), n, and n dead-letter field/value pairs. Returns 1 (written) or 0
# (fenced off) per settlement.
_FENCED_COMMIT = """
local group, consumer = ARGV[1], ARGV[2]
local suspects, tap, tap_owner = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local tapping = redis.call('EXISTS', tap_owner) == 1
local out, i = {}, 7
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
    if tapping then
      local entry = redis.call('XRANGE', stream, id, id)
      local fields = {'stream', stream, 'id', id, 'rid', ARGV[i + 3], 'reply', ARGV[i + 4]}
      if entry[1] ~= nil then
        local f = entry[1][2]
        for j = 1, #f, 2 do
          if f[j] == 'body' or f[j] == 'sid' then
            fields[#fields + 1] = f[j]
            fields[#fields + 1] = f[j + 1]
          end
        end
      end
      redis.call('XADD', tap, 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
    end
    if reply_key > 0 then
      redis.call('XADD', KEYS[reply_key], 'MAXLEN', ARGV[3], '*', 'rid', ARGV[i + 3], 'body', ARGV[i + 4])
      redis.call('EXPIRE', KEYS[reply_key], ARGV[4])
    end
    if dead_key > 0 then
      redis.call('XADD', KEYS[dead_key], 'MAXLEN', ARGV[5], '*', unpack(ARGV, i + 9, i + 8 + 2 * n))
    end
    if not lost then
      redis.call('XACK', stream, group, id)
    end
    redis.call('XDEL', stream, id)
    redis.call('HDEL', suspects, stream .. ' ' .. id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  i = i + 9 + 2 * n
end
return out
"""

# What a dead letter keeps of the entry: the envelope fields (cut to this many bytes), the
# body up to dlq_body_bytes (else its length and SHA-256), and a reason of bounded length.
_ENVELOPE = ("v", "kind", "rid", "sid")
_MAX_ENVELOPE_FIELD = 256
_MAX_REASON = 1024


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Settlement:
    """What committing one delivered entry writes: its reply (if anyone can be answered), its
    ack, and its dead letter (if it failed for good)."""

    delivery: Delivery
    reply: Optional[bytes]  # encoded Reply body; None when nobody can be answered
    dead_letter: Optional[Dict[str, str]] = None  # reason fields when it goes to dead letters
    code: Optional[str] = None  # the error code of an error reply, for metrics and logs
    # Where the reply goes and the rid it carries, when not the entry's own sid/rid fields
    # (an entry that lacks them, answered from what its body says).
    session: Optional[str] = None
    request_id: Optional[str] = None
    committed: bool = False  # set once its commit ran: a retried commit skips it
    digest: Optional[str] = None  # SHA-256 of an oversize body, for its dead letter
    fenced: bool = False  # its entry was no longer ours: nothing was written for it


class ReplyWriter:
    def __init__(self, redis, settings: BrokerSettings, worker: str) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.worker = worker
        self._script = redis.register_script(_FENCED_COMMIT)

    def reply_stream(self, o: Settlement) -> Optional[str]:
        """The session's reply stream; None when the session id is unusable as a key part, or
        belongs to a partition other than the entry's (its reply could not share the slot)."""
        sid = o.session or o.delivery.field("sid")
        if not sid or not _SESSION.match(sid):
            return None
        if self.keys.partition_of(sid) != o.delivery.partition:
            return None
        return self.keys.reply_stream(sid, o.delivery.partition)

    async def commit(self, settlements: List[Settlement]) -> int:
        """Write what this consumer still holds; returns how many settlements were fenced off
        (their entries had been taken over or answered by another consumer)."""
        by_partition: Dict[int, List[Settlement]] = {}
        for o in settlements:
            if not o.committed:
                by_partition.setdefault(o.delivery.partition, []).append(o)
        fenced = 0
        for o in settlements:  # hashing a large body takes milliseconds: not on the event loop
            body = o.delivery.fields.get(b"body")
            if (
                o.dead_letter is not None
                and o.digest is None
                and body
                and len(body) > self.settings.dlq_body_bytes
            ):
                o.digest = await asyncio.to_thread(_sha256, body)
        for partition, group in by_partition.items():
            keys, args = self._script_args(partition, group)
            written = await self._script(keys=keys, args=args)
            for o, ok in zip(group, written):
                o.committed = True
                o.fenced = not int(ok)
                fenced += o.fenced
        return fenced

    def _script_args(self, partition: int, group: List[Settlement]) -> Tuple[List[str], List[object]]:
        index: Dict[str, int] = {}  # key -> its 1-based position in KEYS (0 means "none")

        def key(name: Optional[str]) -> int:
            return index.setdefault(name, len(index) + 1) if name else 0

        args: List[object] = [
            self.settings.group,
            self.worker,
            self.settings.reply_maxlen,
            self.settings.reply_ttl_s,
            self.settings.dlq_maxlen,
            self.settings.tap_maxlen,
        ]
        for o in group:
            d = o.delivery
            dead = self._dead_letter_fields(o) if o.dead_letter is not None else {}
            args += [
                key(d.stream),
                d.entry_id,
                key(self.reply_stream(o) if o.reply is not None else None),
                o.request_id or d.field("rid") or "",
                o.reply or b"",
                key(self.keys.dead_letters(d.kind, partition) if dead else None),
                key(self.keys.epoch(partition)),
                d.epoch,
                len(dead),
            ]
            for k, v in dead.items():
                args += [k, v]
        keys = list(index)
        keys += [self.keys.suspects(partition), self.keys.tap(partition), self.keys.tap_owner(partition)]
        return keys, args

    def _dead_letter_fields(self, o: Settlement) -> Dict[str, object]:
        d = o.delivery
        fields: Dict[str, object] = {}
        for name in _ENVELOPE:
            raw = d.fields.get(name.encode())
            if raw is not None:
                fields[name] = raw[:_MAX_ENVELOPE_FIELD]
        extra = [k for k in d.fields if k.decode(errors="replace") not in _ENVELOPE and k != b"body"]
        if extra:
            fields["extra_fields"] = str(len(extra))
        body = d.fields.get(b"body")
        if body is not None:
            if len(body) <= self.settings.dlq_body_bytes:
                fields["body"] = body
            else:  # the frame would make the dead letters unbounded; keep what identifies it
                fields["body_bytes"] = str(len(body))
                fields["body_sha256"] = o.digest or _sha256(body)
        for k, v in (o.dead_letter or {}).items():
            fields[k] = v[:_MAX_REASON] if isinstance(v, str) else v
        # an entry without rid/sid fields is filed under what its body says
        if o.request_id and "rid" not in fields:
            fields["rid"] = o.request_id[:_MAX_ENVELOPE_FIELD]
        if o.session and "sid" not in fields:
            fields["sid"] = o.session[:_MAX_ENVELOPE_FIELD]
        fields.update(
            stream=d.stream,
            entry_id=d.entry_id,
            deliveries=str(d.deliveries),
            worker=self.worker,
            failed_at=f"{time.time():.6f}",
        )
        return fields
