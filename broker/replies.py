"""Writing outcomes: the reply, the ack, and (for poison or bad input) the dead letter.

Everything for one partition goes in one MULTI: the reply lands exactly when the request
leaves the pending list, so a crash can't leave an answered request pending or an acked
request unanswered. On Redis Cluster all those keys share the partition's hash tag.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from broker.consumer import Delivery
from broker.keys import Keys
from broker.settings import BrokerSettings
from schemas.messages import ID_PATTERN

_SESSION = re.compile(ID_PATTERN)


@dataclass
class Outcome:
    delivery: Delivery
    reply: Optional[bytes]  # encoded Reply body; None when nobody can be answered
    dead_letter: Optional[Dict[str, str]] = None  # reason fields when it goes to dead letters
    code: Optional[str] = None  # the error code of an error reply, for metrics and logs


class ReplyWriter:
    def __init__(self, redis, settings: BrokerSettings, worker: str) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.worker = worker

    def reply_stream(self, d: Delivery) -> Optional[str]:
        sid = d.field("sid")
        if not sid or not _SESSION.match(sid):
            return None
        return self.keys.reply_stream(sid, d.partition)

    async def commit(self, outcomes: List[Outcome]) -> None:
        by_partition: Dict[int, List[Outcome]] = {}
        for o in outcomes:
            by_partition.setdefault(o.delivery.partition, []).append(o)
        for partition, group in by_partition.items():
            pipe = self.redis.pipeline(transaction=True)
            for o in group:
                d = o.delivery
                target = self.reply_stream(d)
                if o.reply is not None and target is not None:
                    fields = {"rid": d.field("rid") or "", "body": o.reply}
                    pipe.xadd(target, fields, maxlen=self.settings.reply_maxlen, approximate=False)
                    pipe.expire(target, self.settings.reply_ttl_s)
                if o.dead_letter is not None:
                    dl = {k.decode(): v for k, v in d.fields.items()}
                    dl.update(o.dead_letter)
                    dl.update(
                        stream=d.stream,
                        entry_id=d.entry_id,
                        deliveries=str(d.deliveries),
                        worker=self.worker,
                        failed_at=f"{time.time():.6f}",
                    )
                    pipe.xadd(
                        self.keys.dead_letters(d.kind, partition),
                        dl,
                        maxlen=self.settings.dlq_maxlen,
                        approximate=True,
                    )
                pipe.xack(d.stream, self.settings.group, d.entry_id)
                pipe.xdel(d.stream, d.entry_id)
            await pipe.execute()
