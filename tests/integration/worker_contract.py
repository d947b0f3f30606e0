"""Every contention policy on a real ``celery worker``, written once for every lock backend.

A backend's worker test module subclasses :class:`WorkerPolicyContract` and provides two
fixtures:

* ``policy_worker``: a :class:`PolicyWorker`, a started worker (tasks of
  ``tests.integration.worker_app``) whose locks live on that backend, and its queue;
* ``lock_url``: the URL of those locks, for an observer in the test process.

The tasks sleep (their bodies record start and end events in Redis), so these tests see
what a user sees: how many bodies ran, whether two ever overlapped, what each caller got.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from celery_singleton_lock import connect
from celery_singleton_lock.backends.base import LockBackend
from tests.conftest import wait_until
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of, max_overlap

__all__ = ["PolicyWorker", "WorkerPolicyContract", "policy_worker_on", "take_and_release"]


@dataclass(frozen=True)
class PolicyWorker:
    """A running worker of ``tests.integration.worker_app`` and the queue it consumes."""

    app: ModuleType
    worker: Worker
    queue: str
    pool: str = "prefork"

    def send(self, task_name: str, *args: Any) -> Any:
        return getattr(self.app, task_name).apply_async(args, queue=self.queue)

    def events(self, run: str) -> list[list[Any]]:
        return events_of(self.app, run)


@contextmanager
def policy_worker_on(
    lock_url: str, redis_url: str, log_dir: Path, queue: str, *, pool: str = "prefork"
) -> Iterator[PolicyWorker]:
    """A worker of ``tests.integration.worker_app`` (broker and events on ``redis_url``)
    whose locks live at ``lock_url``, consuming ``queue``; stopped on exit."""
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    app_module = importlib.import_module("tests.integration.worker_app")
    worker = Worker(redis_url, log_dir, queues=queue, pool=pool, CSL_WORKER_LOCK_URL=lock_url)
    try:
        worker.wait_ready(app_module.app)
        yield PolicyWorker(app_module, worker, queue, pool)
    finally:
        worker.stop()


def take_and_release(backend: LockBackend, key: str) -> bool:
    """Whether ``key`` is free, found by taking it (and releasing it at once)."""
    held = backend.acquire(key, ttl=5)
    if held is None:
        return False
    backend.release(held)
    return True


class WorkerPolicyContract:
    """Skip, Wait, Retry and Raise on duplicates, and a killed run's lock freed early."""

    @pytest.fixture
    def observer(self, lock_url: str) -> Iterator[LockBackend]:
        backend = connect(lock_url)
        yield backend
        backend.close()

    def test_duplicates_are_skipped(self, policy_worker: PolicyWorker) -> None:
        run = uuid.uuid4().hex[:12]
        results = [policy_worker.send("sleepy_skip", run, 1.5) for _ in range(4)]
        values = [r.get(timeout=30) for r in results]
        events = policy_worker.events(run)
        assert count(events, "start") == 1
        assert count(events, "skipped") == 3
        assert sorted(values, key=str) == sorted(["ran", None, None, None], key=str)

    @pytest.mark.parametrize("task_name", ["sleepy_wait", "sleepy_retry"])
    def test_wait_and_retry_run_every_duplicate_one_after_another(
        self, policy_worker: PolicyWorker, task_name: str
    ) -> None:
        run = uuid.uuid4().hex[:12]
        results = [policy_worker.send(task_name, run, 0.4) for _ in range(4)]
        assert [r.get(timeout=60) for r in results] == ["ran"] * 4
        events = policy_worker.events(run)
        assert count(events, "start") == 4
        assert max_overlap(events) == 1
        if policy_worker.pool == "threads":
            assert len({e[2] for e in events}) == 1  # threads of one process excluded each other

    def test_raise_fails_the_duplicate_with_lock_contended(self, policy_worker: PolicyWorker) -> None:
        run = uuid.uuid4().hex[:12]
        first = policy_worker.send("sleepy_raise", run, 1.5)
        wait_until(lambda: count(policy_worker.events(run), "start") == 1, 20, "the first run to start")
        second = policy_worker.send("sleepy_raise", run, 1.5)
        with pytest.raises(Exception) as info:
            second.get(timeout=30)
        assert type(info.value).__name__ == "LockContended"
        assert first.get(timeout=30) == "ran"

    def test_revoke_terminate_frees_the_lock_and_the_new_child_still_locks(
        self, policy_worker: PolicyWorker, observer: LockBackend
    ) -> None:
        # The main process releases the killed task's lock with a client of its own, then
        # forks a replacement child, which must open its own (never its parent's sockets,
        # sessions or gRPC channels, which hang or break in a fork).
        if policy_worker.pool != "prefork":
            pytest.skip("revoke(terminate=True) kills pool processes: prefork only")
        run = uuid.uuid4().hex[:12]
        result = policy_worker.send("killable", run)  # lock_ttl=30
        wait_until(lambda: count(policy_worker.events(run), "start") == 1, 20, "the task to start")
        key = policy_worker.app.killable.lock_key_for((run,), {})
        assert observer.acquire(key, ttl=5) is None
        policy_worker.app.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
        wait_until(
            lambda: take_and_release(observer, key), 5, "the killed task's lock to be free (its TTL is 30 s)"
        )
        after = uuid.uuid4().hex[:12]
        results = [policy_worker.send("sleepy_wait", after, 0.2) for _ in range(6)]
        assert [r.get(timeout=60) for r in results] == ["ran"] * 6
        assert max_overlap(policy_worker.events(after)) == 1
