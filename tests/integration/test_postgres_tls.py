"""PostgreSQL's TLS and password options reach the server as given in the URL: on a server
of our own that lets the lock user in only over TLS and with a SCRAM password, every
connection the backend opens (the pool's and the listening one) is encrypted, the
certificate is verified when asked, and a refusal says why without the password."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from celery_singleton_lock import LockBackendUnavailable, connect
from celery_singleton_lock.testing import PostgresServer
from tests.conftest import wait_until
from tests.integration.certificates import self_signed

PASSWORD = "s3cret-pw"

#: The lock user may connect only over TLS, with its password; the admin (postgres), over
#: plain TCP without one, so the test can look at the server's side.
HBA = """\
hostssl test    locker   127.0.0.1/32 scram-sha-256
hostnossl test  locker   127.0.0.1/32 reject
host    all     postgres 127.0.0.1/32 trust
local   all     all                   trust
"""


@dataclass(frozen=True)
class TlsServer:
    server: PostgresServer
    certificate: Path  # the server's self-signed certificate: its own CA
    other_certificate: Path  # a certificate that did not sign the server's

    def url(self, query: str, password: str = PASSWORD) -> str:
        return f"postgresql://locker:{password}@127.0.0.1:{self.server.port}/test?{query}"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    # Not under pytest's temporary directory: the server runs as another user (we may be
    # root), which must reach these files through every parent directory.
    with tempfile.TemporaryDirectory(prefix="csl-postgres-tls-") as name:
        yield from _tls_server(Path(name))


def _tls_server(directory: Path) -> Iterator[TlsServer]:
    key, certificate = self_signed(directory, "server")
    _, other = self_signed(directory, "other")
    hba = directory / "pg_hba.conf"
    hba.write_text(HBA)
    server = PostgresServer(settings={
        "ssl": "on", "ssl_cert_file": str(certificate), "ssl_key_file": str(key),
        "hba_file": str(hba), "password_encryption": "scram-sha-256",
    })
    if server._user is not None:  # the server runs unprivileged: its files must be its own
        os.chown(directory, *server._user)
        for path in (key, certificate, hba):
            os.chown(path, *server._user)
    with server:
        with psycopg.connect(server.url, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE locker LOGIN PASSWORD '{PASSWORD}'")
            admin.execute("GRANT CREATE ON SCHEMA public TO locker")
        yield TlsServer(server, certificate, other)


def _encrypted_connections_of_locker(server: PostgresServer) -> tuple[int, int]:
    """(encrypted, all) backend connections of the lock user, as the server sees them."""
    with psycopg.connect(server.url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a "
            "JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'locker'"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_every_connection_is_encrypted_and_the_certificate_verified(tls_server, unique_key):
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={tls_server.certificate}")
    backend = connect(url)
    try:
        held = backend.acquire(unique_key, ttl=10)
        assert held is not None
        # A waiter makes the backend open its listening connection too.
        waited: list[object] = []
        waiter = threading.Thread(
            target=lambda: waited.append(backend.acquire(unique_key, ttl=10, blocking=True, timeout=10))
        )
        waiter.start()
        try:
            wait_until(lambda: _encrypted_connections_of_locker(tls_server.server)[1] >= 2, 10, "a listener")
            encrypted, total = _encrypted_connections_of_locker(tls_server.server)
            assert encrypted == total >= 2
        finally:
            assert backend.release(held)
            waiter.join(15)
        assert waited
        assert waited[0] is not None
        backend.release(waited[0])  # type: ignore[arg-type]
    finally:
        backend.close()


def test_a_plain_connection_is_refused_by_the_server_and_said_so(tls_server, unique_key):
    backend = connect(tls_server.url("sslmode=disable"), connect_timeout=3)
    try:
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(unique_key, ttl=5)
    finally:
        backend.close()
    text = str(info.value)
    assert "turned the connection away" in text
    assert "pg_hba.conf rejects connection" in text
    assert PASSWORD not in text
    assert "***" in text


def test_a_certificate_that_did_not_sign_the_server_is_refused(tls_server, unique_key):
    # As a backend option this time, not in the URL: libpq gets it all the same.
    url = tls_server.url("sslmode=verify-full")
    backend = connect(url, sslrootcert=str(tls_server.other_certificate), connect_timeout=3)
    try:
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(unique_key, ttl=5)
    finally:
        backend.close()
    assert "TLS certificate did not verify" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_a_wrong_password_over_tls_is_refused_without_printing_either_password(tls_server, unique_key):
    wrong = "not-the-password"
    backend = connect(tls_server.url("sslmode=require", password=wrong), connect_timeout=3)
    try:
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(unique_key, ttl=5)
    finally:
        backend.close()
    text = str(info.value)
    assert "refused our credentials" in text
    assert wrong not in text
    assert PASSWORD not in text
