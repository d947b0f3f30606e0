"""Helpers for our users' tests of their singleton tasks (``celery_singleton_lock.testing``).

* :func:`use_lock_backend` points an app's singleton tasks at a lock backend for a while
  and gives back the very backend those tasks use (``memory://``: the same store, emptied
  at the start and at the end).
* :func:`hold_lock` holds the lock that a call of a task would take, as another worker
  running that call would.
* :func:`locking_disabled` runs singleton task bodies without any lock.
* :func:`record_lock_events` records what the locks did (acquired, contended, skipped,
  released, lost), with assertions such as :meth:`LockEvents.assert_skipped`.
* :func:`lock_server` starts a throw-away lock server: our launcher when the server's
  program is installed, else a container when a Docker daemon answers.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from celery_singleton_lock import signals
from celery_singleton_lock.backends import connect
from celery_singleton_lock.backends.base import LockBackend
from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.config import forget_settings, settings_for
from celery_singleton_lock.errors import LockError
from celery_singleton_lock.lease import HeldLock
from celery_singleton_lock.task import SingletonTask, unlocked_apps

__all__ = [
    "HOLD_LOCK_TASK_ID", "LockEvent", "LockEvents", "LockServerUnavailable", "docker_unavailable_reason",
    "hold_lock", "lock_server", "locking_disabled", "record_lock_events", "use_lock_backend",
]

#: The holder's task id that :func:`hold_lock` stores, so a skip's log line names it.
HOLD_LOCK_TASK_ID = "hold_lock"

_MISSING = object()


def _forget_lock_options(app: Celery) -> None:
    """Make ``app`` and its singleton tasks read their lock settings again."""
    forget_settings(app)
    for task in list(app.tasks.values()):
        if isinstance(task, SingletonTask):
            type(task)._lock_options = None


@contextmanager
def use_lock_backend(app: Celery, url: str = "memory://", **settings: Any) -> Iterator[LockBackend]:
    """Point ``app``'s singleton tasks at ``url`` inside the block, then undo it.

    :param settings: other ``singleton_lock_*`` settings for the block, without the
        prefix: ``use_lock_backend(app, url, ttl=5, on_contention="raise")``.
    :returns: the backend the app's tasks use, in this process (``memory://``: one store
        for the tasks, :func:`hold_lock` and this backend; emptied on entry and exit).
    """
    changes = {"singleton_lock_backend": url, **{f"singleton_lock_{k}": v for k, v in settings.items()}}
    saved = {name: app.conf.changes.get(name, _MISSING) for name in changes}
    app.conf.update(changes)
    _forget_lock_options(app)
    memory = isinstance(url, str) and url.startswith("memory://")
    if memory:
        MemoryBackend.reset(url)
    try:
        yield settings_for(app).backend()
    finally:
        if memory:
            MemoryBackend.reset(url)
        for name, value in saved.items():
            if value is _MISSING:
                app.conf.changes.pop(name, None)
            else:
                app.conf.changes[name] = value
        _forget_lock_options(app)


@contextmanager
def hold_lock(task: SingletonTask, /, *args: Any, **kwargs: Any) -> Iterator[HeldLock]:
    """Hold the lock that ``task(*args, **kwargs)`` would take, until the block ends.

    The lock is taken on the task's own backend, with its ``lock_key`` and ``lock_ttl``,
    and owned by the task id ``"hold_lock"``: inside the block, that call meets a taken
    lock and does what its ``on_contention`` says.

    :raises AssertionError: when that lock is already held.
    """
    options = task.lock_options()
    key = task.lock_key_for(args, kwargs)
    held = options.settings.backend().acquire(key, options.ttl, owner=Owner.here(HOLD_LOCK_TASK_ID))
    if held is None:
        msg = f"hold_lock: the lock {key!r} of {task.name} is already held"
        raise AssertionError(msg)
    try:
        yield held
    finally:
        held.release_quietly()


@contextmanager
def locking_disabled(app: Celery | None = None) -> Iterator[None]:
    """Run the bodies of ``app``'s singleton tasks (None: every app's) without a lock.

    Nothing is asked of the lock server, no key is derived, ``enqueue_once`` publishes
    every call, and ``current_lock()`` is None in the body. For tests of what a task
    does, not of its locking.
    """
    unlocked_apps[app] = unlocked_apps.get(app, 0) + 1
    try:
        yield
    finally:
        unlocked_apps[app] -= 1
        if not unlocked_apps[app]:
            del unlocked_apps[app]


@dataclass(frozen=True)
class LockEvent:
    """One thing a lock did, as its signal told it."""

    #: "acquired", "contended", "skipped", "released" or "lost".
    kind: str
    key: str
    #: The task's id (None for a direct call, or a lock taken through the lock API).
    task_id: str | None
    #: The task's name (None for a lock taken through the lock API).
    task_name: str | None


def _task_id_of(call: Any) -> str:
    """The task id of an ``AsyncResult``/``EagerResult``, or the id itself."""
    task_id = call if isinstance(call, str) else getattr(call, "id", None)
    if not isinstance(task_id, str):
        msg = f"expected an AsyncResult, an EagerResult or a task id, got {call!r}"
        raise TypeError(msg)
    return task_id


@dataclass
class LockEvents:
    """The lock events of this process since recording began, in order."""

    events: list[LockEvent] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[LockEvent]:
        return [event for event in list(self.events) if event.kind == kind]

    @property
    def skipped(self) -> list[LockEvent]:
        """The calls that were skipped because their lock was taken."""
        return self.of_kind("skipped")

    @property
    def acquired(self) -> list[LockEvent]:
        return self.of_kind("acquired")

    @property
    def contended(self) -> list[LockEvent]:
        return self.of_kind("contended")

    def was_skipped(self, call: Any) -> bool:
        task_id = _task_id_of(call)
        return any(event.task_id == task_id for event in self.skipped)

    def assert_skipped(self, call: Any) -> None:
        """Fail unless the call (its result, or its task id) was skipped."""
        if not self.was_skipped(call):
            seen = [f"{e.task_name}[{e.task_id}]" for e in self.skipped] or "none"
            msg = f"call {_task_id_of(call)} was not skipped (skipped calls: {seen})"
            raise AssertionError(msg)

    def assert_not_skipped(self, call: Any) -> None:
        """Fail if the call (its result, or its task id) was skipped."""
        if self.was_skipped(call):
            msg = f"call {_task_id_of(call)} was skipped: its lock was held by another task"
            raise AssertionError(msg)

    def assert_ran_locked(self, call: Any) -> None:
        """Fail unless the call (its result, or its task id) ran holding its lock."""
        task_id = _task_id_of(call)
        if not any(event.task_id == task_id for event in self.acquired):
            msg = f"call {task_id} never held its lock"
            raise AssertionError(msg)


def _task_name(sender: Any) -> str | None:
    return sender.name if isinstance(sender, SingletonTask) else None


@contextmanager
def record_lock_events() -> Iterator[LockEvents]:
    """Record the lock signals of this process (every thread) inside the block."""
    recorded = LockEvents()

    def held_event(kind: str) -> Callable[..., None]:
        def receive(sender: Any = None, key: str = "", held: HeldLock | None = None, **_: Any) -> None:
            task_id = held.owner.task_id if held is not None else None
            recorded.events.append(LockEvent(kind, key, task_id, _task_name(sender)))

        return receive

    def task_event(kind: str) -> Callable[..., None]:
        def receive(sender: Any = None, key: str = "", task_id: str | None = None, **_: Any) -> None:
            recorded.events.append(LockEvent(kind, key, task_id, _task_name(sender)))

        return receive

    receivers = [
        (signals.lock_acquired, held_event("acquired")),
        (signals.lock_released, held_event("released")),
        (signals.lock_lost, held_event("lost")),
        (signals.lock_contended, task_event("contended")),
        (signals.task_skipped, task_event("skipped")),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False)
    try:
        yield recorded
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver)


# -- throw-away lock servers ------------------------------------------------------------


class LockServerUnavailable(RuntimeError):
    """Neither our launcher nor Docker can give a lock server of this kind here."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"no {kind} lock server: {reason}")
        self.kind = kind
        self.reason = reason


def docker_unavailable_reason() -> str | None:
    """None when a Docker daemon answers ``docker.from_env().ping()``, else why not."""
    try:
        import docker
    except ImportError:
        return "the docker package is not installed (pip install 'celery-singleton-lock[testing]')"
    reason = None
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # docker.errors.DockerException and the transport's own errors
        reason = f"no Docker daemon answers (docker.from_env().ping(): {exc})"
    if reason is not None:
        # docker's unix-socket transport leaves the socket of a refused connect open (the
        # traceback held it until here); close it now, quietly, rather than leave a
        # ResourceWarning to whichever test runs next.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    return reason


def _launcher(kind: str) -> Callable[[], AbstractContextManager[Any]]:
    """Our launcher of ``kind``: raises ``RuntimeError`` saying what is missing."""
    from celery_singleton_lock import testing

    if kind == "redis":
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH")
        return testing.RedisServer
    if kind == "etcd":
        testing.etcd_binary()
        return lambda: testing.EtcdCluster(size=1)
    if kind == "zookeeper":
        testing.zookeeper_classpath()
        testing.java_binary()
        return lambda: testing.ZooKeeperEnsemble(size=1)
    if kind == "postgres":
        testing.postgres_bin_dir()
        return testing.PostgresServer
    msg = f"unknown lock server kind {kind!r}; one of {sorted(CONTAINER_IMAGES)}"
    raise ValueError(msg)


@dataclass(frozen=True)
class ContainerImage:
    """How to run one kind of lock server in a container, and its lock URL."""

    image: str
    port: int
    #: The lock URL, from the host and the port Docker mapped.
    url: str
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


CONTAINER_IMAGES = {
    "redis": ContainerImage("redis:7-alpine", 6379, "redis://{host}:{port}/0"),
    "etcd": ContainerImage(
        "quay.io/coreos/etcd:v3.5.17", 2379, "etcd://{host}:{port}",
        command=(
            "/usr/local/bin/etcd", "--listen-client-urls=http://0.0.0.0:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
        ),
    ),
    "zookeeper": ContainerImage("zookeeper:3.9", 2181, "zookeeper://{host}:{port}"),
    "postgres": ContainerImage(
        "postgres:16-alpine", 5432, "postgresql://postgres:test@{host}:{port}/test",
        env=(("POSTGRES_PASSWORD", "test"), ("POSTGRES_DB", "test")),
    ),
}


def _wait_until_it_grants(url: str, timeout: float) -> None:
    """Wait until the server at ``url`` grants a lock (a container answers late)."""
    deadline = time.monotonic() + timeout
    backend = connect(url, connect_timeout=2.0)
    try:
        while True:
            try:
                held = backend.acquire("csl-ready-probe", ttl=5)
            except LockError:
                held = None
            if held is not None:
                held.release()
                return
            if time.monotonic() >= deadline:
                msg = f"the server at {url} granted no lock within {timeout:g}s"
                raise RuntimeError(msg)
            # Start-up readiness: nothing to wait on but the server itself.
            threading.Event().wait(0.5)
    finally:
        backend.close()


@contextmanager
def _container(kind: str, startup_timeout: float) -> Iterator[str]:
    from testcontainers.core.container import DockerContainer

    spec = CONTAINER_IMAGES[kind]
    container = DockerContainer(spec.image).with_exposed_ports(spec.port)
    if spec.command:
        container = container.with_command(list(spec.command))
    for name, value in spec.env:
        container = container.with_env(name, value)
    with container:
        host = container.get_container_host_ip()
        url = spec.url.format(host=host, port=container.get_exposed_port(spec.port))
        _wait_until_it_grants(url, startup_timeout)
        yield url


def require_docker() -> bool:
    """True when ``CSL_REQUIRE_DOCKER=1``: servers come from containers, or fail."""
    return os.environ.get("CSL_REQUIRE_DOCKER", "") == "1"


@contextmanager
def lock_server(kind: str, *, startup_timeout: float = 120.0) -> Iterator[str]:
    """A throw-away lock server of ``kind`` ("redis", "etcd", "zookeeper", "postgres").

    Our launcher (:class:`~celery_singleton_lock.testing.RedisServer`...) when the
    server's program is installed; else a container (testcontainers) when a Docker daemon
    answers. With ``CSL_REQUIRE_DOCKER=1``, always a container.

    :returns: the server's lock URL; the server is stopped when the block ends.
    :raises LockServerUnavailable: with the reason, when neither way works.
    """
    if kind not in CONTAINER_IMAGES:
        msg = f"unknown lock server kind {kind!r}; one of {sorted(CONTAINER_IMAGES)}"
        raise ValueError(msg)
    if require_docker():
        missing = "CSL_REQUIRE_DOCKER=1 asks for a container"
    else:
        try:
            launcher = _launcher(kind)
        except RuntimeError as exc:
            missing = str(exc)
        else:
            with launcher() as server:
                yield str(server.url)
            return
    reason = docker_unavailable_reason()
    if reason is not None:
        raise LockServerUnavailable(kind, f"{missing}, and {reason}")
    with _container(kind, startup_timeout) as url:
        yield url
