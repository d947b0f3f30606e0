"""Metrics, events and skip marks from a real prefork worker (``-c 4 -E``, Redis broker,
Redis locks): ``/metrics`` scraped over HTTP must show the counts of all four pool
processes, a real event receiver must see the ``task-lock-*`` events, and a skipped run
must be told from a run that returned None through the result backend.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_singleton_lock import connect
from celery_singleton_lock.results import skip_info
from tests.conftest import wait_until
from tests.integration.processes import Worker

pytest.importorskip("prometheus_client")

QUEUE = "monitoring"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Events:
    """A real event receiver on the broker, in a thread, collecting every event."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self._connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self._connection, handlers={"*": self.seen.append})
        self._thread = threading.Thread(target=self.receiver.capture, kwargs={"wakeup": False}, daemon=True)

    def __enter__(self) -> Events:
        self._thread.start()
        # Redis pub/sub keeps nothing for a late subscriber: ping until we hear ourselves.
        ping = f"probe-{uuid.uuid4().hex}"

        def heard() -> bool:
            with self.app.events.default_dispatcher() as dispatcher:
                dispatcher.send("csl-probe", probe=ping)
            return any(e.get("probe") == ping for e in list(self.seen))

        wait_until(heard, 20, "the event receiver to be subscribed")
        return self

    def __exit__(self, *_: object) -> None:
        self.receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()

    def of(self, kind: str, ids: set[str]) -> list[dict[str, Any]]:
        return [e for e in list(self.seen) if e["type"] == kind and e.get("uuid") in ids]


@pytest.fixture(scope="module")
def worker_app(redis_url: str) -> Any:
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    return importlib.import_module("tests.integration.worker_app")


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def metrics_url(metrics_port: int) -> str:
    return f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def worker(worker_app: Any, redis_url: str, metrics_port: int, tmp_path_factory: Any) -> Iterator[Worker]:
    worker = Worker(
        redis_url, tmp_path_factory.mktemp("monitoring"), queues=QUEUE, concurrency=4,
        app="tests.integration.monitoring_app", options=("-E",), CSL_WORKER_METRICS_PORT=str(metrics_port),
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def events(worker: Worker, worker_app: Any) -> Iterator[Events]:
    with Events(worker_app.app) as receiver:
        yield receiver


def scrape(url: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def pids_of(worker_app: Any, run: str) -> set[int]:
    return {json.loads(e)[2] for e in worker_app.events.lrange(f"events:{run}", 0, -1)}


def test_metrics_sum_the_pool_processes_and_events_name_the_holder(
    worker: Worker, worker_app: Any, events: Events, metrics_url: str
) -> None:
    skip = {"task": worker_app.sleepy_skip.name, "backend": "redis"}
    wait = {"task": worker_app.sleepy_wait.name, "backend": "redis"}
    before = scrape(metrics_url)

    run = uuid.uuid4().hex[:12]
    skipped = [worker_app.sleepy_skip.apply_async((run, 1.5), queue=QUEUE) for _ in range(4)]
    assert [r.get(timeout=30) for r in skipped].count(None) == 3
    # The four calls ran in different pool processes: a sum over processes, not one's count.
    assert len(pids_of(worker_app, run)) >= 2
    waited_run = uuid.uuid4().hex[:12]
    waiting = [worker_app.sleepy_wait.apply_async((waited_run, 0.5), queue=QUEUE) for _ in range(2)]
    assert [r.get(timeout=30) for r in waiting] == ["ran", "ran"]

    wanted = [  # (sample, labels, increase): 1 run + 3 skips, then 2 runs, one after a wait
        ("singleton_lock_acquired_total", skip, 1),
        ("singleton_lock_hold_seconds_count", skip, 1),
        ("singleton_lock_contended_total", {**skip, "outcome": "skipped"}, 3),
        ("singleton_lock_acquired_total", wait, 2),
        ("singleton_lock_hold_seconds_count", wait, 2),
        ("singleton_lock_contended_total", {**wait, "outcome": "waited"}, 1),
        ("singleton_lock_wait_seconds_count", wait, 1),
    ]
    seen: list[list[float]] = []

    def counted() -> bool:
        now = scrape(metrics_url)
        seen.append([value(now, n, **labels) - value(before, n, **labels) for n, labels, _ in wanted])
        return seen[-1] == [increase for *_, increase in wanted]

    # Hold times are observed at release, just after Celery stored the result.
    try:
        wait_until(counted, 20, "the skips, runs and wait of 4 pool processes in /metrics")
    except AssertionError:
        raise AssertionError(f"wanted {wanted}, last scrape {seen[-1]}") from None

    ran = next(r for r in skipped if r.get() == "ran")
    skipped_ids = {r.id for r in skipped if r.id != ran.id}
    wait_until(lambda: len(events.of("task-lock-skipped", skipped_ids)) == 3, 20, "3 task-lock-skipped")
    for event in events.of("task-lock-skipped", skipped_ids):
        assert event["lock_holder"] == ran.id
        assert event["hostname"] == worker.name
        assert event["lock_key"] == worker_app.sleepy_skip.lock_key_for((run, 1.5), {})
    assert len(events.of("task-lock-contended", skipped_ids)) == 3
    waiting_ids = {r.id for r in waiting}
    wait_until(lambda: len(events.of("task-lock-waited", waiting_ids)) == 1, 20, "1 task-lock-waited")
    assert events.of("task-lock-waited", waiting_ids)[0]["lock_wait_seconds"] > 0
    assert events.of("task-lock-skipped", {ran.id}) == []

    # The skip mark, read back through the result backend; the run that ran has none.
    for result in skipped:
        info = skip_info(worker_app.app.AsyncResult(result.id))
        if result.id == ran.id:
            assert info is None
        else:
            assert info is not None
            assert info.holder_task_id == ran.id
    # One INFO line per skip, naming the holder.
    assert worker.text().count(f"is held by task {ran.id}") == 3


def test_a_broken_lock_is_counted_lost_and_sent_as_an_event(
    worker: Worker, worker_app: Any, events: Events, metrics_url: str, redis_url: str
) -> None:
    labels = {"task": worker_app.watch_loss.name, "backend": "redis"}
    before = value(scrape(metrics_url), "singleton_lock_lost_total", **labels)
    run = uuid.uuid4().hex[:12]
    result = worker_app.watch_loss.apply_async((run,), queue=QUEUE)
    wait_until(lambda: pids_of(worker_app, run), 20, "watch_loss to start")
    operator = connect(worker_app.app.conf.singleton_lock_backend)
    key = worker_app.watch_loss.lock_key_for((run,), {})
    try:
        (info,) = operator.lock_info(key)
        assert operator.break_lock(info)
    finally:
        operator.close()
    assert result.get(timeout=30) == "LockLost"

    wait_until(
        lambda: value(scrape(metrics_url), "singleton_lock_lost_total", **labels) == before + 1,
        20, "singleton_lock_lost_total + 1",
    )
    wait_until(lambda: events.of("task-lock-lost", {result.id}), 20, "task-lock-lost")
    (lost,) = events.of("task-lock-lost", {result.id})
    assert lost["lock_key"] == key
    assert "no longer ours" in lost["lock_lost_reason"]


def test_a_bad_metrics_port_stops_the_worker_at_start_naming_the_setting(
    worker_app: Any, redis_url: str, tmp_path: Any
) -> None:
    bad = Worker(
        redis_url, tmp_path, queues="monitoring-bad", concurrency=1,
        app="tests.integration.monitoring_app", CSL_WORKER_METRICS_PORT="metrics",
    )
    try:
        assert bad.process.wait(60) == 78  # EX_CONFIG, as for a refused pool
    finally:
        bad.kill()
    assert "singleton_lock_metrics_port must be a port number" in bad.text()
