"""lock_limit, throttle, debounce and the contention retry budget on real workers: two
`celery worker` processes of four prefork children each, Redis broker and Redis locks.

The tasks (tests/integration/worker_app.py) record their starts and ends in Redis, so the
tests see what a user sees: how many bodies ran, when, and whether they overlapped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_singleton_lock import connect
from celery_singleton_lock.results import skip_info
from tests.conftest import wait_until
from tests.integration.processes import Worker
from tests.integration.test_worker import count, events_of, max_overlap, run, worker_app  # noqa: F401

QUEUE = "limits"


@pytest.fixture(scope="module")
def workers(worker_app, redis_url, tmp_path_factory) -> Iterator[list[Worker]]:  # noqa: F811
    log_dir = tmp_path_factory.mktemp("limits")
    started = [Worker(redis_url, log_dir, queues=QUEUE, concurrency=4) for _ in range(2)]
    try:
        for worker in started:
            worker.wait_ready(worker_app.app)
        yield started
    finally:
        for worker in started:
            worker.stop()


def send(task: Any, *args: Any) -> Any:
    return task.apply_async(args, queue=QUEUE)


def call_every(interval: float, calls: int, make_call: Any) -> list[tuple[float, Any]]:
    """``make_call(i)`` at 0, ``interval``, 2 ``interval``... seconds from now (wall clock
    times, as the tasks record theirs), each with what it returned."""
    made = []
    start = time.time()
    for i in range(calls):
        time.sleep(max(0.0, start + i * interval - time.time()))
        made.append((time.time(), make_call(i)))
    return made


def starts(events: list[list[Any]]) -> list[list[Any]]:
    return sorted((e for e in events if e[0] == "start"), key=lambda e: e[1])


# -- throttle --------------------------------------------------------------------------------


def test_throttle_runs_once_per_window_and_skips_the_calls_within_it(workers, worker_app, run):  # noqa: F811
    calls = call_every(0.2, 25, lambda _: send(worker_app.throttled, run))  # 5 s of calls
    assert [result.get(timeout=30) for _, result in calls].count("ran") == 3
    times = [e[1] for e in starts(events_of(worker_app, run))]
    assert len(times) == 3
    assert all(later - earlier >= 2 - 0.02 for earlier, later in itertools.pairwise(times))


def test_a_failed_run_does_not_hold_the_throttle_window(workers, worker_app, run):  # noqa: F811
    for _ in range(2):
        with pytest.raises(ValueError, match="this run fails"):
            send(worker_app.throttled, run, True).get(timeout=30)
    assert count(events_of(worker_app, run), "start") == 2


def test_a_waiting_duplicate_runs_when_the_throttle_window_ends(workers, worker_app, run):  # noqa: F811
    first = send(worker_app.throttled_wait, run)
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the first run to start")
    second = send(worker_app.throttled_wait, run)
    assert [first.get(timeout=30), second.get(timeout=30)] == ["ran", "ran"]
    earlier, later = (e[1] for e in starts(events_of(worker_app, run)))
    assert 2 - 0.02 <= later - earlier < 2 + 0.5  # woken at the window's end, not by polling


# -- debounce --------------------------------------------------------------------------------


def test_a_burst_of_calls_runs_once_with_the_last_arguments_after_it(workers, worker_app, run):  # noqa: F811
    calls = call_every(0.2, 10, lambda i: send(worker_app.debounced, run, i))
    last_call_at, last = calls[-1]
    assert [result.get(timeout=30) for _, result in calls] == [None] * 9 + [9]
    (start,) = starts(events_of(worker_app, run))
    assert start[3] == 9
    assert 1.0 - 0.02 <= start[1] - last_call_at <= 1.5
    # Each superseded call names the latest call when it came due: the one before the
    # last came due after the last call was made.
    info = skip_info(calls[-2][1])
    assert info is not None
    assert (info.reason, info.holder_task_id) == (f"superseded by {last.id}", last.id)


def test_max_wait_runs_a_steady_stream_at_least_every_window(workers, worker_app, run):  # noqa: F811
    calls = call_every(0.2, 30, lambda i: send(worker_app.debounced_capped, run, i))  # 6 s
    for _, result in calls:
        result.get(timeout=30)
    events = events_of(worker_app, run)
    times = [calls[0][0]] + [e[1] for e in starts(events)]
    assert len(times) - 1 >= 3
    assert max(later - earlier for earlier, later in itertools.pairwise(times)) <= 2.5
    assert times[-1] - calls[-1][0] <= 1.5  # the last burst too
    assert max_overlap(events) == 1
    assert starts(events)[-1][3] == 29  # the latest arguments


# -- retry budgets ---------------------------------------------------------------------------


def test_contention_retries_do_not_spend_the_tasks_own_retries(workers, worker_app, run, redis_url):  # noqa: F811
    backend = connect(redis_url + "/3")
    try:
        held = backend.acquire(worker_app.contends_then_retries.lock_key_for((run,), {}), ttl=30)
        assert held is not None
        result = send(worker_app.contends_then_retries, run)
        wait_until(lambda: count(events_of(worker_app, run), "contended") >= 5, 30, "five contention retries")
        backend.release(held)
        # max_retries=1: its one self.retry() is still there after five contention retries.
        assert result.get(timeout=30) == "ran after 1 retry"
    finally:
        backend.close()
    assert [e[3] for e in starts(events_of(worker_app, run))] == [0, 1]
# -- lock_limit ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_name", "runs"), [("limited_wait", 12), ("limited_retry", 12), ("limited_skip", 3)]
)
def test_lock_limit_runs_at_most_n_bodies_of_a_key_at_once(workers, worker_app, run, task_name, runs):  # noqa: F811
    task = getattr(worker_app, task_name)
    results = [send(task, run, 1) for _ in range(12)]
    values = [r.get(timeout=60) for r in results]
    events = events_of(worker_app, run)
    assert values.count("ran") == runs
    assert count(events, "start") == runs
    assert max_overlap(events) == 3


def test_a_killed_runs_slot_is_freed_by_the_main_process_at_once(workers, worker_app, run, redis_url):  # noqa: F811
    result = send(worker_app.limited_killable, run)
    wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
    backend = connect(redis_url + "/3")
    try:
        key = worker_app.limited_killable.lock_key_for((run,), {})
        (slot,) = backend.lock_info(key)
        assert slot.limit == 3
        worker_app.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
        wait_until(lambda: backend.lock_info(key) == [], 5, "the main process to free the killed run's slot")
    finally:
        backend.close()
