"""Shared fixtures of the unit tests: no servers, no sleeps, no background threads.

* ``FakeClock`` replaces the monotonic clock of a :class:`MemoryBackend`; time only
  moves when a test calls ``advance()``.
* ``keeper`` (autouse) gives every test a fresh :class:`LeaseKeeper` whose renewal
  thread is never started: the tests drive renewal by calling ``renew_due()``
  themselves, so no thread can renew (or declare lost) a lock behind their back.
* ``eager_app`` is a Celery app in eager mode whose lock backend is the in-process
  memory backend on a fake clock, with a key prefix of its own (the ``memory://``
  store is shared by every app of the process).
* ``queue_app``: the same, not eager: calls are published to kombu's in-memory broker,
  on a queue of this test's own (a test module adds the settings it needs).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, _state
from celery.utils.dispatch import Signal

from celery_singleton_lock import lease
from celery_singleton_lock.lease import LeaseKeeper


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


class _ThreadNeverStarted:
    """Stands in for the keeper's thread, so ``track()`` does not start the real one."""

    def is_alive(self) -> bool:
        return True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def keeper(monkeypatch: pytest.MonkeyPatch) -> LeaseKeeper:
    """This test's lease keeper (the one ``LeaseKeeper.for_process()`` returns)."""
    fresh = LeaseKeeper()
    fresh._thread = _ThreadNeverStarted()  # type: ignore[assignment]
    monkeypatch.setattr(lease._keeper, "current", (os.getpid(), fresh))
    return fresh


@pytest.fixture(autouse=True)
def _forget_shared_tasks() -> Iterator[None]:
    """Undo Celery's process-wide registration of the tasks a test decorates.

    ``@app.task`` (shared by default) and ``shared_task`` add the task to every app
    finalized later in the process; a task decorated with a bad option on purpose would
    make every later ``app.finalize()`` raise.
    """
    before = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(before)


@pytest.fixture
def record_signal(request: pytest.FixtureRequest) -> Callable[[Signal], list[dict[str, Any]]]:
    """``record_signal(sig)`` returns the list every later sending of ``sig`` lands in."""

    def record(signal: Signal) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []

        def receiver(sender: Any = None, **kwargs: Any) -> None:
            kwargs.pop("signal", None)
            calls.append({"sender": sender, **kwargs})

        signal.connect(receiver, weak=False)
        request.addfinalizer(lambda: signal.disconnect(receiver))
        return calls

    return record


def _memory_locked_app(clock: FakeClock) -> Celery:
    app = Celery("unit", broker="memory://", backend="cache+memory://")
    app.conf.singleton_lock_backend = "memory://"
    app.conf.singleton_lock_prefix = f"unit-{uuid.uuid4().hex}"
    app.conf.singleton_lock_backend_options = {"clock": clock}
    return app


@pytest.fixture
def eager_app(clock: FakeClock) -> Iterator[Celery]:
    app = _memory_locked_app(clock)
    app.conf.task_always_eager = True
    yield app
    app.close()


@pytest.fixture
def queue_app(clock: FakeClock) -> Iterator[Celery]:
    app = _memory_locked_app(clock)
    app.conf.task_default_queue = f"q-{uuid.uuid4().hex}"
    yield app
    app.close()
