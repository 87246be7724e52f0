"""Partitioned streams on a real 3-master Redis Cluster started on local ports.

A worker reads every partition (one XREADGROUP per slot), replies land in the session's
partition, `vlmq inspect` sees the cluster, and a failover-free restart of one node loses
no accepted request: the cluster comes back and the same worker goes on serving.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Dict, List

import openai
import pytest
from redis.crc import key_slot

from broker.connection import connect_async, connect_sync
from broker.consumer import GroupReader
from broker.embedded import free_port
from broker.embedded_cluster import EmbeddedCluster
from broker.keys import Keys
from broker.publisher import Publisher
from broker.settings import BrokerSettings
from env_agents.client import AsyncAgentClient
from ops.gateway.server import GatewayThread
from ops.gateway.settings import GatewaySettings
from ops.inspect import snapshot
from schemas.messages import Reply, TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings

PARTITIONS = 4  # {p0}..{p3} hash to slots on all three masters of an even split


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedCluster(3) as c:
        yield c


def cluster_settings(url: str, **kw) -> BrokerSettings:
    return BrokerSettings(
        url=url,
        cluster=True,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        partitions=PARTITIONS,
        claim_min_idle_ms=1000,
        **kw,
    )


def session_per_partition(keys: Keys) -> Dict[int, str]:
    """One session id for each partition."""
    out: Dict[int, str] = {}
    i = 0
    while len(out) < keys.partitions:
        sid = f"agent-{i}"
        out.setdefault(keys.partition_of(sid), sid)
        i += 1
    return out


def ask(text: str) -> TextActionRequest:
    return TextActionRequest(messages=[{"role": "user", "content": text}])


async def round_trip(clients: List[AsyncAgentClient], n: int, tag: str) -> List[Reply]:
    futs = []
    for c in clients:
        for j in range(n):
            futs.append(await c.submit(ask(f"{tag}-{c.session_id}-{j}")))
    return list(await asyncio.wait_for(asyncio.gather(*futs), 60))


def test_worker_reads_every_partition_on_every_node(cluster):
    s = cluster_settings(cluster.url)
    keys = Keys(s.prefix, s.partitions)
    nodes = {cluster.node_of_slot(key_slot(keys.tag(p).encode())) for p in range(PARTITIONS)}
    assert len(nodes) == 3, "the partitions should spread over all three masters"
    sessions = session_per_partition(keys)

    async def agents() -> List[Reply]:
        clients = [await AsyncAgentClient(sid, settings=s).start() for sid in sessions.values()]
        try:
            return await round_trip(clients, 5, "hello")
        finally:
            for c in clients:
                await c.close()

    with WorkerThread(synthetic_settings(s, name="w-cluster", kinds=("text_action",))) as w:
        replies = asyncio.run(agents())
        r = connect_sync(s)
        snap = snapshot(r, s)
        r.close()
    assert len(replies) == 5 * PARTITIONS
    assert all(rep.ok and rep.worker == "w-cluster" for rep in replies)
    assert sorted(rep.result.text for rep in replies) == sorted(
        f"hello-{sid}-{j}" for sid in sessions.values() for j in range(5)
    )
    assert w.worker.stats["requests"] == 5 * PARTITIONS
    assert snap["meta"]["partitions"] == str(PARTITIONS)
    streams = {row["partition"]: row for row in snap["streams"]}
    assert sorted(streams) == list(range(PARTITIONS))
    assert all(row["length"] == 0 and row["pending"] == 0 for row in streams.values())
    assert len({row["node"] for row in streams.values()}) == 3


def test_node_restart_loses_nothing_and_work_continues():
    with EmbeddedCluster(3) as c:
        s = cluster_settings(c.url)
        keys = Keys(s.prefix, s.partitions)
        sessions = session_per_partition(keys)
        # The node we restart, and a partition that lives on it.
        victim_partition = 2
        victim = c.node_of_slot(key_slot(keys.tag(victim_partition).encode()))
        elsewhere = [
            sid for p, sid in sessions.items() if c.node_of_slot(key_slot(keys.tag(p).encode())) != victim
        ]
        assert elsewhere

        async def scenario() -> None:
            clients = {p: await AsyncAgentClient(sid, settings=s).start() for p, sid in sessions.items()}
            try:
                before = await round_trip(list(clients.values()), 3, "before")
                assert all(r.ok for r in before)
                # A backlog on the victim's partition, then the node goes down under it.
                queued = [await clients[victim_partition].submit(ask(f"queued-{j}")) for j in range(8)]
                restart = asyncio.ensure_future(asyncio.to_thread(c.restart, victim, 1.0))
                # Partitions on the other nodes are served while the victim is down.
                others = [cl for cl in clients.values() if cl.session_id in elsewhere]
                during = await round_trip(others, 3, "during")
                await restart
                after_restart = await asyncio.wait_for(asyncio.gather(*queued), 60)
                after = await round_trip(list(clients.values()), 3, "after")
            finally:
                for cl in clients.values():
                    await cl.close()
            assert all(r.ok for r in during + list(after_restart) + after)
            assert sorted(r.result.text for r in after_restart) == sorted(f"queued-{j}" for j in range(8))

        settings = synthetic_settings(
            s, name="w-restart", kinds=("text_action",), max_batch=2, synthetic_latency_ms=20.0
        )
        with WorkerThread(settings) as w:
            asyncio.run(scenario())
        assert w.worker.stats["dead_letters"] == 0
        r = connect_sync(s)
        snap = snapshot(r, s)
        r.close()
        assert all(row["length"] == 0 and row["pending"] == 0 for row in snap["streams"])


def test_gateway_serves_openai_clients_from_the_cluster(cluster):
    s = cluster_settings(cluster.url)
    gw_settings = GatewaySettings(broker=s, port=free_port(), sessions=PARTITIONS * 2)
    with (
        WorkerThread(synthetic_settings(s, name="w-gw", kinds=("text_action",))),
        GatewayThread(gw_settings) as gw,
    ):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        outs = [
            client.chat.completions.create(model="vlmq", messages=[{"role": "user", "content": f"c{i}"}])
            for i in range(PARTITIONS * 2)
        ]
    assert [o.choices[0].message.content for o in outs] == [f"c{i}" for i in range(PARTITIONS * 2)]
    keys = Keys(s.prefix, s.partitions)
    used = {keys.partition_of(o.model_extra["vlmq"]["session_id"]) for o in outs}
    assert len(used) > 1, "the gateway's pooled sessions should spread over partitions"


def test_keep_alive_and_reclaim_across_slots(cluster):
    """One consumer holds messages of every partition; keep-alive (one pipeline over all
    slots) keeps them from a second consumer, and once it stops they are reclaimed."""
    s = cluster_settings(cluster.url).with_(claim_min_idle_ms=1500)
    keys = Keys(s.prefix, s.partitions)
    streams = keys.request_streams("text_action")

    async def scenario() -> None:
        r = connect_async(s)
        try:
            publisher = Publisher(r, s)
            for sid in session_per_partition(keys).values():
                await publisher.publish(ask("held").model_copy(update={"session_id": sid}))
            holder = GroupReader(r, s, streams, "holder")
            thief = GroupReader(r, s, streams, "thief")
            await holder.ensure_groups()
            held = []
            for _ in range(20):
                held += await holder.read(10, 100)
                if len(held) == PARTITIONS:
                    break
            assert {d.partition for d in held} == set(range(PARTITIONS))
            for _ in range(4):  # longer than claim_min_idle_ms, kept alive all along
                await asyncio.sleep(0.5)
                await holder.keep_alive(held)
                assert await thief.reclaim(10) == []
            await asyncio.sleep(2.0)  # the holder went quiet: its messages are up for grabs
            taken = await thief.reclaim(10)
            assert sorted(d.entry_id for d in taken) == sorted(d.entry_id for d in held)
            assert all(d.deliveries == 2 for d in taken)
            assert await holder.settle() == []
        finally:
            await r.aclose()

    asyncio.run(scenario())
