"""Every Redis key name vlmq uses, and nothing else (docs/PROTOCOL.md, "Keys").

Request, reply and dead-letter keys of one partition share the hash tag ``{p<n>}``, so on
Redis Cluster a session's requests, its replies and the dead letters they may become live
in one slot: the worker writes a reply and acks the request in one Lua call.

A tenant's request streams end in ``:<tenant>``: Redis ACLs let tenant T write only
streams ending in ``:T``, and a worker answers an entry of such a stream only if its
session id starts with ``T.`` (so a tenant cannot cause replies in another's streams).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

_REQ = re.compile(
    r"^(?P<prefix>.+):req:(?P<kind>[a-z_]+)(?::(?P<model>[^:{}]+))?:\{p(?P<p>\d+)\}(?::(?P<tenant>[A-Za-z0-9-]+))?$"
)


# Tenant names: no "." (sessions are "<tenant>.<name>"), no glob characters (ACL patterns).
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


class StreamName(NamedTuple):
    kind: str
    model: Optional[str]
    partition: int
    tenant: Optional[str] = None


@dataclass(frozen=True)
class Keys:
    prefix: str = "vlmq"
    partitions: int = 1

    def partition_of(self, session_id: str) -> int:
        return zlib.crc32(session_id.encode()) % self.partitions

    @staticmethod
    def tag(partition: int) -> str:
        return "{p" + str(partition) + "}"

    def request_stream(
        self, kind: str, partition: int, model: Optional[str] = None, tenant: Optional[str] = None
    ) -> str:
        middle = f"{kind}:{model}" if model else kind
        end = f":{tenant}" if tenant else ""
        return f"{self.prefix}:req:{middle}:{self.tag(partition)}{end}"

    def request_streams(
        self, kind: str, model: Optional[str] = None, tenant: Optional[str] = None
    ) -> List[str]:
        return [self.request_stream(kind, p, model, tenant) for p in range(self.partitions)]

    def stream_for(
        self, kind: str, session_id: str, model: Optional[str] = None, tenant: Optional[str] = None
    ) -> str:
        return self.request_stream(kind, self.partition_of(session_id), model, tenant)

    def reply_stream(self, session_id: str, partition: Optional[int] = None) -> str:
        p = self.partition_of(session_id) if partition is None else partition
        return f"{self.prefix}:reply:{self.tag(p)}:{session_id}"

    def partial_stream(self, session_id: str, partition: Optional[int] = None) -> str:
        """Streamed pieces of the session's replies (never the replies themselves)."""
        p = self.partition_of(session_id) if partition is None else partition
        return f"{self.prefix}:part:{self.tag(p)}:{session_id}"

    def dead_letters(self, kind: str, partition: int) -> str:
        return f"{self.prefix}:dlq:{kind}:{self.tag(partition)}"

    def suspects(self, partition: int) -> str:
        """Hash: request entry ("<stream> <entry id>") -> how many times a worker started
        running it alone (it was redelivered after a worker died holding it)."""
        return f"{self.prefix}:suspects:{self.tag(partition)}"

    def tap(self, partition: int) -> str:
        """Stream of (request, reply) copies written by workers in the commit, while a
        recorder holds `tap_owner` (ops/record.py)."""
        return f"{self.prefix}:tap:{self.tag(partition)}"

    def tap_owner(self, partition: int) -> str:
        return f"{self.prefix}:tap:on:{self.tag(partition)}"

    def epoch(self, partition: int) -> str:
        """A token naming the current incarnation of the partition's data (broker/consumer.py)."""
        return f"{self.prefix}:epoch:{self.tag(partition)}"

    def meta(self) -> str:
        """Facts every client and worker of this prefix must agree on (the partition count)."""
        return f"{self.prefix}:meta"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    def parse_request_stream(self, key: str) -> StreamName:
        """(kind, model, partition, tenant) of a request stream key."""
        m = _REQ.match(key)
        if not m or m.group("prefix") != self.prefix:
            raise ValueError(f"{key!r} is not a request stream of prefix {self.prefix!r}")
        return StreamName(m.group("kind"), m.group("model"), int(m.group("p")), m.group("tenant"))
