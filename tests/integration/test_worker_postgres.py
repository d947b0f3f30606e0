"""Every contention policy, unchanged, on a real prefork worker whose locks live in
PostgreSQL, and a gevent worker whose lease keeper renews through psycopg from its OS
thread (the apps and helpers are the other worker tests')."""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid
from urllib.parse import quote

import psycopg
import pytest

from celery_singleton_lock import connect
from tests.conftest import wait_until
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of
from tests.integration.worker_contract import WorkerPolicyContract, policy_worker_on

QUEUE = "postgres"


@pytest.fixture(scope="module")
def lock_url(postgres_url):
    """The server's URL with a schema of this module's own first on the search path: the
    workers' table (the default name) lands there, and goes with it."""
    schema = f"csl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{separator}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def policy_worker(redis_url, lock_url, tmp_path_factory):
    with policy_worker_on(lock_url, redis_url, tmp_path_factory.mktemp("worker-postgres"), QUEUE) as running:
        yield running


@pytest.fixture
def observer(lock_url):
    backend = connect(lock_url)
    yield backend
    backend.close()


class TestPostgresWorker(WorkerPolicyContract):
    """Every policy, and a revoked run's lock freed by the main process's own connection."""


def test_a_task_whose_row_is_freed_by_an_operator_sees_the_loss(policy_worker, observer, lock_url):
    app, worker = policy_worker.app, policy_worker.worker
    run = uuid.uuid4().hex[:12]
    result = app.watch_loss.apply_async((run,), queue=QUEUE)
    wait_until(lambda: count(events_of(app, run), "start") == 1, 20, "the task to start")
    key = app.watch_loss.lock_key_for((run,), {})
    with psycopg.connect(lock_url, autocommit=True) as conn:
        freed = conn.execute(
            "UPDATE singleton_locks SET token = NULL, owner = NULL WHERE key = %s", (observer._full_key(key),)
        )
        assert freed.rowcount == 1
    assert result.get(timeout=20) == "LockLost"
    assert key.encode() in app.events.lrange("lost", 0, -1)
    assert f"lock {key!r} lost" in worker.text()


# -- gevent ----------------------------------------------------------------------------------

GEVENT_QUEUE = "postgres-gevent"


@pytest.fixture(scope="module")
def gevent_worker(redis_url, lock_url, tmp_path_factory):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    app_module = importlib.import_module("tests.integration.gevent_app")
    worker = Worker(
        redis_url, tmp_path_factory.mktemp("gevent-postgres"), pool="gevent", queues=GEVENT_QUEUE,
        app="tests.integration.gevent_app", CSL_WORKER_LOCK_URL=lock_url,
    )
    try:
        worker.wait_ready()
        yield app_module, worker
    finally:
        worker.kill()  # nothing to see in its shutdown, which takes seconds under gevent


def test_a_gevent_body_that_never_yields_keeps_its_lock_past_two_ttls(gevent_worker, observer):
    # The keeper is an OS thread: it renews through psycopg while the hub is blocked by
    # the body; a greenlet keeper would not run at all, and the 2 s lease would end.
    app, worker = gevent_worker
    run = uuid.uuid4().hex[:12]
    result = app.spin_then_nap.apply_async((run, 6, 0), queue=GEVENT_QUEUE)

    def started() -> float | None:
        events = [json.loads(e) for e in app.events.lrange(f"events:{run}", 0, -1)]
        return next((e[1] for e in events if e[0] == "start"), None)

    wait_until(lambda: started() is not None, 20, "the body to start")
    start = started()
    key = app.spin_then_nap.lock_key_for((run, 6, 0), {})
    for seconds_in in (2.5, 4.5):  # past one, then two 2-s TTLs, the body spinning all along
        time.sleep(max(0.0, start + seconds_in - time.time()))
        assert observer.acquire(key, ttl=2) is None, f"the lock was free {seconds_in}s in"
    assert result.get(timeout=30) == {"lost": False, "reason": None}
    assert "ERROR" not in worker.text()
    assert "renewal of" not in worker.text()  # not one renewal failed, not even retried
