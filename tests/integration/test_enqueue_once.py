"""enqueue_once end to end: a real Redis broker (messages counted in it) and a real worker.

``queued_report`` goes to the ``once-idle`` queue, which the worker consumes only when a
test asks it to (remote control ``add_consumer``), so queued messages can be counted as
the length of the broker's list for that queue.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid

import pytest
import redis

from tests.conftest import wait_until
from tests.integration.processes import Worker


@pytest.fixture(scope="module")
def once_app(redis_url):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    return importlib.import_module("tests.integration.beat_app")


@pytest.fixture(scope="module")
def worker(once_app, redis_url, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("once")
    worker = Worker(redis_url, log_dir, concurrency=2, app="tests.integration.beat_app")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def broker(redis_url):
    client = redis.Redis.from_url(redis_url + "/4")
    yield client
    client.close()


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:12]


def starts(app, run: str) -> list[list]:
    return [json.loads(e) for e in app.events.lrange(f"once:{run}", 0, -1)]


def queued(broker, queue: str = "once-idle") -> int:
    return broker.llen(queue)


def test_rapid_duplicates_publish_one_message_until_it_starts(once_app, worker, broker, run):
    results = [once_app.queued_report.delay(run, 7) for _ in range(10)]
    assert len({r.id for r in results}) == 1
    assert queued(broker) == 1
    other_day = once_app.queued_report.delay(run, 8)  # another signature is another job
    assert other_day.id != results[0].id
    assert queued(broker) == 2

    once_app.app.control.add_consumer("once-idle", destination=[worker.name], reply=True)
    try:
        wait_until(lambda: len(starts(once_app, run)) == 2, 20, "both queued tasks to start")
        after_start = once_app.queued_report.delay(run, 7)  # the first one runs: this is new
        assert after_start.id != results[0].id
        # The first run ends before the other day's frees the second process, so the new
        # job never meets the first one's lock (it would be skipped, rightly).
        once_app.events.rpush(f"go:{run}:7", 1)
        assert results[0].get(timeout=20) == results[0].id
        once_app.events.rpush(f"go:{run}:8", 1)
        assert other_day.get(timeout=20) == other_day.id
        once_app.events.rpush(f"go:{run}:7", 1)
        assert after_start.get(timeout=20) == after_start.id
    finally:
        once_app.app.control.cancel_consumer("once-idle", destination=[worker.name], reply=True)
    assert [e[3] for e in starts(once_app, run)].count(results[0].id) == 1


def test_a_lost_message_stops_blocking_after_the_marker_ttl(once_app, broker, run):
    first = once_app.queued_short.delay(run)
    published_at = time.monotonic()
    assert queued(broker, "once-lost") == 1
    broker.delete("once-lost")  # the message is lost before any worker saw it
    assert once_app.queued_short.delay(run).id == first.id  # still blocked by its marker
    wait_until(lambda: once_app.queued_short.delay(run).id != first.id, 10, "the marker to expire")
    assert time.monotonic() - published_at >= 1.5 - 0.05  # queued_short's enqueue_once_ttl
    assert queued(broker, "once-lost") == 1
    broker.delete("once-lost")


def test_self_retry_still_retries(once_app, worker, run):
    result = once_app.once_retrying.delay(run)
    assert result.get(timeout=30) == "ran after 1 retry"
    assert [(e[3], e[4]) for e in starts(once_app, run)] == [(result.id, 0), (result.id, 1)]
