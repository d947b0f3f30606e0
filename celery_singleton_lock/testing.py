"""Helpers for tests that need a real lock server: ours and our users'.

:class:`RedisServer` starts a throw-away ``redis-server`` on a free 127.0.0.1 port,
waits until it answers, and stops it by PID. Installed as a pytest plugin, this module
also offers the ``redis_server`` fixture (one server per test session) and
``memory_lock_backend`` (a fresh in-process backend per test).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery_singleton_lock.backends.memory import MemoryBackend

__all__ = ["RedisServer", "free_port"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` process of our own on a free loopback port.

    Nothing is persisted; the process is stopped by its PID on :meth:`stop` (or at
    the end of the ``with`` block).

    :param port: the port to listen on; a free one when omitted.
    :param password: ``requirepass`` for the server, to test authenticated URLs.
    :param tls: paths ``(cert_file, key_file, ca_file)``: also listen for TLS on
        :attr:`tls_port` (``rediss://``).
    :param unix_socket: also listen on a unix socket (:attr:`unix_url`).
    :param startup_timeout: seconds to wait for the server to answer ``PING``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        tls: tuple[str, str, str] | None = None,
        unix_socket: bool = False,
        startup_timeout: float = 10.0,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.unix_socket = unix_socket
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        if self._dir is None or not self.unix_socket:
            raise RuntimeError("start the server with unix_socket=True first")
        return f"unix://{self._dir.name}/redis.sock"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            msg = "redis-server is not on PATH (Debian: apt-get install redis-server)"
            raise RuntimeError(msg)
        self._dir = tempfile.TemporaryDirectory(prefix="csl-redis-")
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--loglevel", "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            cert, key, ca = self.tls
            args += [
                "--tls-port", str(self.tls_port), "--tls-cert-file", cert,
                "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
            ]
        if self.unix_socket:
            args += ["--unixsocket", f"{self._dir.name}/redis.sock", "--unixsocketperm", "700"]
        # A session of its own: Ctrl-C in a terminal reaches the program, which stops the
        # server in order, instead of killing the server under it.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                msg = f"redis-server exited at start-up on port {self.port}: {err.strip()}"
                raise RuntimeError(msg)
            if self._answers_ping():
                return
            time.sleep(0.01)  # start-up readiness: nothing to wait on but the socket itself
        self.stop()
        msg = f"redis-server on port {self.port} did not answer within {self.startup_timeout}s"
        raise RuntimeError(msg)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP the server (a hung node)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server by PID and wait for it; safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


try:  # the fixtures only when pytest is there; the launcher works without it
    import pytest
except ImportError:  # pragma: no cover
    pass
else:

    @pytest.fixture(scope="session")
    def redis_server() -> Iterator[RedisServer]:
        """One ``redis-server`` of our own for the whole test session."""
        with RedisServer() as server:
            yield server

    @pytest.fixture
    def memory_lock_backend() -> Iterator[MemoryBackend]:
        """A fresh in-process lock backend (no server), closed after the test."""
        from celery_singleton_lock.backends.memory import MemoryBackend

        backend = MemoryBackend()
        try:
            yield backend
        finally:
            backend.close()
