"""A private Redis Cluster of N masters on free local ports, for tests, demos and benchmarks.

Each node is an `EmbeddedRedis` started with cluster mode on and its own bus port; the slots
are split with `redis-cli --cluster create`. Nodes keep their `nodes.conf` (and AOF, when
asked) in their own folder, so `restart(i)` brings a node back with the same identity and
data: the cluster re-forms without a failover.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import List, Optional

import redis

from broker.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server, free_port


def _redis_cli() -> str:
    server = find_redis_server()
    beside = os.path.join(os.path.dirname(server), "redis-cli")
    exe = beside if os.path.exists(beside) else shutil.which("redis-cli")
    if not exe:
        raise EmbeddedRedisError("redis-cli is needed to create a cluster (apt-get install redis-tools)")
    return exe


class EmbeddedCluster:
    """`with EmbeddedCluster(3) as c: c.url` -- a cluster of `masters` nodes, no replicas."""

    def __init__(self, masters: int = 3, appendonly: bool = True, node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        self._tmp = tempfile.TemporaryDirectory(prefix="vlmq-cluster-")
        self.nodes: List[EmbeddedRedis] = []
        for i in range(masters):
            directory = os.path.join(self._tmp.name, f"node{i}")
            os.makedirs(directory)
            args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(free_port()),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # Partitions on the nodes that are up keep working while one node restarts.
                "--cluster-require-full-coverage",
                "no",
            ]
            self.nodes.append(EmbeddedRedis(args=args, directory=directory, appendonly=appendonly))

    @property
    def url(self) -> str:
        """Any node's URL: the cluster client discovers the others from it."""
        return self.nodes[0].url

    @property
    def urls(self) -> List[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        for n in self.nodes:
            n.start()
        out = subprocess.run(
            [
                _redis_cli(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            self.close()
            raise EmbeddedRedisError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        self.wait_ok(timeout)
        return self

    def _client(self, node: EmbeddedRedis) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=5, socket_connect_timeout=5)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports cluster_state:ok and knows all the others."""
        give_up = time.time() + timeout
        while time.time() < give_up:
            try:
                infos = []
                for n in self.nodes:
                    with self._client(n) as r:
                        infos.append(r.cluster("info"))
                if all(
                    i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(self.nodes)
                    for i in infos
                ):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise EmbeddedRedisError(f"cluster did not reach cluster_state:ok within {timeout}s")

    def node_of_slot(self, slot: int) -> int:
        """Index in `nodes` of the node that serves `slot`."""
        with self._client(self.nodes[0]) as r:
            for lo, hi, primary, *_ in r.execute_command("CLUSTER SLOTS"):
                if lo <= slot <= hi:
                    return [n.port for n in self.nodes].index(int(primary[1]))
        raise LookupError(f"no node serves slot {slot}")

    def restart(self, index: int, down_s: float = 0.0, timeout: float = 30.0) -> None:
        """Stop node `index` cleanly, keep it down `down_s` seconds, start it again with the
        same identity and data, and wait for the cluster to be whole again."""
        self.nodes[index].stop()
        if down_s:
            time.sleep(down_s)
        self.nodes[index].start()
        self.wait_ok(timeout)

    def close(self) -> None:
        for n in self.nodes:
            n.close()
        self._tmp.cleanup()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: Optional[BaseException]) -> None:
        self.close()
