"""Every contention policy, unchanged, on a real prefork worker whose locks live in etcd."""

from __future__ import annotations

import importlib
import os
import uuid

import pytest

from celery_singleton_lock import connect
from tests.conftest import wait_until
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of, max_overlap


@pytest.fixture(scope="module")
def etcd_worker(redis_url, etcd_url, tmp_path_factory):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    app_module = importlib.import_module("tests.integration.worker_app")
    worker = Worker(
        redis_url, tmp_path_factory.mktemp("worker-etcd"), queues="etcd", CSL_WORKER_LOCK_URL=etcd_url
    )
    try:
        worker.wait_ready(app_module.app)
        yield app_module
    finally:
        worker.stop()


def test_duplicates_are_skipped(etcd_worker):
    run = uuid.uuid4().hex[:12]
    results = [etcd_worker.sleepy_skip.apply_async((run, 2), queue="etcd") for _ in range(4)]
    values = [r.get(timeout=30) for r in results]
    events = events_of(etcd_worker, run)
    assert count(events, "start") == 1
    assert count(events, "skipped") == 3
    assert sorted(values, key=str) == sorted(["ran", None, None, None], key=str)


@pytest.mark.parametrize("task_name", ["sleepy_wait", "sleepy_retry"])
def test_wait_and_retry_run_every_duplicate_one_after_another(etcd_worker, task_name):
    run = uuid.uuid4().hex[:12]
    task = getattr(etcd_worker, task_name)
    results = [task.apply_async((run, 0.5), queue="etcd") for _ in range(4)]
    assert [r.get(timeout=60) for r in results] == ["ran"] * 4
    events = events_of(etcd_worker, run)
    assert count(events, "start") == 4
    assert max_overlap(events) == 1


def _free(backend, key: str) -> bool:
    held = backend.acquire(key, ttl=5)
    if held is None:
        return False
    backend.release(held)
    return True


def test_revoke_terminate_frees_the_lock_and_the_new_child_still_locks(etcd_worker, etcd_url):
    # The main process releases the killed task's lock with a gRPC client of its own, then
    # forks a replacement child: that child must still be able to use etcd.
    run = uuid.uuid4().hex[:12]
    result = etcd_worker.killable.apply_async((run,), queue="etcd")
    wait_until(lambda: count(events_of(etcd_worker, run), "start") == 1, 20, "the task to start")
    key = etcd_worker.killable.lock_key_for((run,), {})
    observer = connect(etcd_url)
    assert observer.acquire(key, ttl=5) is None
    etcd_worker.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
    wait_until(lambda: _free(observer, key), 5, "the killed task's lock to be free (its TTL is 30 s)")
    observer.close()
    after = uuid.uuid4().hex[:12]
    results = [etcd_worker.sleepy_wait.apply_async((after, 0.2), queue="etcd") for _ in range(6)]
    assert [r.get(timeout=60) for r in results] == ["ran"] * 6
    assert max_overlap(events_of(etcd_worker, after)) == 1
