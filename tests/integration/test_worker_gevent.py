"""A real `celery worker -P gevent` whose task body never yields to the hub (issue 9, item
12), and the pool combinations refused when a worker starts.

Before the fix the keeper was a greenlet: under a 2 s lease, a body spinning for 5 s lost
its lock without an ERROR line or a ``lock_lost`` signal, and another client took it.
"""

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

APP = "tests.integration.gevent_app"
QUEUE = "gevent"


@pytest.fixture(scope="module")
def gevent_app(redis_url):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    return importlib.import_module(APP)


@pytest.fixture(scope="module")
def worker(gevent_app, redis_url, tmp_path_factory):
    worker = Worker(redis_url, tmp_path_factory.mktemp("gevent"), pool="gevent", queues=QUEUE, app=APP)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def events_of(gevent_app, run: str) -> dict[str, float]:
    """When each event of ``run`` happened (time.time() in the worker)."""
    return {e[0]: e[1] for e in map(json.loads, gevent_app.events.lrange(f"events:{run}", 0, -1))}


def redis_key(key: str) -> str:
    return "{singleton-lock:" + key + "}"


def lost_count(gevent_app, key: str) -> int:
    return [k.decode() for k in gevent_app.events.lrange("lost", 0, -1)].count(key)


def test_a_body_that_never_yields_keeps_its_lock_past_two_ttls(worker, gevent_app, redis_url):
    run = uuid.uuid4().hex[:12]
    result = gevent_app.spin_then_nap.apply_async((run, 6, 0), queue=QUEUE)
    wait_until(lambda: "start" in events_of(gevent_app, run), 20, "the body to start")
    started = events_of(gevent_app, run)["start"]
    key = gevent_app.spin_then_nap.lock_key_for((run, 6, 0), {})
    duplicate = connect(redis_url + "/3")  # what a duplicate's attempt does, from outside
    for seconds_in in (2.5, 4.5):  # past one, then two 2-s TTLs, the body spinning all along
        time.sleep(max(0.0, started + seconds_in - time.time()))
        assert "spun" not in events_of(gevent_app, run)
        assert duplicate.acquire(key, ttl=2) is None, f"the lock was free {seconds_in}s in"
    assert result.get(timeout=30) == {"lost": False, "reason": None}
    assert lost_count(gevent_app, key) == 0
    assert "ERROR" not in worker.text()


def test_a_lock_deleted_under_a_spinning_body_is_logged_at_once_and_signalled_once(
    worker, gevent_app, redis_url
):
    run = uuid.uuid4().hex[:12]
    result = gevent_app.spin_then_nap.apply_async((run, 3, 2), queue=QUEUE)
    wait_until(lambda: "start" in events_of(gevent_app, run), 20, "the body to start")
    key = gevent_app.spin_then_nap.lock_key_for((run, 3, 2), {})
    assert redis.Redis.from_url(redis_url + "/3").delete(redis_key(key)) == 1
    line = f"lock {key!r} lost"
    # A renewal round every 2/3 s finds it gone, while the body still spins: the keeper
    # is an OS thread, not a greenlet waiting for the hub.
    wait_until(lambda: line in worker.text(), 2, "the ERROR line")
    assert "spun" not in events_of(gevent_app, run)
    assert "ERROR" in next(entry for entry in worker.text().splitlines() if line in entry)
    # lock_lost reaches its receiver (whose Redis client lives on the hub) in a greenlet,
    # as soon as the body yields: during its nap, before it returns.
    wait_until(lambda: lost_count(gevent_app, key) == 1, 5, "the lock_lost signal")
    assert "spun" in events_of(gevent_app, run)
    assert not result.ready()
    value = result.get(timeout=30)
    assert value["lost"] is True
    assert "no longer ours" in value["reason"]
    assert lost_count(gevent_app, key) == 1  # once: not again when the body returned


def _closed_port() -> int:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return closed.getsockname()[1]


@pytest.mark.parametrize(
    ("pool", "lock_url", "named"),
    [
        ("eventlet", None, "does not support the eventlet pool (-P eventlet)"),
        ("gevent", "etcd://127.0.0.1:{port}", "cannot renew etcd leases in a gevent worker (-P gevent)"),
    ],
)
def test_an_unsupported_pool_stops_the_worker_at_start(
    gevent_app, redis_url, tmp_path, pool, lock_url, named
):
    env = {} if lock_url is None else {"CSL_WORKER_LOCK_URL": lock_url.format(port=_closed_port())}
    refused = Worker(redis_url, tmp_path, pool=pool, queues="refused", app=APP, **env)
    try:
        assert refused.process.wait(30) == 78  # EX_CONFIG
    finally:
        refused.stop()
    log = refused.text()
    assert f"CRITICAL/MainProcess] celery-singleton-lock {named}" in log
    assert "ready." not in log
