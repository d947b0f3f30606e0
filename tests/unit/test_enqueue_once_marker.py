"""enqueue_once without servers: kombu's in-memory broker (messages counted in it) and
the memory lock backend on a fake clock, so the marker's expiry needs no waiting."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery, chain

from celery_singleton_lock import ConfigurationError, SingletonTask, singleton_task
from celery_singleton_lock.backends.owner import Owner


@pytest.fixture
def queue_app(queue_app: Celery) -> Celery:
    queue_app.conf.singleton_lock_enqueue_once_ttl = 60
    return queue_app


def queued(app: Celery) -> int:
    with app.connection_for_read() as conn:
        count: int = conn.default_channel._size(app.conf.task_default_queue)
        return count


@pytest.fixture
def report(queue_app: Celery) -> Any:
    @queue_app.task(base=SingletonTask, enqueue_once=True, lock_key=("day",))
    def report(day: int, region: str = "eu") -> str:
        return f"{day}-{region}"

    return report


def test_duplicates_while_queued_publish_nothing_and_share_the_id(queue_app, report):
    results = [report.delay(1), report.delay(day=1), report.apply_async((1, "eu"))]
    assert len({r.id for r in results}) == 1
    assert queued(queue_app) == 1
    assert report.delay(2).id != results[0].id  # another signature
    # lock_key names only "day", but the queued job is the whole signature
    assert report.delay(1, "us").id != results[0].id
    assert queued(queue_app) == 3


def test_the_marker_is_cleared_when_the_task_starts(queue_app, report):
    first = report.delay(1)
    assert report.apply((1,), task_id=first.id).get() == "1-eu"  # the worker runs it
    second = report.delay(1)
    assert second.id != first.id
    assert queued(queue_app) == 2


def test_the_marker_of_a_lost_message_expires_after_its_ttl(queue_app, report, clock):
    first = report.delay(1)
    clock.advance(59)
    assert report.delay(1).id == first.id
    clock.advance(1)
    assert report.delay(1).id != first.id


def test_a_countdown_lengthens_the_marker(queue_app, report, clock):
    first = report.apply_async((1,), countdown=30)
    clock.advance(80)
    assert report.delay(1).id == first.id


def test_a_retry_republishes_under_its_own_id(queue_app, report):
    waiting = report.delay(1)
    running_id = str(uuid.uuid4())
    report.push_request(id=running_id)
    try:
        retried = report.apply_async((1,), task_id=running_id)  # what self.retry() sends
    finally:
        report.pop_request()
    assert retried.id == running_id != waiting.id
    assert queued(queue_app) == 2


def test_a_call_with_callbacks_is_always_published(queue_app, report):
    first = report.delay(1)
    linked = report.apply_async((1,), link=report.si(3))
    chained = chain(report.si(1), report.si(4)).apply_async()
    assert first.id not in (linked.id, chained.parent.id)
    assert queued(queue_app) == 3


def test_eager_calls_are_never_deduplicated(eager_app):
    @eager_app.task(base=SingletonTask, enqueue_once=True)
    def ping(n: int) -> int:
        return n

    assert [ping.delay(1).get(), ping.delay(1).get()] == [1, 1]


def test_markers_live_in_a_namespace_of_their_own(queue_app, report):
    queued_result = report.delay(1)
    markers = report.lock_options().settings.backend("queued")
    assert markers.prefix.endswith(".queued")
    key = report.queued_marker_key_for((1,), {})
    assert key.startswith(f"task:{report.name}:")
    assert key != report.lock_key_for((1,), {})  # the whole signature, not lock_key's part
    assert markers.release_owned(key, Owner.of_message(queued_result.id))
    assert report.lock_options().settings.backend().acquire(key, ttl=1) is not None


@pytest.mark.parametrize(
    ("option", "value"),
    [("enqueue_once", "yes"), ("enqueue_once", 1), ("enqueue_once_ttl", 0), ("enqueue_once_ttl", "1h")],
)
def test_bad_options_fail_at_decoration_naming_the_option(queue_app, option, value):
    with pytest.raises(ConfigurationError) as info:

        @singleton_task(queue_app, **{option: value})
        def job(n: int) -> int:
            return n

    assert info.value.option == option

    class Job(SingletonTask):
        def run(self, n: int) -> int:
            return n

    setattr(Job, option, value)
    with pytest.raises(ConfigurationError) as info:
        queue_app.register_task(Job())
    assert info.value.option == option
