"""ZooKeeper over TLS: the URL's ``use_ssl`` and ``ca`` reach kazoo, on a server of our own
whose secure port speaks only TLS; a certificate that did not sign the server's is refused
within the connect timeout, and digest credentials never show in an error."""

from __future__ import annotations

import gc
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_singleton_lock import LockBackendUnavailable, connect
from celery_singleton_lock.testing import ZooKeeperEnsemble
from tests.conftest import wait_until
from tests.integration.certificates import self_signed


def _keystore(directory: Path, name: str) -> Path:
    """A self-signed certificate; its key and it in ``<name>.pem`` (ZooKeeper's PEM
    keystore). Returns the certificate."""
    key, certificate = self_signed(directory, name)
    (directory / f"{name}.pem").write_bytes(key.read_bytes() + certificate.read_bytes())
    return certificate


@pytest.fixture(scope="module")
def certificates() -> Iterator[tuple[Path, Path, Path]]:
    """(the server's PEM keystore, its certificate, a certificate that did not sign it)."""
    with tempfile.TemporaryDirectory(prefix="csl-zookeeper-tls-") as name:
        directory = Path(name)
        certificate = _keystore(directory, "server")
        other = _keystore(directory, "other")
        yield directory / "server.pem", certificate, other


@pytest.fixture(scope="module")
def tls_ensemble(certificates) -> Iterator[ZooKeeperEnsemble]:
    with ZooKeeperEnsemble(size=1, tls_keystore=str(certificates[0])) as ensemble:
        yield ensemble


def test_locks_and_waiting_work_over_tls_with_the_certificate_verified(
    tls_ensemble, certificates, unique_key
):
    backend = connect(f"{tls_ensemble.secure_url}?use_ssl=true&ca={certificates[1]}", connect_timeout=5)
    try:
        held = backend.acquire(unique_key, ttl=5)
        assert held is not None
        got: list[object] = []
        waiter = threading.Thread(
            target=lambda: got.append(backend.acquire(unique_key, ttl=5, blocking=True, timeout=10))
        )
        waiter.start()
        wait_until(lambda: len(backend.lock_info(unique_key)) == 1, 5, "the lock to be listed")
        assert backend.release(held)
        waiter.join(15)
        assert got
        assert got[0] is not None
        assert got[0].fencing_token > held.fencing_token  # type: ignore[attr-defined]
        assert backend.release(got[0])  # type: ignore[arg-type]
    finally:
        backend.close()


def test_the_secure_port_refuses_a_client_without_tls(tls_ensemble, unique_key):
    # The port speaks only TLS: the test above could not have passed in the clear.
    backend = connect(tls_ensemble.secure_url, connect_timeout=2)
    try:
        with pytest.raises(LockBackendUnavailable):
            backend.acquire(unique_key, ttl=5)
    finally:
        backend.close()


# kazoo's create_tcp_connection re-raises a failed handshake's SSLError without closing
# the socket (kazoo 2.11), and the log records of its retries (kept by pytest's log
# capture) hold the frames that hold them: they are dropped and collected here, inside
# this test, where only their "unclosed" warning is ignored.
UNCLOSED_SSL_SOCKET = "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"


@pytest.mark.filterwarnings(UNCLOSED_SSL_SOCKET)
def test_a_certificate_that_did_not_sign_the_server_is_refused_in_bounded_time(
    tls_ensemble, certificates, unique_key, caplog
):
    url = f"zookeeper://someone:s3cret-pw@{tls_ensemble.secure_url.removeprefix('zookeeper://')}"
    backend = connect(f"{url}?use_ssl=true&ca={certificates[2]}", connect_timeout=2)
    started = time.monotonic()
    try:
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(unique_key, ttl=5)
    finally:
        backend.close()
    caplog.clear()
    gc.collect()
    assert time.monotonic() - started < 2 + 1.5  # the connect timeout, not kazoo's retries
    text = str(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text
    assert "s3cret-pw" not in text
    assert "someone:***@" in text
