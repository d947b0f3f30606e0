"""End to end: real `celery worker` processes (prefork), Redis broker, Redis locks."""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
import uuid

import pytest
import redis

from celery_singleton_lock import connect
from tests.conftest import wait_until
from tests.integration.processes import Worker


@pytest.fixture(scope="module")
def worker_app(redis_url):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    module = importlib.import_module("tests.integration.worker_app")
    return module


@pytest.fixture(scope="module")
def worker(worker_app, redis_url, tmp_path_factory):
    worker = Worker(redis_url, tmp_path_factory.mktemp("worker"))
    try:
        worker.wait_ready(worker_app.app)
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:12]


def events_of(worker_app, run: str) -> list[list]:
    return [json.loads(e) for e in worker_app.events.lrange(f"events:{run}", 0, -1)]


def max_overlap(events: list[list]) -> int:
    running = peak = 0
    timeline = [e for e in events if e[0] in ("start", "end")]
    for kind, _, _, _ in sorted(timeline, key=lambda e: (e[1], e[0] == "start")):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


def count(events: list[list], kind: str) -> int:
    return sum(1 for e in events if e[0] == kind)


def test_duplicates_are_skipped_and_their_callers_do_not_hang(worker, worker_app, run):
    results = [worker_app.sleepy_skip.delay(run, 2) for _ in range(4)]
    values = [r.get(timeout=30) for r in results]
    events = events_of(worker_app, run)
    assert count(events, "start") == 1
    assert count(events, "skipped") == 3
    assert sorted(values, key=str) == sorted(["ran", None, None, None], key=str)
    assert all(r.state == "SUCCESS" for r in results)


def test_positional_keyword_and_default_arguments_share_one_lock(worker, worker_app, run):
    calls = [
        worker_app.keyed.delay(run, 1, 2),
        worker_app.keyed.delay(run, 1, b=2),
        worker_app.keyed.delay(run, a=1),
    ]
    for call in calls:
        call.get(timeout=30)
    events = events_of(worker_app, run)
    assert count(events, "start") == 1
    assert count(events, "skipped") == 2


@pytest.mark.parametrize("task_name", ["sleepy_wait", "sleepy_retry"])
def test_wait_and_retry_run_every_duplicate_one_after_another(worker, worker_app, run, task_name):
    task = getattr(worker_app, task_name)
    results = [task.delay(run, 0.5) for _ in range(4)]
    assert [r.get(timeout=60) for r in results] == ["ran"] * 4
    events = events_of(worker_app, run)
    assert count(events, "start") == 4
    assert max_overlap(events) == 1


def test_raise_fails_the_duplicate_with_lock_contended(worker, worker_app, run):
    first = worker_app.sleepy_raise.delay(run, 2)
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the first run to start")
    second = worker_app.sleepy_raise.delay(run, 2)
    with pytest.raises(Exception) as info:
        second.get(timeout=30)
    assert type(info.value).__name__ == "LockContended"
    assert second.state == "FAILURE"
    assert first.get(timeout=30) == "ran"


def test_renewal_keeps_the_lock_of_a_task_longer_than_its_ttl(worker, worker_app, run):
    first = worker_app.long_renewing.delay(run, 7)
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the long task to start")
    started = events_of(worker_app, run)[0][1]
    time.sleep(max(0.0, started + 4.5 - time.time()))  # 4.5 s in: past two 2-s TTLs
    duplicate = worker_app.long_renewing.delay(run, 7)
    assert duplicate.get(timeout=30) is None  # skipped: the lock was still held
    assert first.get(timeout=30) is True  # and never reported lost
    assert count(events_of(worker_app, run), "skipped") == 1


def test_a_task_notices_its_lock_deleted_under_it(worker, worker_app, run, redis_url):
    result = worker_app.watch_loss.delay(run)
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
    key = worker_app.watch_loss.lock_key_for((run,), {})
    locks = redis.Redis.from_url(redis_url + "/3")
    assert locks.delete("{singleton-lock:" + key + "}") == 1
    assert result.get(timeout=20) == "LockLost"
    lost = [k.decode() for k in worker_app.events.lrange("lost", 0, -1)]
    assert key in lost
    wait_until(lambda: f"lock {key!r} lost" in worker.log.read_text(), 5, "the ERROR log line")
    lines = worker.log.read_text().splitlines()
    assert "ERROR" in next(line for line in lines if f"lock {key!r} lost" in line)


def test_self_retry_is_not_skipped_by_its_own_lock(worker, worker_app, run):
    assert worker_app.retry_self.delay(run).get(timeout=30) == "ran after 1 retry"
    events = events_of(worker_app, run)
    assert [e[3] for e in events if e[0] == "start"] == [0, 1]
    assert count(events, "skipped") == 0


def test_redelivered_message_does_not_bypass_the_held_lock(worker, worker_app, run):
    task_id = str(uuid.uuid4())
    worker_app.sleepy_skip.apply_async((run, 1.5), task_id=task_id)
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the first delivery to start")
    worker_app.sleepy_skip.apply_async((run, 1.5), task_id=task_id)  # the same message again
    assert worker_app.sleepy_skip.AsyncResult(task_id).get(timeout=30) == "ran"
    wait_until(
        lambda: f"{task_id}] already finished" in worker.log.read_text(), 20,
        "the redelivery to wait for the first run and then stand down",
    )
    events = events_of(worker_app, run)
    assert count(events, "start") == 1
    assert count(events, "skipped") == 0


def test_revoke_terminate_frees_the_lock_at_once(worker, worker_app, run, redis_url):
    result = worker_app.killable.delay(run)
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
    key = "{singleton-lock:" + worker_app.killable.lock_key_for((run,), {}) + "}"
    locks = redis.Redis.from_url(redis_url + "/3")
    assert locks.exists(key)
    owner = json.loads(locks.get(key).split(b"\n", 1)[1])
    worker_app.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
    wait_until(lambda: not locks.exists(key), 5, "the main process to release the killed task's lock")
    # Released by the main process (a SIGKILLed process releases nothing), after the death.
    worker.wait_for_log(
        f"released the lock of {worker_app.killable.name}[{result.id}]: "
        f"its pool process {owner['pid']} is dead", 5,
    )


def test_sigkilled_worker_frees_its_lock_at_ttl_expiry_not_before(worker_app, redis_url, run, tmp_path):
    crashing = Worker(redis_url, tmp_path, queues="crash", concurrency=1)
    try:
        crashing.wait_ready(worker_app.app)
        worker_app.crashable.apply_async((run,), queue="crash")
        wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
        key = worker_app.crashable.lock_key_for((run,), {})
        locks = redis.Redis.from_url(redis_url + "/3")
        crashing.kill()
        expires_at = time.monotonic() + locks.pttl("{singleton-lock:" + key + "}") / 1000
    finally:
        crashing.stop()
    backend = connect(redis_url + "/3")
    held = backend.acquire(key, ttl=5, blocking=True, timeout=40)
    acquired_at = time.monotonic()
    assert held is not None
    assert acquired_at >= expires_at - 0.05
    assert acquired_at - expires_at < 0.5
    backend.release(held)


def test_unreachable_lock_server_fails_closed(worker_app, redis_url, run, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    unreachable = f"redis://:secret-pw@127.0.0.1:{port}/0"
    guarded = Worker(
        redis_url, tmp_path, queues="guarded", concurrency=1, CSL_WORKER_LOCK_URL=unreachable,
        CSL_WORKER_OUTAGE_TIMEOUT="3", CSL_WORKER_OUTAGE_BACKOFF_MAX="0.5",
    )
    try:
        guarded.wait_ready(worker_app.app)
        started = time.monotonic()
        result = worker_app.guarded.apply_async((run,), queue="guarded")
        with pytest.raises(Exception) as info:
            result.get(timeout=30)
        assert time.monotonic() - started >= 3  # retried for the whole outage budget
        assert type(info.value).__name__ == "LockBackendUnavailable"
        assert "singleton_lock_outage_timeout=3s" in str(info.value)
        assert result.state == "FAILURE"
        assert count(events_of(worker_app, run), "start") == 0  # the body never ran unlocked
        log = guarded.log.read_text()
        # More retries than the task's max_retries=1: outages have a budget of their own.
        assert "retry 2 in" in log
        assert "secret-pw" not in log
        assert "secret-pw" not in str(info.value)
    finally:
        guarded.stop()


def test_threads_pool_skips_and_waits_like_prefork(worker_app, redis_url, run, tmp_path):
    threaded = Worker(redis_url, tmp_path, queues="threads", concurrency=4, pool="threads")
    try:
        threaded.wait_ready(worker_app.app)
        skipped = [worker_app.sleepy_skip.apply_async((run, 1.5), queue="threads") for _ in range(4)]
        values = [r.get(timeout=30) for r in skipped]
        assert sorted(values, key=str) == sorted(["ran", None, None, None], key=str)
        waiting = [worker_app.sleepy_wait.apply_async((run, 0.3), queue="threads") for _ in range(4)]
        assert [r.get(timeout=30) for r in waiting] == ["ran"] * 4
        events = events_of(worker_app, run)
        assert count(events, "skipped") == 3
        assert count(events, "start") == 1 + 4
        assert max_overlap(events) == 1
        assert len({e[2] for e in events}) == 1  # one process: the threads shared its keeper
    finally:
        threaded.stop()
