"""The ACL file (ops/acl) on a real redis-server: the worker and a tenant's agent serve end
to end with only their own rights, and an agent cannot read another session's replies,
consume or read requests, forge replies, cause replies in another tenant's streams, or run
admin commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import uuid
from typing import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.retry import Retry

from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AgentClient, AsyncAgentClient
from ops.acl import cli as acl_cli
from ops.acl.rules import render, session_prefix
from ops.inspect import snapshot
from schemas.codec import packb
from schemas.messages import ChatMessage, TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings, wait_for

pytestmark = pytest.mark.timeout(120)

PREFIX = "vlmq"
TENANTS = ["acme", "globex"]
PASSWORDS = {
    name: f"pw-{name}-{uuid.uuid4().hex[:8]}"
    for name in ["vlmq-admin", "vlmq-worker", "vlmq-observer", "vlmq-gateway", "agent-acme", "agent-globex"]
}
KEYS = Keys(PREFIX)
REQ = KEYS.request_stream("text_action", 0)
ACME_REQ = KEYS.request_stream("text_action", 0, tenant="acme")
GLOBEX_REQ = KEYS.request_stream("text_action", 0, tenant="globex")


@pytest.fixture(scope="module")
def server(redis_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("acl") / "users.acl"
    path.write_text(render(PREFIX, TENANTS, PASSWORDS))
    with EmbeddedRedis(args=["--aclfile", str(path)]) as srv:
        yield srv


def url(server: EmbeddedRedis, user: str) -> str:
    return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}/0"


def conn(server: EmbeddedRedis, user: str) -> redis.Redis:
    return redis.Redis.from_url(url(server, user))


def anonymous(port: int, url: str = "") -> redis.Redis:
    """A client that gives up at once (the default retries make a refusal take seconds)."""
    no_retry = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 5}
    return redis.Redis.from_url(url, **no_retry) if url else redis.Redis(port=port, **no_retry)


def denied(call: Callable[[], object]) -> bool:
    try:
        call()
    except NoPermissionError:
        return True
    return False


def _text(content: str) -> TextActionRequest:
    return TextActionRequest(messages=[ChatMessage(role="user", content=content)])


@pytest.fixture(scope="module")
def served(server):
    """A worker logged in as vlmq-worker; two tenants' sessions each answered once."""
    worker_broker = BrokerSettings(url=url(server, "vlmq-worker"), prefix=PREFIX, claim_min_idle_ms=1000)
    with WorkerThread(synthetic_settings(worker_broker, kinds=("text_action",), tenants=tuple(TENANTS))):
        replies = {}
        for tenant in TENANTS:
            broker = BrokerSettings(url=url(server, f"agent-{tenant}"), prefix=PREFIX, tenant=tenant)
            session = f"{session_prefix(tenant)}robot-1"
            with AgentClient(session, settings=broker) as client:
                replies[tenant] = client.request(_text(f"hello from {tenant}"), timeout=30)
        yield replies


def test_worker_and_agents_serve_end_to_end_with_their_own_rights(served) -> None:
    for tenant, reply in served.items():
        assert reply.ok and reply.result.text == f"hello from {tenant}"
        assert reply.session_id == f"{tenant}.robot-1"


def test_agent_cannot_read_another_sessions_replies(server, served) -> None:
    acme = conn(server, "agent-acme")
    own = KEYS.reply_stream("acme.robot-1")
    assert len(acme.xrevrange(own)) == 1  # its own: allowed
    for other in ("globex.robot-1", "acme2.robot-1", "robot-1", "x.acme.robot-1"):
        stream = KEYS.reply_stream(other)
        assert denied(lambda s=stream: acme.xrange(s)), other
        assert denied(lambda s=stream: acme.xread({s: "0"})), other
        assert denied(lambda s=stream: acme.xrevrange(s, count=1)), other
    # A client for a session outside its tenant fails at start, not silently.
    broker = BrokerSettings(url=url(server, "agent-acme"), prefix=PREFIX)

    async def foreign() -> None:
        client = AsyncAgentClient("globex.robot-1", settings=broker)
        try:
            with pytest.raises(NoPermissionError):
                await client.start()
        finally:
            await client.close()

    asyncio.run(foreign())

    async def wrong_tenant() -> None:
        client = AsyncAgentClient("globex.robot-1", settings=broker, tenant="acme")
        try:
            with pytest.raises(ValueError, match="not of tenant"):
                await client.start()
        finally:
            await client.close()

    asyncio.run(wrong_tenant())


def test_a_tenant_cannot_cause_replies_in_another_tenants_streams(server, served) -> None:
    """acme writes, by hand, an entry naming a globex session into the one stream it may
    write: the worker answers nobody (acme cannot be told apart from globex's session) and
    dead-letters it; globex's reply stream gets nothing. The shared stream and globex's own
    are closed to acme altogether."""
    acme = conn(server, "agent-acme")
    admin = conn(server, "vlmq-admin")
    victim = KEYS.reply_stream("globex.robot-1")
    before = admin.xlen(victim)
    forged = _text("spoofed").model_copy(update={"session_id": "globex.robot-1"})
    fields = {"v": "1", "kind": "text_action", "rid": forged.request_id, "sid": "globex.robot-1"}
    acme.xadd(ACME_REQ, {**fields, "body": packb(forged.to_wire())})
    letters = KEYS.dead_letters("text_action", 0)

    def dead_lettered() -> bool:
        return any(f.get(b"rid") == forged.request_id.encode() for _, f in admin.xrange(letters))

    assert wait_for(dead_lettered, 30)
    letter = next(f for _, f in admin.xrange(letters) if f.get(b"rid") == forged.request_id.encode())
    assert letter[b"code"] == b"invalid" and b"not of tenant 'acme'" in letter[b"reason"]
    assert admin.xlen(victim) == before
    assert admin.xlen(ACME_REQ) == 0  # acked and deleted: not left for a retry
    assert denied(lambda: acme.xadd(GLOBEX_REQ, {**fields, "body": b"x"}))
    assert denied(lambda: acme.xadd(REQ, {**fields, "body": b"x"}))


def test_agent_cannot_consume_or_read_requests(server, served) -> None:
    acme = conn(server, "agent-acme")
    group = BrokerSettings().group
    # of its own streams it may see only the bookkeeping (is an entry waiting or pending?)
    assert acme.xinfo_groups(ACME_REQ)
    acme.xpending(ACME_REQ, group)
    assert denied(lambda: acme.xrange(ACME_REQ))
    assert denied(lambda: acme.xinfo_stream(ACME_REQ))
    assert denied(lambda: acme.xinfo_groups(GLOBEX_REQ))
    assert denied(lambda: acme.xrange(REQ))
    assert denied(lambda: acme.xread({REQ: "0"}))
    assert denied(lambda: acme.xreadgroup(group, "thief", {REQ: ">"}))
    assert denied(lambda: acme.xautoclaim(REQ, group, "thief", 0))
    assert denied(lambda: acme.xclaim(REQ, group, "thief", 0, ["0-1"]))
    assert denied(lambda: acme.xack(REQ, group, "0-1"))
    assert denied(lambda: acme.xdel(REQ, "0-1"))
    assert denied(lambda: acme.xgroup_create(REQ, "thieves", id="0"))
    assert denied(lambda: acme.xpending(REQ, group))
    assert denied(lambda: acme.delete(REQ))


def test_agent_cannot_forge_replies_or_touch_other_keys(server, served) -> None:
    acme = conn(server, "agent-acme")
    assert denied(lambda: acme.xadd(KEYS.reply_stream("globex.robot-1"), {"rid": "x", "body": b"forged"}))
    assert denied(lambda: acme.xadd(KEYS.reply_stream("acme.robot-1"), {"rid": "x", "body": b"forged"}))
    assert denied(lambda: acme.xadd(KEYS.dead_letters("text_action", 0), {"x": "y"}))
    assert denied(lambda: acme.hset(KEYS.meta(), "partitions", 7))
    assert denied(lambda: acme.hset(KEYS.worker("fake"), "name", "fake"))
    assert denied(lambda: acme.set("anything", "x"))
    assert denied(lambda: acme.get("anything"))


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "appendonly", "no"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "agent-acme", "+@all"),
        ("CLIENT", "KILL", "TYPE", "normal"),
        ("CLIENT", "LIST"),
        ("BGSAVE",),
        ("REPLICAOF", "127.0.0.1", "1"),
        ("SHUTDOWN", "NOSAVE"),
        ("MONITOR",),
        ("INFO",),
        ("EVAL", "return redis.call('FLUSHALL')", "0"),
        ("SCRIPT", "FLUSH"),
        ("SUBSCRIBE", "x"),
        ("MODULE", "LIST"),
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_agent_cannot_run_admin_commands(server, served, command) -> None:
    acme = conn(server, "agent-acme")
    assert denied(lambda: acme.execute_command(*command))
    assert conn(server, "vlmq-admin").ping()  # the server is still there, with its data
    assert conn(server, "vlmq-admin").exists(KEYS.reply_stream("acme.robot-1"))


def test_worker_user_is_scoped_to_the_prefix(server, served) -> None:
    worker = conn(server, "vlmq-worker")
    assert denied(lambda: worker.execute_command("FLUSHALL"))
    assert denied(lambda: worker.execute_command("CONFIG", "GET", "*"))
    assert denied(lambda: worker.set("other-app:key", "x"))
    assert denied(lambda: worker.xadd("other-app:stream", {"a": "b"}))
    assert denied(lambda: worker.execute_command("ACL", "LIST"))


def test_observer_reads_everything_and_writes_nothing(server, served) -> None:
    observer = conn(server, "vlmq-observer")
    snap = snapshot(observer, BrokerSettings(prefix=PREFIX))  # what `vlmq inspect` shows
    assert sorted(s["stream"] for s in snap["streams"]) == sorted([REQ, ACME_REQ, GLOBEX_REQ])
    assert observer.xrange(KEYS.reply_stream("globex.robot-1"))
    assert observer.time()  # `vlmq record` starts its tap at the server's clock
    assert denied(lambda: observer.xadd(REQ, {"a": "b"}))
    assert denied(lambda: observer.delete(KEYS.reply_stream("globex.robot-1")))
    assert denied(lambda: observer.xgroup_destroy(REQ, BrokerSettings().group))
    assert denied(lambda: observer.execute_command("FLUSHALL"))
    assert denied(lambda: observer.execute_command("CONFIG", "SET", "maxmemory", "1"))


def test_gateway_reads_any_reply_but_consumes_nothing(server, served) -> None:
    gateway = conn(server, "vlmq-gateway")
    assert gateway.xrevrange(KEYS.reply_stream("globex.robot-1"))
    list(gateway.scan_iter(match=KEYS.workers_pattern()))  # permitted: it lists the workers
    assert denied(lambda: gateway.xreadgroup(BrokerSettings().group, "g", {REQ: ">"}))
    assert denied(lambda: gateway.xrange(REQ))
    assert denied(lambda: gateway.execute_command("FLUSHALL"))


def test_nobody_gets_in_without_a_password(server) -> None:
    with pytest.raises((AuthenticationError, ResponseError)):
        anonymous(server.port).ping()
    with pytest.raises((AuthenticationError, ResponseError)):
        anonymous(server.port, f"redis://agent-acme:wrong@127.0.0.1:{server.port}/0").ping()


def test_committed_example_is_the_rendered_file_and_loads(redis_server) -> None:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops", "acl")
    with open(os.path.join(here, "example.acl")) as f:
        assert f.read() == render(PREFIX, TENANTS)
    with EmbeddedRedis(args=["--aclfile", os.path.join(here, "example.acl")]) as srv:
        with pytest.raises((AuthenticationError, ResponseError)):
            anonymous(srv.port).ping()


def test_vlmq_acl_takes_passwords_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLMQ_ACL_PASSWORD_AGENT_ACME", "s3cret")
    out = tmp_path / "users.acl"
    args = argparse.Namespace(prefix="vlmq", tenant=["acme"], out=str(out))
    assert acl_cli.run(args) == 0
    text = out.read_text()
    assert "s3cret" not in text  # stored hashed
    line = next(x for x in text.splitlines() if x.startswith("user agent-acme "))
    assert line.startswith("user agent-acme on #")
    assert "user vlmq-worker off " in text
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    with pytest.raises(ValueError):
        render("vlmq", ["acme.*"])
    with pytest.raises(ValueError):
        render("vl*mq", [])
