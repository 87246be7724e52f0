"""Redis only: key names, connections, publishing with backpressure, group reads,
reclaim, delivery counts, dead letters, reply streams. No model code."""

from broker.connection import connect_async, connect_sync
from broker.consumer import Delivery, GroupReader
from broker.keys import Keys
from broker.publisher import BacklogFull, Publisher
from broker.replies import ReplyWriter, Settlement
from broker.settings import BrokerSettings

__all__ = [
    "BacklogFull",
    "BrokerSettings",
    "Delivery",
    "GroupReader",
    "Keys",
    "Publisher",
    "ReplyWriter",
    "Settlement",
    "connect_async",
    "connect_sync",
]
