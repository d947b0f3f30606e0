"""Real workers with RabbitMQ as the broker (results, locks and events on Redis): every
contention policy, and ``acks_late`` redelivery, which RabbitMQ does when a consumer's
connection is lost (not after a visibility timeout, as Redis does).

RabbitMQ: ``CSL_AMQP_URL``, else 127.0.0.1:5672 (guest/guest); skipped with the reason
when none answers. Each worker reaches it through a proxy of its own, so one worker's
connection can be cut while its task body goes on.
"""

from __future__ import annotations

import importlib
import os
import time
import uuid
from urllib.parse import urlsplit

import kombu
import pytest

from celery_singleton_lock.errors import mask_url
from tests.conftest import wait_until
from tests.integration.processes import Worker
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.test_worker import count, events_of, max_overlap
from tests.integration.test_worker_faults import lock_owner, pool_children
from tests.integration.worker_contract import PolicyWorker, WorkerPolicyContract

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
QUEUE = f"csl-it-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def amqp_url() -> str:
    url = os.environ.get("CSL_AMQP_URL") or LOCAL_AMQP_URL
    try:
        with kombu.Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.skip(f"no RabbitMQ answers at {mask_url(url)} (set CSL_AMQP_URL): {exc}")
    return url


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return f"{parts.scheme}://{credentials}127.0.0.1:{proxy.port}{parts.path}"


@pytest.fixture(scope="module")
def rabbitmq_app(redis_url, amqp_url):
    os.environ.update(
        CSL_WORKER_REDIS_URL=redis_url, CSL_WORKER_AMQP_URL=amqp_url, CSL_WORKER_AMQP_QUEUE=QUEUE
    )
    return importlib.import_module("tests.integration.rabbitmq_app")


@pytest.fixture(scope="module")
def workers(rabbitmq_app, redis_url, amqp_url, tmp_path_factory):
    """Two prefork workers (two processes each) on the queue, each through its proxy."""
    logs = tmp_path_factory.mktemp("worker-rabbitmq")
    parts = urlsplit(amqp_url)
    pairs = []
    try:
        for _ in range(2):
            proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
            worker = Worker(
                redis_url, logs, queues=QUEUE, concurrency=2, app="tests.integration.rabbitmq_app",
                CSL_WORKER_AMQP_URL=through(proxy, amqp_url),
            )
            pairs.append((worker, proxy))
        for worker, _ in pairs:
            worker.wait_ready()
        yield pairs
    finally:
        for worker, proxy in pairs:
            worker.stop()
            proxy.close()


@pytest.fixture(scope="module")
def policy_worker(rabbitmq_app, workers):
    return PolicyWorker(rabbitmq_app, workers[0][0], QUEUE)


@pytest.fixture(scope="module")
def lock_url(redis_url):
    return redis_url + "/3"


class TestRabbitMQWorker(WorkerPolicyContract):
    """Skip, wait, retry and raise, and a revoked run's lock freed early, on RabbitMQ."""


def runner_of(workers, redis_url: str, key: str):
    """The (worker, proxy) whose pool process holds ``key``."""
    owner = lock_owner(redis_url, key)
    assert owner is not None
    (pair,) = [pair for pair in workers if owner["pid"] in pool_children(pair[0])]
    return pair


def logs(workers) -> str:
    return "".join(worker.text() for worker, _ in workers)


def test_a_copy_redelivered_on_connection_loss_waits_for_the_body_and_never_runs_again(
    rabbitmq_app, workers, redis_url
):
    run = uuid.uuid4().hex[:12]
    task = rabbitmq_app.long_acks_late
    result = task.apply_async((run, 4))
    wait_until(lambda: count(events_of(rabbitmq_app, run), "start") == 1, 20, "the first run")
    _, proxy = runner_of(workers, redis_url, task.lock_key_for((run, 4), {}))
    # The worker's connection to RabbitMQ drops; its pool process goes on with the body.
    # RabbitMQ gives the unacknowledged message to a consumer again, flagged redelivered.
    assert proxy.cut() >= 1
    wait_until(
        lambda: f"{result.id}] is a redelivery while its first delivery holds" in logs(workers),
        20, "the redelivered copy to wait behind its first delivery's lock",
    )
    assert result.get(timeout=30) == "ran"
    wait_until(
        lambda: f"{result.id}] already finished; ignoring its redelivery" in logs(workers),
        20, "the copy to stand down",
    )
    events = events_of(rabbitmq_app, run)
    assert count(events, "start") == 1
    assert count(events, "end") == 1
    assert max_overlap(events) == 1


def test_a_copy_redelivered_after_its_worker_was_killed_runs_once_the_lease_ends(
    rabbitmq_app, workers, redis_url
):
    # Last in the module: it kills one of the two workers.
    run = uuid.uuid4().hex[:12]
    task = rabbitmq_app.long_acks_late  # lock_ttl=2
    result = task.apply_async((run, 1))
    wait_until(lambda: count(events_of(rabbitmq_app, run), "start") == 1, 20, "the first run")
    worker, _ = runner_of(workers, redis_url, task.lock_key_for((run, 1), {}))
    worker.kill()  # main and pool processes: no release, no ack; the connection closes
    killed_at = time.time()
    assert result.get(timeout=30) == "ran"  # the work is not lost
    events = events_of(rabbitmq_app, run)
    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == 2
    assert count(events, "end") == 1
    assert starts[1][1] > killed_at  # the copy ran only once the killed body was gone
    assert starts[1][2] != starts[0][2]
    assert f"{result.id}] is a redelivery while its first delivery holds" in logs(workers)
