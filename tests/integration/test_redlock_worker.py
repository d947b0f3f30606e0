"""A real `celery worker` whose locks live on three Redlock masters: skip, wait, retry.

The worker, its app and the helpers are the ones of test_worker.py and processes.py; only the lock URL
(``CSL_WORKER_LOCK_URL``) and the queue differ.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from celery_singleton_lock.testing import RedisServer, redis_servers
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of, max_overlap, run, worker_app

__all__ = ["run", "worker_app"]  # fixtures shared with test_worker.py

QUEUE = "redlock"


@pytest.fixture(scope="module")
def masters() -> Iterator[list[RedisServer]]:
    with redis_servers(3) as servers:
        yield servers


@pytest.fixture(scope="module")
def redlock_worker(worker_app, redis_url, masters, tmp_path_factory) -> Iterator[Worker]:
    worker = None
    try:
        url = "redlock://" + ",".join(f"127.0.0.1:{m.port}" for m in masters) + "/3"
        worker = Worker(redis_url, tmp_path_factory.mktemp("redlock-worker"), queues=QUEUE,
                        CSL_WORKER_LOCK_URL=url)
        worker.wait_ready(worker_app.app)
        yield worker
    finally:
        if worker is not None:
            worker.stop()


def test_duplicates_are_skipped(redlock_worker, worker_app, run, masters):
    results = [worker_app.sleepy_skip.apply_async((run, 2), queue=QUEUE) for _ in range(4)]
    values = [r.get(timeout=30) for r in results]
    events = events_of(worker_app, run)
    assert count(events, "start") == 1
    assert count(events, "skipped") == 3
    assert sorted(values, key=str) == sorted(["ran", None, None, None], key=str)
    key = worker_app.sleepy_skip.lock_key_for((run, 2), {})
    for master in masters:  # the lock went through every master
        client = redis.Redis.from_url(master.url + "/3")
        assert client.exists("{singleton-lock:" + key + "}:fence")
        client.close()


@pytest.mark.parametrize("task_name", ["sleepy_wait", "sleepy_retry"])
def test_wait_and_retry_run_every_duplicate_one_after_another(
    redlock_worker, worker_app, run, task_name
):
    task = getattr(worker_app, task_name)
    results = [task.apply_async((run, 0.5), queue=QUEUE) for _ in range(4)]
    assert [r.get(timeout=60) for r in results] == ["ran"] * 4
    events = events_of(worker_app, run)
    assert count(events, "start") == 4
    assert max_overlap(events) == 1
