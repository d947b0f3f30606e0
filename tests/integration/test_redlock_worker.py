"""A real `celery worker` whose locks live on three Redlock masters: skip, wait, retry.

The worker, its app and the helpers are the ones of test_worker.py and processes.py; only the lock URL
(``CSL_WORKER_LOCK_URL``) and the queue differ.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_singleton_lock.testing import RedisServer, redis_servers
from tests.integration.test_worker import worker_app
from tests.integration.worker_contract import PolicyWorker, WorkerPolicyContract, policy_worker_on

__all__ = ["worker_app"]  # a fixture shared with test_worker.py

QUEUE = "redlock"


@pytest.fixture(scope="module")
def masters() -> Iterator[list[RedisServer]]:
    with redis_servers(3) as servers:
        yield servers


@pytest.fixture(scope="module")
def lock_url(masters) -> str:
    return "redlock://" + ",".join(f"127.0.0.1:{m.port}" for m in masters) + "/3"


@pytest.fixture(scope="module")
def policy_worker(redis_url, lock_url, tmp_path_factory) -> Iterator[PolicyWorker]:
    with policy_worker_on(lock_url, redis_url, tmp_path_factory.mktemp("redlock-worker"), QUEUE) as running:
        yield running


class TestRedlockWorker(WorkerPolicyContract):
    """Every policy, each lock taken on a quorum of the three masters."""


def test_a_lock_goes_through_every_master(policy_worker, masters):
    run = uuid.uuid4().hex[:12]
    assert policy_worker.send("sleepy_skip", run, 0.1).get(timeout=30) == "ran"
    key = policy_worker.app.sleepy_skip.lock_key_for((run, 0.1), {})
    for master in masters:
        client = redis.Redis.from_url(master.url + "/3")
        assert client.exists("{singleton-lock:" + key + "}:fence")
        client.close()
