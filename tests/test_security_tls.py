"""TLS end to end (rediss://): a CA, a server and a client certificate made by the test; a
real `vlmq worker` process and an agent talk to a TLS-only redis-server that requires
client certificates. Plain TCP, a missing client certificate, a client certificate from
another CA, and a server the client does not trust are all refused."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import uuid
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.connection import connect_sync
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AgentClient
from schemas.messages import ChatMessage, TextActionRequest
from tests.helpers import start_worker_process, stop_process, wait_for

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    issuer: Optional[Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]],
    ca: bool = False,
    server: bool = False,
) -> Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Dict[str, str]:
    crt, pem = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pem.chmod(0o600)
    return {"cert": str(crt), "key": str(pem)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Dict[str, Dict[str, str]]:
    d = tmp_path_factory.mktemp("pki")
    ca = _issue("vlmq test CA", None, ca=True)
    rogue_ca = _issue("rogue CA", None, ca=True)
    return {
        "ca": _write(d, "ca", *ca),
        "rogue_ca": _write(d, "rogue-ca", *rogue_ca),
        "server": _write(d, "server", *_issue("redis", ca, server=True)),
        "client": _write(d, "client", *_issue("vlmq client", ca)),
        "rogue_client": _write(d, "rogue-client", *_issue("intruder", rogue_ca)),
    }


@pytest.fixture(scope="module")
def tls_server(redis_server, pki):
    with EmbeddedRedis(
        tls=True, tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"], tls_ca=pki["ca"]["cert"]
    ) as server:
        yield server


def _broker(server: EmbeddedRedis, pki, prefix: str) -> BrokerSettings:
    return BrokerSettings(
        url=server.url,
        prefix=prefix,
        tls_ca=pki["ca"]["cert"],
        tls_cert=pki["client"]["cert"],
        tls_key=pki["client"]["key"],
        claim_min_idle_ms=1000,
    )


def test_worker_process_and_agent_over_tls(tls_server, pki) -> None:
    assert tls_server.url.startswith("rediss://")
    broker = _broker(tls_server, pki, f"tls{uuid.uuid4().hex[:6]}")
    worker = start_worker_process(
        broker,
        "--backend",
        "synthetic",
        "--kinds",
        "text_action",
        "--name",
        "tls-worker",
        "--tls-ca",
        broker.tls_ca,
        "--tls-cert",
        broker.tls_cert,
        "--tls-key",
        broker.tls_key,
    )
    try:
        r = connect_sync(broker)
        assert wait_for(
            lambda: r.exists(Keys(broker.prefix).worker("tls-worker")) or worker.poll() is not None, 60
        )
        assert worker.poll() is None, worker.stdout.read()
        with AgentClient("tls-session", settings=broker) as client:
            for i in range(5):
                msg = ChatMessage(role="user", content=f"over tls {i}")
                reply = client.request(TextActionRequest(step=i, messages=[msg]), timeout=30)
                assert reply.ok and reply.result.text == f"over tls {i}"
                assert reply.worker == "tls-worker"
    finally:
        stop_process(worker, signal.SIGKILL)


def _plain_client(url: str, **ssl) -> redis.Redis:
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=5, **ssl)


def test_plain_tcp_is_refused(tls_server) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        _plain_client(f"redis://127.0.0.1:{tls_server.port}/0").ping()


def test_client_without_a_certificate_is_refused(tls_server, pki) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        _plain_client(tls_server.url, ssl_ca_certs=pki["ca"]["cert"]).ping()


def test_client_certificate_from_another_ca_is_refused(tls_server, pki) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        _plain_client(
            tls_server.url,
            ssl_ca_certs=pki["ca"]["cert"],
            ssl_certfile=pki["rogue_client"]["cert"],
            ssl_keyfile=pki["rogue_client"]["key"],
        ).ping()


def test_server_not_signed_by_the_trusted_ca_is_refused(tls_server, pki) -> None:
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
        _plain_client(
            tls_server.url,
            ssl_ca_certs=pki["rogue_ca"]["cert"],
            ssl_certfile=pki["client"]["cert"],
            ssl_keyfile=pki["client"]["key"],
        ).ping()


def test_the_good_client_gets_in(tls_server, pki) -> None:
    assert _plain_client(
        tls_server.url,
        ssl_ca_certs=pki["ca"]["cert"],
        ssl_certfile=pki["client"]["cert"],
        ssl_keyfile=pki["client"]["key"],
    ).ping()
