"""Fault paths of the Celery glue, with real workers: real redeliveries (acks_late and a
visibility timeout shorter than the task), killed pool processes, soft revokes, a lock
server that goes away, and retry jitter across prefork processes (issue 9, items 1-3,
10, 11)."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import uuid
from pathlib import Path

import pytest
import redis

from celery_singleton_lock import connect
from celery_singleton_lock.testing import RedisServer
from tests.conftest import wait_until
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of, max_overlap


@pytest.fixture(scope="module")
def worker_app(redis_url):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    return importlib.import_module("tests.integration.worker_app")


@pytest.fixture(scope="module")
def redelivery_app(redis_url, worker_app):
    return importlib.import_module("tests.integration.redelivery_app")


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:12]


def pool_children(worker: Worker) -> list[int]:
    """The pids of a prefork worker's pool processes."""
    path = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def lock_owner(redis_url: str, key: str) -> dict | None:
    value = redis.Redis.from_url(redis_url + "/3").get("{singleton-lock:" + key + "}")
    return None if value is None else json.loads(value.split(b"\n", 1)[1])


# -- redeliveries: the broker hands the same message to a second worker ------------------


@pytest.fixture(scope="module")
def worker_pair(redelivery_app, redis_url, tmp_path_factory):
    """Worker A takes queues ra and rc, worker B only ra; one pool process each."""
    logs = tmp_path_factory.mktemp("redelivery")
    app = "tests.integration.redelivery_app"
    first = Worker(redis_url, logs, queues="ra,rc", concurrency=1, app=app)
    second = Worker(redis_url, logs, queues="ra", concurrency=1, app=app)
    try:
        first.wait_ready()
        second.wait_ready()
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_a_killed_redelivered_copy_never_frees_the_live_runs_lock(
    worker_pair, redelivery_app, redis_url, run
):
    first, second = worker_pair
    task = redelivery_app.long_acks_late
    key = task.lock_key_for((run, 8), {})
    result = task.apply_async((run, 8), queue="ra")
    wait_until(lambda: count(events_of(redelivery_app, run), "start") == 1, 20, "the first run")
    runner = lock_owner(redis_url, key)
    assert runner is not None
    assert runner["task_id"] == result.id
    # The visibility timeout passes; the broker redelivers the message to the idle B,
    # whose copy waits behind the lock of its own task id.
    waiting = f"{result.id}] is a redelivery while its first delivery holds"
    copy = second if runner["pid"] in pool_children(first) else first
    copy.wait_for_log(waiting, 20)
    (copy_child,) = pool_children(copy)
    os.kill(copy_child, signal.SIGKILL)
    wait_until(lambda: "WorkerLostError" in copy.text() or "exited" in copy.text(), 20, "the loss report")
    wait_until(lambda: pool_children(copy) and pool_children(copy) != [copy_child], 20, "a new child")
    # The live run's lock is untouched: another caller of the same arguments is refused.
    assert lock_owner(redis_url, key) == runner
    assert connect(redis_url + "/3").acquire(key, ttl=5) is None
    assert result.get(timeout=30) == "ran"
    events = events_of(redelivery_app, run)
    assert count(events, "start") == 1
    assert max_overlap(events) == 1
    assert "released the lock of" not in copy.text()


def test_a_redelivery_after_success_does_not_run_the_body_again(worker_pair, redelivery_app, run):
    first, _ = worker_pair  # rc is A's alone: every copy waits until the run has ended
    task = redelivery_app.long_acks_late
    result = task.apply_async((run, 3), queue="rc")
    assert result.get(timeout=30) == "ran"
    first.wait_for_log(f"{result.id}] already finished; ignoring its redelivery", 20)
    broker = redis.Redis.from_url(first_broker(redelivery_app))
    wait_until(lambda: broker.llen("rc") == 0 and not broker.hlen("unacked"), 20, "every copy acked")
    assert count(events_of(redelivery_app, run), "start") == 1
    assert result.state == "SUCCESS"


def first_broker(app_module) -> str:
    return app_module.app.conf.broker_url


# -- revoke and time limits: the lock stays with a body that still runs ------------------


@pytest.fixture(scope="module")
def worker(worker_app, redis_url, tmp_path_factory):
    worker = Worker(redis_url, tmp_path_factory.mktemp("faults"), queues="faults", concurrency=3)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def test_a_soft_revoke_leaves_the_lock_with_the_body_that_goes_on(worker, worker_app, redis_url, run):
    task = worker_app.stubborn
    key = task.lock_key_for((run, 3), {})
    result = task.apply_async((run, 3), queue="faults")
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
    worker_app.app.control.revoke(result.id, terminate=True, signal="SIGUSR1")
    wait_until(lambda: count(events_of(worker_app, run), "soft-limit") == 1, 10, "the soft limit")
    # The body caught it and works on for 3 s more: its lock must stay, renewed (TTL 2).
    assert lock_owner(redis_url, key) is not None
    duplicate = task.apply_async((run, 3), queue="faults")
    assert duplicate.get(timeout=10) is None  # skipped
    wait_until(lambda: count(events_of(worker_app, run), "end") == 1, 15, "the body to end")
    events = events_of(worker_app, run)
    assert count(events, "start") == 1
    assert count(events, "skipped") == 1
    wait_until(lambda: lock_owner(redis_url, key) is None, 5, "the release after the body")


def test_revoke_with_the_default_signal_frees_the_lock_long_before_its_ttl(
    worker, worker_app, redis_url, run
):
    result = worker_app.killable.apply_async((run,), queue="faults")
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
    key = worker_app.killable.lock_key_for((run,), {})
    assert lock_owner(redis_url, key) is not None
    worker_app.app.control.revoke(result.id, terminate=True)  # SIGTERM: the body ends
    wait_until(lambda: lock_owner(redis_url, key) is None, 5, "the release (TTL is 30 s)")


def test_a_hard_time_limit_frees_the_lock_when_the_pool_has_killed_the_process(
    worker, worker_app, redis_url, run
):
    task = worker_app.hard_limited
    result = task.apply_async((run,), queue="faults")
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
    key = task.lock_key_for((run,), {})
    assert lock_owner(redis_url, key) is not None
    with pytest.raises(Exception) as info:
        result.get(timeout=20)
    assert type(info.value).__name__ == "TimeLimitExceeded"
    # The pool ends the process (SIGTERM, then SIGKILL); whichever frees the lock, it is
    # free once the process is gone, long before its 30 s TTL.
    wait_until(lambda: lock_owner(redis_url, key) is None, 8, "the release (TTL is 30 s)")


# -- retries: jitter per process, budgets of their own --------------------------------------


def test_contention_retries_spread_across_processes_and_say_which_retry(
    worker, worker_app, redis_url, run
):
    task = worker_app.sleepy_retry
    key = task.lock_key_for((run, 0.1), {})
    backend = connect(redis_url + "/3")
    holder = backend.acquire(key, ttl=30)
    assert holder is not None
    try:
        results = [task.apply_async((run, 0.1), queue="faults") for _ in range(3)]
        pattern = re.compile(
            rf"/(ForkPoolWorker-\d+)\] Task {task.name}\[[0-9a-f-]+\] retry: Retry in ([0-9.]+)s"
        )

        def first_countdowns() -> dict[str, str]:
            """Each pool process's first drawn countdown."""
            found: dict[str, str] = {}
            for process, countdown in pattern.findall(worker.text()):
                found.setdefault(process, countdown)
            return found

        wait_until(lambda: len(first_countdowns()) == 3, 30, "a retry in each of three processes")
    finally:
        backend.release(holder)
    assert [r.get(timeout=30) for r in results] == ["ran"] * 3
    # Forked from one parent, the processes must not draw the same "random" countdown.
    assert len(set(first_countdowns().values())) == 3, first_countdowns()
    log = worker.text()
    assert "retry 1 of 200" in log
    assert "gave up" not in log


@pytest.fixture
def lock_server():
    with RedisServer() as server:
        yield server


def test_a_lock_server_outage_is_ridden_out_without_spending_the_tasks_own_retries(
    worker_app, redis_url, run, tmp_path, lock_server
):
    lock_server.stop()
    outage = Worker(
        redis_url, tmp_path, queues="outage", concurrency=1,
        CSL_WORKER_LOCK_URL=lock_server.url + "/0", CSL_WORKER_OUTAGE_TIMEOUT="60",
        CSL_WORKER_OUTAGE_BACKOFF_MAX="0.5",
    )
    try:
        outage.wait_ready()
        outage.wait_for_log("the lock server does not answer", 10)
        result = worker_app.retries_once.apply_async((run,), queue="outage")
        # More outage retries than the task's max_retries=1 allows for its own.
        wait_until(lambda: outage.text().count("retry 3 in") >= 1, 20, "three outage retries")
        assert count(events_of(worker_app, run), "start") == 0  # never ran unlocked
        lock_server.start()
        assert result.get(timeout=30) == "ran after 1 retry"
        log = outage.text()
        assert log.count("the lock server does not answer") == 1
        assert "refused" in log  # a closed port reads as refused, not as a timeout
        assert "gave up" not in log
    finally:
        outage.stop()
