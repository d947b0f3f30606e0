"""rediss:// (TLS) and unix:// URLs, with their options passed through to redis-py."""

from __future__ import annotations

import subprocess

import pytest

from celery_singleton_lock import LockBackendUnavailable, connect
from celery_singleton_lock.testing import RedisServer


def _make_certificates(folder) -> tuple[str, str, str]:
    ca_key, ca, key, csr, cert = (str(folder / n) for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=csl-test-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    extensions = folder / "ext.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", str(extensions))
    return cert, key, ca


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key, ca = _make_certificates(folder)
    with RedisServer(tls=(cert, key, ca), password="tls-pw") as server:
        yield server, ca


def test_rediss_url_with_ca_option_takes_locks(tls_server):
    server, ca = tls_server
    backend = connect(f"rediss://:tls-pw@127.0.0.1:{server.tls_port}/0", ssl_ca_certs=ca)
    with backend.lock("tls", ttl=5, timeout=1) as held:
        assert held.fencing_token > 0
    backend.close()


def test_rediss_without_the_ca_is_refused_and_masks_the_password(tls_server):
    server, _ = tls_server
    backend = connect(f"rediss://:tls-pw@127.0.0.1:{server.tls_port}/0", connect_timeout=2)
    with pytest.raises(LockBackendUnavailable) as info:
        backend.acquire("tls", ttl=5)
    assert "tls-pw" not in str(info.value)
    assert info.value.url == f"rediss://:***@127.0.0.1:{server.tls_port}/0"
    backend.close()


def test_unix_socket_url():
    with RedisServer(unix_socket=True) as server:
        backend = connect(server.unix_url)
        held = backend.acquire("unix", ttl=5)
        assert held is not None
        assert backend.acquire("unix", ttl=5) is None
        assert backend.release(held) is True
        backend.close()
