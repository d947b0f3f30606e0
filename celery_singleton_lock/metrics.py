"""Prometheus metrics of a worker's locks, served on ``/metrics`` by its main process.

Off unless ``singleton_lock_metrics_port`` is set: then nothing is started and
``prometheus_client`` is never imported. Set, a worker serves, on
``singleton_lock_metrics_address`` (127.0.0.1) and that port:

====================================================  =========  =======================
metric                                                type       labels
====================================================  =========  =======================
``singleton_lock_acquired_total``                     counter    task, backend
``singleton_lock_contended_total``                    counter    task, backend, outcome
``singleton_lock_wait_seconds``                       histogram  task, backend
``singleton_lock_hold_seconds``                       histogram  task, backend
``singleton_lock_renew_round_trip_seconds``           histogram  backend
``singleton_lock_lost_total``                         counter    task, backend
``singleton_lock_backend_errors_total``               counter    task, backend, operation
====================================================  =========  =======================

``outcome`` is skipped, retried, waited or raised; ``operation`` acquire, renew or
release; ``backend`` the lock server's URL scheme. Never a key: keys carry arguments, and
a label per key would make one time series per call.

How the counts of every pool process get into one ``/metrics``
---------------------------------------------------------------

A prefork worker's locks are taken in its pool processes, and those come and go (a crash,
``max_tasks_per_child``). The main process owns the Prometheus registry and the HTTP
server; each pool process pushes what it observes to the main process, one short line
per observation over a Unix socket in a directory of the worker's own (mode 0700, made at
start, removed at shutdown). The main process adds them up as they come, so the counts of
a pool process outlive it and never go backwards; nothing is left to clean up when a
child dies, and pool processes never import ``prometheus_client``. (prometheus_client's
multiprocess mode was the other way: it needs ``PROMETHEUS_MULTIPROC_DIR`` set for the
whole process before anything imports it, turns the user's own metrics multiprocess too,
and keeps a file per pool process that ever lived, which ``max_tasks_per_child`` turns
into thousands.) A pool process never waits for the main one beyond a short send
timeout: a line it cannot send is dropped, with one WARNING per process.

In a solo, threads or gevent worker the tasks run in the main process, which records
directly.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import selectors
import shutil
import socket
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.signals import celeryd_after_setup, worker_shutdown

from celery_singleton_lock import _observe, signals
from celery_singleton_lock._per_process import PerProcess
from celery_singleton_lock.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from celery_singleton_lock.lease import HeldLock
    from celery_singleton_lock.policies import Contention

__all__ = ["METRIC_NAMES", "MetricsServer", "MetricsSettings", "read_metrics_settings"]

logger = logging.getLogger("celery_singleton_lock.metrics")

PORT_OPTION = "singleton_lock_metrics_port"
ADDRESS_OPTION = "singleton_lock_metrics_address"
DEFAULT_ADDRESS = "127.0.0.1"
#: sysexits.h: configuration error (as pools.py).
EX_CONFIG = 78
#: A pool process waits at most this long to hand a line to the main process.
SEND_TIMEOUT = 0.25

_TASK = ("task", "backend")
#: name -> (kind, exposed name, labels, help, buckets): what the main process registers.
_SPECS: dict[str, tuple[str, str, tuple[str, ...], str, tuple[float, ...]]] = {
    "acquired": ("counter", "singleton_lock_acquired", _TASK, "Locks acquired by task runs.", ()),
    "contended": (
        "counter", "singleton_lock_contended", (*_TASK, "outcome"),
        "Task runs that found their lock taken, by what their policy did.", (),
    ),
    "wait": (
        "histogram", "singleton_lock_wait_seconds", _TASK,
        "Seconds a task run waited for a taken lock before it got it.",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf")),
    ),
    "hold": (
        "histogram", "singleton_lock_hold_seconds", _TASK,
        "Seconds a task run held its lock (acquisition to release).",
        (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf")),
    ),
    "renew": (
        "histogram", "singleton_lock_renew_round_trip_seconds", ("backend",),
        "Seconds of one renewal round trip of the lease keeper (all due locks of a backend).",
        (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, float("inf")),
    ),
    "lost": ("counter", "singleton_lock_lost", _TASK, "Leases proved gone while their holder ran.", ()),
    "superseded": (
        "counter", "singleton_lock_superseded", _TASK,
        "Debounced calls that ended as skipped: a later call of their key runs instead.", (),
    ),
    "errors": (
        "counter", "singleton_lock_backend_errors", (*_TASK, "operation"),
        "Lock server errors, by operation (acquire, renew, release).", (),
    ),
}
#: The names as scraped (counters get ``_total``).
METRIC_NAMES = tuple(
    exposed + ("_total" if kind == "counter" else "") for kind, exposed, *_ in _SPECS.values()
)


@dataclass(frozen=True)
class MetricsSettings:
    """Where the worker serves ``/metrics``."""

    port: int
    address: str = DEFAULT_ADDRESS


def _setting(conf: Any, name: str) -> Any:
    value = conf.get(name)
    return conf.get(name.upper()) if value is None else value


def read_metrics_settings(conf: Any) -> MetricsSettings | None:
    """The metrics settings of ``conf``; None when ``singleton_lock_metrics_port`` is unset.

    :raises ConfigurationError: naming the bad setting.
    """
    port = _setting(conf, PORT_OPTION)
    if port is None or port == "":
        return None
    if isinstance(port, str) and port.strip().isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        msg = f"{PORT_OPTION} must be a port number from 1 to 65535, got {port!r}"
        raise ConfigurationError(msg, option=PORT_OPTION)
    address = _setting(conf, ADDRESS_OPTION)
    if address is None:
        address = DEFAULT_ADDRESS
    if not isinstance(address, str) or not address.strip():
        msg = f"{ADDRESS_OPTION} must be an IP address or host name to listen on, got {address!r}"
        raise ConfigurationError(msg, option=ADDRESS_OPTION)
    return MetricsSettings(port=port, address=address.strip())


class _Series:
    """The Prometheus metrics, in a registry of their own (the user's default registry is
    left alone), updated by name: ``apply("acquired", ("shop.sync", "redis"), 1)``."""

    def __init__(self) -> None:
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._apply: dict[str, tuple[Any, str, int]] = {}
        self._updates: dict[tuple[str, tuple[str, ...]], Callable[[float], None]] = {}
        for name, (kind, exposed, labels, documentation, buckets) in _SPECS.items():
            if kind == "counter":
                metric: Any = prometheus_client.Counter(
                    exposed, documentation, labels, registry=self.registry
                )
                self._apply[name] = (metric, "inc", len(labels))
            else:
                metric = prometheus_client.Histogram(
                    exposed, documentation, labels, registry=self.registry, buckets=buckets
                )
                self._apply[name] = (metric, "observe", len(labels))

    def apply(self, name: str, labels: tuple[str, ...], value: float) -> None:
        # The labelled child's inc/observe, found once per label set (a dict look-up
        # then, instead of prometheus_client's checks and lock for every observation).
        update = self._updates.get((name, labels))
        if update is None:
            metric, method, arity = self._apply[name]
            if len(labels) != arity or not all(isinstance(label, str) for label in labels):
                raise ValueError(f"{name}: labels {labels!r}")
            update = self._updates[(name, labels)] = getattr(metric.labels(*labels), method)
        update(value)


class MetricsObserver(_observe.Observer):
    """Turns what the lock flow reports into observations, handed to ``sink``."""

    def __init__(self, sink: Callable[[str, tuple[str, ...], float], None]) -> None:
        self.sink = sink
        # When each run's lock was taken, for its hold time (weak: a dropped handle goes).
        # No lock of ours around it: one made in the main process could be copied held
        # into a forked child; each handle is added and popped once, under the GIL.
        self._taken_at: weakref.WeakKeyDictionary[HeldLock, tuple[float, str, str]] = (
            weakref.WeakKeyDictionary()
        )

    def acquired(self, task: Any, held: HeldLock) -> None:
        labels = (_observe.task_name(task), _observe.backend_scheme(held.backend))
        self._taken_at[held] = (time.perf_counter(), *labels)
        self.sink("acquired", labels, 1)

    def contention_ended(
        self, task: Any, contention: Contention, outcome: str, seconds: float
    ) -> None:
        labels = (_observe.task_name(task), _observe.backend_scheme(contention.backend))
        self.sink("contended", (*labels, outcome), 1)
        if outcome == "waited":
            self.sink("wait", labels, seconds)

    def superseded(self, task: Any, key: str, later_task_id: str) -> None:
        # The debounce records live in the task's own lock server (its "queued" keys).
        backend = task.lock_options().settings.backend("queued")
        self.sink("superseded", (_observe.task_name(task), _observe.backend_scheme(backend)), 1)

    def renewed(self, backend: Any, seconds: float) -> None:
        self.sink("renew", (_observe.backend_scheme(backend),), seconds)

    def backend_error(self, task: Any, url: str | None, operation: str) -> None:
        labels = (_observe.task_name(task), _observe.backend_scheme(url or ""))
        self.sink("errors", (*labels, operation), 1)

    def released(self, held: HeldLock) -> None:
        taken = self._taken_at.pop(held, None)
        if taken is not None:
            started, task, scheme = taken
            self.sink("hold", (task, scheme), time.perf_counter() - started)

    def lost(self, held: HeldLock) -> None:
        labels = (_observe.task_name(held.sender), _observe.backend_scheme(held.backend))
        self.sink("lost", labels, 1)


class _ChildSender:
    """A pool process's side of the channel: one connection per process, made on first
    use (a forked child makes its own), lines dropped rather than waited for."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sockets: PerProcess[_Connection] = PerProcess(lambda: _Connection(path), threading.Lock)

    def __call__(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._sockets.get().send(json.dumps([name, labels, value]).encode() + b"\n")


class _Connection:
    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._guard = threading.Lock()  # the keeper thread and task threads both send
        self._warned = False

    def send(self, line: bytes) -> None:
        with self._guard:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(SEND_TIMEOUT)
                    sock.connect(self.path)
                    self._sock = sock
                self._sock.sendall(line)
            except OSError as exc:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "metrics: pool process %s could not reach the worker's main process "
                        "(%s); its observations are dropped until it can", os.getpid(), exc,
                    )


class MetricsServer:
    """The main process's side: the registry, ``/metrics`` and the pool processes' channel.

    :param settings: where to listen.
    :param pool_processes: True for a prefork worker, whose tasks run in child processes.
    :raises ConfigurationError: when prometheus_client is missing or the address cannot be
        listened on, naming the setting.
    """

    def __init__(self, settings: MetricsSettings, *, pool_processes: bool) -> None:
        try:
            self.series = _Series()
        except ImportError as exc:
            msg = (
                f"{PORT_OPTION} is set, but prometheus_client is not installed: "
                "pip install 'celery-singleton-lock[metrics]'"
            )
            raise ConfigurationError(msg, option=PORT_OPTION) from exc
        import prometheus_client

        self.settings = settings
        self.pid = os.getpid()
        try:
            self._http, self._http_thread = prometheus_client.start_http_server(
                settings.port, settings.address, registry=self.series.registry
            )
        except OSError as exc:
            option = ADDRESS_OPTION if not _is_port_taken(exc) else PORT_OPTION
            msg = (
                f"cannot serve metrics on {settings.address}:{settings.port} "
                f"({PORT_OPTION}, {ADDRESS_OPTION}): {exc}"
            )
            raise ConfigurationError(msg, option=option) from exc
        self._lock = threading.Lock()
        self._channel_dir: str | None = None
        self._listener: socket.socket | None = None
        self._stop_reading = threading.Event()
        self.sender: Callable[[str, tuple[str, ...], float], None] = self.record
        if pool_processes:
            self._open_channel()
        self.observer = MetricsObserver(self._sink)

    @property
    def url(self) -> str:
        host = self.settings.address
        shown = f"[{host}]" if _is_ipv6(host) else host
        return f"http://{shown}:{self._http.server_port}/metrics"

    def record(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self.series.apply(name, labels, value)

    def _sink(self, name: str, labels: tuple[str, ...], value: float) -> None:
        # The main process records directly; a pool process (forked after we started)
        # pushes to the main process.
        if os.getpid() == self.pid:
            self.record(name, labels, value)
        else:
            self.sender(name, labels, value)

    def _open_channel(self) -> None:
        self._channel_dir = tempfile.mkdtemp(prefix="celery-singleton-lock-metrics-")
        path = os.path.join(self._channel_dir, "pool.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self.sender = _ChildSender(path)
        threading.Thread(
            target=self._read_pool_processes, name="celery-singleton-lock-metrics", daemon=True
        ).start()

    def _read_pool_processes(self) -> None:
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        pending: dict[socket.socket, bytes] = {}
        while not self._stop_reading.is_set():
            for key, _ in selector.select(timeout=1.0):
                if key.data is None:
                    try:
                        conn, _ = self._listener.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    pending[conn] = b""
                    selector.register(conn, selectors.EVENT_READ, True)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the pool process exited: its counts stay in ours
                    selector.unregister(conn)
                    conn.close()
                    pending.pop(conn, None)
                    continue
                *lines, pending[conn] = (pending[conn] + data).split(b"\n")
                for line in lines:
                    self._apply_line(line)
        selector.close()

    def _apply_line(self, line: bytes) -> None:
        try:
            name, labels, value = json.loads(line)
            if not isinstance(value, int | float) or not isinstance(labels, list):
                raise TypeError(value)
            self.record(name, tuple(labels), float(value))
        except (ValueError, TypeError, KeyError) as exc:
            logger.debug("metrics: dropped a line from a pool process (%s): %r", exc, line[:200])

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._stop_reading.set()
        if self._listener is not None:
            self._listener.close()
        if self._channel_dir is not None:
            shutil.rmtree(self._channel_dir, ignore_errors=True)


def _is_port_taken(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.EADDRINUSE, errno.EACCES)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


#: The server of this worker's main process, when metrics are on.
server: MetricsServer | None = None


def _on_lock_released(sender: Any = None, held: Any = None, **_: Any) -> None:
    if server is not None and held is not None:
        server.observer.released(held)


def _on_lock_lost(sender: Any = None, held: Any = None, **_: Any) -> None:
    if server is not None and held is not None:
        server.observer.lost(held)


def start(app: Any, *, pool_processes: bool) -> MetricsServer | None:
    """Start serving ``app``'s metrics in this (the worker's main) process, if configured.

    :returns: the server, or None when ``singleton_lock_metrics_port`` is unset.
    :raises ConfigurationError: naming the bad setting.
    """
    global server  # noqa: PLW0603 - one server per worker process
    settings = read_metrics_settings(app.conf)
    if settings is None:
        return None
    server = MetricsServer(settings, pool_processes=pool_processes)
    _observe.install(server.observer)
    signals.lock_released.connect(_on_lock_released, weak=False, dispatch_uid="csl.metrics.released")
    signals.lock_lost.connect(_on_lock_lost, weak=False, dispatch_uid="csl.metrics.lost")
    logger.info("serving lock metrics on %s", server.url)
    return server


def stop() -> None:
    """Stop this process's metrics server (worker shutdown)."""
    global server  # noqa: PLW0603
    if server is None:
        return
    signals.lock_released.disconnect(dispatch_uid="csl.metrics.released")
    signals.lock_lost.disconnect(dispatch_uid="csl.metrics.lost")
    _observe.uninstall(server.observer)
    server.close()
    server = None


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _start_with_worker(instance: Any = None, **_: Any) -> None:
    from celery_singleton_lock.pools import pool_name

    if instance is None or server is not None:
        return
    try:
        start(instance.app, pool_processes=pool_name(instance.pool_cls) == "prefork")
    except ConfigurationError as exc:
        logger.critical("%s", exc)
        raise SystemExit(EX_CONFIG) from exc


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_with_worker(**_: Any) -> None:
    if server is not None and server.pid == os.getpid():
        stop()
