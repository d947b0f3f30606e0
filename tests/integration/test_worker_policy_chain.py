"""A policy chain through a real `celery worker`: ``Retry(max_retries=1, ...) | Skip(...)``.

The worker, its app and the helpers are the ones of test_worker.py and processes.py; this
worker has a queue (and one process) of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_singleton_lock import connect
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of, run, worker_app

__all__ = ["run", "worker_app"]  # fixtures shared with test_worker.py

QUEUE = "policy-chain"


@pytest.fixture(scope="module")
def chain_worker(worker_app, redis_url, tmp_path_factory) -> Iterator[Worker]:
    worker = Worker(redis_url, tmp_path_factory.mktemp("chain-worker"), queues=QUEUE, concurrency=1)
    try:
        worker.wait_ready(worker_app.app)
        yield worker
    finally:
        worker.stop()


def test_retry_then_skip_retries_once_then_ends_as_skipped(chain_worker, worker_app, redis_url, run):
    task = worker_app.retry_then_skip
    held = connect(redis_url + "/3").acquire(task.lock_key_for((run,), {}), ttl=60)
    assert held is not None  # another worker's run, for as long as this test lasts
    try:
        result = task.apply_async((run,), queue=QUEUE)
        assert result.get(timeout=30) == "retried, skipped"
        assert result.state == "SUCCESS"
    finally:
        held.release()
    events = events_of(worker_app, run)
    assert count(events, "start") == 0  # the body never ran
    assert [e[3] for e in events if e[0] == "skipped"] == [result.id]  # task_skipped, once
    log = chain_worker.log.read_text()
    # Celery's line for each retry the policy asked for: exactly one, the first of one.
    retries = [line for line in log.splitlines() if f"[{result.id}] retry:" in line]
    assert len(retries) == 1, log[-3000:]
    assert "retry 1 of 1 in " in retries[0]
    assert "gave up" not in log
