"""Every contention policy, unchanged, on a real prefork worker whose locks live in
ZooKeeper (the app and helpers are the other worker tests')."""

from __future__ import annotations

import importlib
import os
import time
import uuid

import pytest
from kazoo.client import KazooClient

from celery_singleton_lock import connect
from tests.conftest import wait_until
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of, max_overlap
from tests.integration.worker_contract import WorkerPolicyContract, policy_worker_on

QUEUE = "zookeeper"
GEVENT_APP = "tests.integration.gevent_app"
GEVENT_QUEUE = "zookeeper-gevent"


@pytest.fixture(scope="module")
def lock_url(zookeeper_server):
    return zookeeper_server.url


@pytest.fixture(scope="module")
def policy_worker(redis_url, lock_url, tmp_path_factory):
    with policy_worker_on(lock_url, redis_url, tmp_path_factory.mktemp("worker-zookeeper"), QUEUE) as running:
        yield running


@pytest.fixture
def observer(zookeeper_server):
    backend = connect(zookeeper_server.url)
    yield backend
    backend.close()


class TestZooKeeperWorker(WorkerPolicyContract):
    """Every policy; the main process releases a killed run's lock with a session of its
    own, and the replacement child still reaches ZooKeeper (a kazoo client inherited
    through a fork hangs)."""


def test_a_task_whose_node_is_deleted_sees_the_loss(policy_worker, observer, zookeeper_server):
    app, worker = policy_worker.app, policy_worker.worker
    run = uuid.uuid4().hex[:12]
    result = app.watch_loss.apply_async((run,), queue=QUEUE)
    wait_until(lambda: count(events_of(app, run), "start") == 1, 20, "the task to start")
    key = app.watch_loss.lock_key_for((run,), {})
    directory = observer._full_key(key)
    operator = KazooClient(hosts=zookeeper_server.hosts)
    operator.start(10)
    try:
        for name in operator.get_children(directory):  # as an operator's `deleteall` would
            operator.delete(f"{directory}/{name}")
    finally:
        operator.stop()
        operator.close()
    assert result.get(timeout=20) == "LockLost"
    assert key.encode() in app.events.lrange("lost", 0, -1)
    assert f"lock {key!r} lost" in worker.text()


# -- a gevent worker -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gevent_worker(redis_url, zookeeper_server, tmp_path_factory):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    app_module = importlib.import_module(GEVENT_APP)
    worker = Worker(
        redis_url, tmp_path_factory.mktemp("worker-zookeeper-gevent"), pool="gevent", queues=GEVENT_QUEUE,
        app=GEVENT_APP, CSL_WORKER_LOCK_URL=zookeeper_server.url,
    )
    try:
        worker.wait_ready()
        yield app_module, worker
    finally:
        worker.kill()  # a gevent worker's warm shutdown takes seconds; nothing is left to see


def test_under_gevent_a_body_that_never_yields_keeps_its_lock_past_two_ttls(gevent_worker, observer):
    # kazoo runs on OS threads in a gevent worker: its pings and the keeper's renewals go
    # on while the body keeps the hub busy (with kazoo's threading handler in greenlets,
    # another client took this 2 s lock 2.5 s in).
    app, worker = gevent_worker
    run = uuid.uuid4().hex[:12]
    result = app.spin_then_nap.apply_async((run, 5, 0), queue=GEVENT_QUEUE)
    wait_until(lambda: count(events_of(app, run), "start") == 1, 20, "the body to start")
    started = events_of(app, run)[0][1]
    key = app.spin_then_nap.lock_key_for((run, 5, 0), {})
    for seconds_in in (2.5, 4.5):  # past one, then two 2-s TTLs, the body spinning all along
        time.sleep(max(0.0, started + seconds_in - time.time()))
        assert count(events_of(app, run), "spun") == 0
        assert observer.acquire(key, ttl=2) is None, f"the lock was free {seconds_in}s in"
    assert result.get(timeout=30) == {"lost": False, "reason": None}
    assert "ERROR" not in worker.text()


def test_under_gevent_waiting_greenlets_let_the_holder_run(gevent_worker):
    # A greenlet waiting for its turn waits on the hub: the holder's greenlet, on the same
    # hub, sleeps, finishes and releases (an OS wait there would stop them all).
    app, _ = gevent_worker
    task = importlib.import_module("tests.integration.worker_app").sleepy_wait  # same app
    run = uuid.uuid4().hex[:12]
    started = time.monotonic()
    results = [task.apply_async((run, 0.3), queue=GEVENT_QUEUE) for _ in range(4)]
    assert [r.get(timeout=30) for r in results] == ["ran"] * 4
    assert time.monotonic() - started < 5
    events = events_of(app, run)
    assert count(events, "start") == 4
    assert max_overlap(events) == 1
