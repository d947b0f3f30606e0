"""lock_limit, throttle and debounce without servers: option checks, a throttle on the
memory backend's fake clock, and debounced calls published to kombu's in-memory broker
and then run as a worker would (``task.apply`` with the message's id and headers)."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish

from celery_singleton_lock import ConfigurationError, SingletonTask, _observe, singleton_task
from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.config import settings_for
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.metrics import MetricsObserver
from celery_singleton_lock.results import skip_info
from celery_singleton_lock.signals import task_skipped
from celery_singleton_lock.task import DEBOUNCE_HEADER
from tests.unit.conftest import FakeClock

BAD_OPTIONS = [
    ({"lock_limit": 0}, "lock_limit"),
    ({"lock_limit": 2.5}, "lock_limit"),
    ({"lock_limit": True}, "lock_limit"),
    ({"throttle": 0}, "throttle"),
    ({"throttle": "2s"}, "throttle"),
    ({"debounce": -1}, "debounce"),
    ({"debounce_max_wait": 5}, "debounce_max_wait"),  # without debounce
    ({"debounce": 2, "debounce_max_wait": 1}, "debounce_max_wait"),  # shorter than debounce
    ({"debounce": 1, "enqueue_once": True}, "debounce"),
]


def job(n: int) -> int:
    return n


@pytest.mark.parametrize(("options", "option"), BAD_OPTIONS)
@pytest.mark.parametrize("style", ["app.task", "singleton_task", "class attribute"])
def test_bad_options_fail_at_decoration_naming_the_option(
    eager_app: Celery, options: dict[str, Any], option: str, style: str
) -> None:
    eager_app.finalize()  # a finalized app binds a task at decoration time

    def decorate() -> None:
        if style == "app.task":
            eager_app.task(base=SingletonTask, **options)(job)
        elif style == "singleton_task":
            singleton_task(eager_app, **options)(job)
        else:
            eager_app.register_task(type("Job", (SingletonTask,), {"run": staticmethod(job), **options})())

    with pytest.raises(ConfigurationError) as info:
        decorate()
    assert info.value.option == option
    assert option in str(info.value)


def test_good_options_are_resolved(eager_app: Celery) -> None:
    task = singleton_task(eager_app, lock_limit=3, throttle=2, debounce=1, debounce_max_wait=4)(job)
    options = task.lock_options()
    resolved = (options.lock_limit, options.throttle, options.debounce, options.debounce_max_wait)
    assert resolved == (3, 2.0, 1.0, 4.0)
    plain = singleton_task(eager_app, name="plain")(job)
    assert (plain.lock_options().lock_limit, plain.lock_options().throttle) == (1, None)


# -- throttle --------------------------------------------------------------------------------


def test_a_successful_run_keeps_its_key_until_the_throttle_window_ends(
    eager_app: Celery, clock: FakeClock, record_signal
) -> None:
    ran: list[int] = []

    @singleton_task(eager_app, throttle=10)
    def refresh(n: int) -> int:
        ran.append(n)
        clock.advance(3)  # the body takes 3 s of the window
        return n

    skipped = record_signal(task_skipped)
    assert refresh.delay(1).get() == 1
    clock.advance(6.5)  # 9.5 s after the start
    assert refresh.delay(1).get() is None
    assert len(skipped) == 1
    assert refresh.delay(2).get() == 2  # another key
    clock.advance(0.6)  # 10.1 s: the window is over
    assert refresh.delay(1).get() == 1
    assert ran == [1, 2, 1]
    # The kept lease is no longer renewed by this process: the server's TTL ends it.
    assert not any(h.key == refresh.lock_key_for((1,), {}) for h in LeaseKeeper.for_process().tracked())


def test_a_run_longer_than_the_window_releases_at_its_end(eager_app: Celery, clock: FakeClock) -> None:
    @singleton_task(eager_app, throttle=2)
    def slow(n: int) -> int:
        clock.advance(5)
        return n

    assert slow.delay(1).get() == 1
    assert slow.delay(1).get() == 1  # nothing kept: the window ended during the body


def test_a_failed_run_does_not_hold_the_window(eager_app: Celery) -> None:
    calls: list[int] = []

    @singleton_task(eager_app, throttle=60)
    def flaky(n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("first call fails")
        return n

    with pytest.raises(ValueError, match="first call fails"):
        flaky.delay(1).get()
    assert flaky.delay(1).get() == 1  # not throttled: the failure released the key
    assert flaky.delay(1).get() is None  # the success did hold it


def test_keep_until_on_a_store_whose_lease_length_is_fixed_releases_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # etcd, ZooKeeper, file://: the keeper renews until the deadline, then a release wakes waiters.
    monkeypatch.setattr(MemoryBackend, "lease_ttl_is_settable", False)
    backend = MemoryBackend(prefix=f"unit-{uuid.uuid4().hex}")
    held = backend.acquire("k", ttl=30)
    assert held is not None
    released = threading.Event()
    original = held.release_quietly

    def release_quietly() -> bool:
        ours = original()
        released.set()
        return ours

    monkeypatch.setattr(held, "release_quietly", release_quietly)
    assert backend.keep_until(held, backend.clock() + 0.2) is True
    assert backend.acquire("k", ttl=1) is None  # kept
    assert held in LeaseKeeper.for_process().tracked()  # and renewed meanwhile
    assert released.wait(10)
    assert held.released
    other = backend.acquire("k", ttl=1)
    assert other is not None
    backend.release(other)


def test_keep_until_on_a_ttl_store_leaves_the_lease_to_the_server(clock: FakeClock) -> None:
    backend = MemoryBackend(prefix=f"unit-{uuid.uuid4().hex}", clock=clock)
    held = backend.acquire("k", ttl=30)
    assert held is not None
    assert backend.keep_until(held, clock() + 5) is True
    assert held not in LeaseKeeper.for_process().tracked()
    assert backend.lock_info("k")[0].ttl == pytest.approx(5)
    clock.advance(5)
    assert backend.lock_info("k") == []
    assert backend.keep_until(held, clock() + 5) is False  # a second keep finds it released


# -- debounce --------------------------------------------------------------------------------


@pytest.fixture
def queue_app(queue_app: Celery) -> Celery:
    queue_app.conf.task_store_eager_result = True  # task.apply() stores what a worker would
    return queue_app


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The headers and arguments of every message published during the test."""
    messages: list[dict[str, Any]] = []

    def receiver(headers: dict[str, Any], body: Any, **_: Any) -> None:
        messages.append({"headers": headers, "args": body[0], "kwargs": body[1]})

    before_task_publish.connect(receiver, weak=False)
    yield messages
    before_task_publish.disconnect(receiver)


def run_as_worker(task: Any, message: dict[str, Any]) -> Any:
    headers = message["headers"]
    return task.apply(
        message["args"], message["kwargs"], task_id=headers["id"],
        headers={DEBOUNCE_HEADER: headers[DEBOUNCE_HEADER]},
    )


def countdown_of(message: dict[str, Any]) -> float:
    eta = dt.datetime.fromisoformat(message["headers"]["eta"])
    return (eta - dt.datetime.now(dt.timezone.utc)).total_seconds()


def test_a_burst_runs_once_with_the_latest_arguments(queue_app: Celery, published, record_signal) -> None:
    ran: list[tuple[int, str]] = []

    @singleton_task(queue_app, debounce=30, lock_key="account:{account}")
    def sync(account: int, note: str) -> str:
        ran.append((account, note))
        return note

    skipped = record_signal(task_skipped)
    results = [sync.delay(7, f"call {i}") for i in range(4)]
    other = sync.delay(8, "other account")
    assert len({r.id for r in results}) == 4  # every caller has a result of its own
    assert len(published) == 5
    assert all(29 < countdown_of(m) <= 30 for m in published)
    outcomes = [run_as_worker(sync, m) for m in published]  # as their countdowns come due
    assert ran == [(7, "call 3"), (8, "other account")]
    assert [o.get() for o in outcomes] == [None, None, None, "call 3", "other account"]
    last = results[-1].id
    assert [c["reason"] for c in skipped] == [f"superseded by {last}"] * 3
    info = skip_info(results[0])
    assert info is not None
    assert (info.holder_task_id, info.reason) == (last, f"superseded by {last}")
    assert skip_info(results[-1]) is None
    assert other.id not in {r.id for r in results}


def test_a_superseded_call_is_counted_in_the_metrics_apart_from_contention(
    queue_app: Celery, published, monkeypatch
) -> None:
    observed: list[tuple[str, tuple[str, ...], float]] = []
    sink = MetricsObserver(lambda name, labels, value: observed.append((name, labels, value)))
    monkeypatch.setattr(_observe, "observer", sink)

    @singleton_task(queue_app, debounce=30)
    def sync(account: int) -> int:
        return account

    sync.delay(7)
    sync.delay(7)  # supersedes the first
    outcomes = [run_as_worker(sync, m).get() for m in published]
    assert outcomes == [None, 7]
    assert [o for o in observed if o[0] in ("superseded", "contended")] == [
        ("superseded", (sync.name, "memory"), 1)
    ]


def test_max_wait_shortens_the_countdowns_to_the_windows_end(
    queue_app: Celery, published, clock: FakeClock
) -> None:
    ran: list[int] = []

    @singleton_task(queue_app, debounce=10, debounce_max_wait=25, lock_key=lambda n: "one")
    def flush(n: int) -> int:
        ran.append(n)
        return n

    for n in range(4):  # calls 0 s, 8 s, 16 s, 24 s after the first
        flush.delay(n)
        clock.advance(8)
    countdowns = [countdown_of(m) for m in published]
    assert countdowns[:2] == [pytest.approx(10, abs=0.5)] * 2
    assert countdowns[2] == pytest.approx(9, abs=0.5)  # the window ends 25 s after the first
    assert countdowns[3] == pytest.approx(1, abs=0.5)
    bursts = {m["headers"][DEBOUNCE_HEADER] for m in published}
    assert len(bursts) == 1
    flush.delay(4)  # 32 s: a new burst, with a whole debounce
    assert countdown_of(published[-1]) == pytest.approx(10, abs=0.5)
    assert published[-1]["headers"][DEBOUNCE_HEADER] not in bursts
    for message in published:
        run_as_worker(flush, message)
    assert ran == [3, 4]  # the latest call of each burst


def test_a_call_whose_record_expired_runs_rather_than_be_lost(
    queue_app: Celery, published, clock: FakeClock
) -> None:
    ran: list[int] = []

    @singleton_task(queue_app, debounce=1, lock_key=lambda n: "one")
    def job(n: int) -> int:
        ran.append(n)
        return n

    job.delay(1)
    clock.advance(1 + 3600 + 1)  # past its countdown and the slack (enqueue_once_ttl)
    run_as_worker(job, published[0])
    assert ran == [1]


def test_a_retry_republishes_without_debouncing_again(queue_app: Celery, published) -> None:
    @singleton_task(queue_app, debounce=5)
    def job(n: int) -> int:
        return n

    running_id = str(uuid.uuid4())
    job.push_request(id=running_id)
    try:
        job.apply_async((1,), task_id=running_id, countdown=0)  # what self.retry() sends
    finally:
        job.pop_request()
    assert DEBOUNCE_HEADER not in published[0]["headers"]


def test_eager_calls_are_never_debounced(eager_app: Celery) -> None:
    @singleton_task(eager_app, debounce=5)
    def ping(n: int) -> int:
        return n

    assert [ping.delay(1).get(), ping.delay(2).get()] == [1, 2]


def test_records_live_in_the_queued_namespace(queue_app: Celery) -> None:
    @singleton_task(queue_app, debounce=5)
    def job(n: int) -> int:
        return n

    job.delay(1)
    markers = settings_for(queue_app).backend("queued")
    assert [info.key for info in markers.held_locks()] == [f"debounce:{job.lock_key_for((1,), {})}"]
    assert settings_for(queue_app).backend().held_locks() == []


# -- lock_limit ------------------------------------------------------------------------------


def test_lock_limit_runs_up_to_n_bodies_of_a_key_and_skips_the_next(eager_app: Celery) -> None:
    @singleton_task(eager_app, lock_limit=2)
    def charge(account: int) -> str:
        return "charged"

    backend = settings_for(eager_app).backend()
    key = charge.lock_key_for((1,), {})
    first = backend.acquire(key, ttl=30, limit=2)
    assert first is not None
    assert charge.delay(1).get() == "charged"  # the second slot
    second = backend.acquire(key, ttl=30, limit=2)
    assert second is not None
    assert charge.delay(1).get() is None  # both slots taken: skipped
    backend.release(first)
    assert charge.delay(1).get() == "charged"
    backend.release(second)


def test_contention_retries_are_counted_apart_from_the_tasks_own() -> None:
    from types import SimpleNamespace

    from celery_singleton_lock.policies import RETRIES_HEADER, Contention

    backend = MemoryBackend(prefix=f"unit-{uuid.uuid4().hex}")
    task = SimpleNamespace(
        max_retries=3,
        request=SimpleNamespace(
            called_directly=False, is_eager=False, retries=3, **{RETRIES_HEADER: {"contended": 1}}
        ),
    )
    contention = Contention(key="k", ttl=1, backend=backend, owner=None, refused=None, task=task)  # type: ignore[arg-type]
    assert contention.retries == 1  # the task's own three self.retry() calls are not counted


def test_a_superseded_call_sends_task_lock_skipped_with_its_reason(
    queue_app: Celery, published, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_singleton_lock import _observe
    from celery_singleton_lock.events import LockEvents

    @singleton_task(queue_app, debounce=5, lock_key=lambda n: "one")
    def job(n: int) -> int:
        return n

    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(job, "send_event", lambda kind, **fields: sent.append((kind, fields)), raising=False)
    events = LockEvents("worker@host")
    _observe.install(events)
    try:
        first, last = job.delay(1), job.delay(2)
        for message in published:
            run_as_worker(job, message)
    finally:
        _observe.uninstall(events)
    assert [kind for kind, _ in sent] == ["task-lock-skipped"]
    fields = sent[0][1]
    assert (fields["lock_holder"], fields["lock_skip_reason"]) == (last.id, f"superseded by {last.id}")
    assert first.id != last.id


def test_the_readme_examples_define_the_tasks_they_say() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### N at a time, once per period, once per burst"):]
    section = section[: section.index("\n### ", 1)]
    app = Celery("shop", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, singleton_lock_backend="memory://")
    namespace: dict[str, Any] = {"app": app, "SingletonTask": SingletonTask}
    for block in section.split("```python\n")[1:]:
        exec(compile(block[: block.index("```")], "README.md", "exec"), namespace)
    assert namespace["charge"].lock_options().lock_limit == 4
    assert namespace["refresh_feed"].lock_options().throttle == 60
    reindex = namespace["reindex"].lock_options()
    assert (reindex.debounce, reindex.debounce_max_wait) == (5, 60)
    assert namespace["reindex"].lock_key_for((3, [1]), {}) == "res:search-index:3"


def test_a_redelivered_copy_never_takes_a_second_slot_while_its_first_delivery_holds_one(
    eager_app: Celery,
) -> None:
    from celery_singleton_lock.backends.owner import Owner

    slots_held: list[int] = []

    @singleton_task(eager_app, lock_limit=3)
    def charge(account: int) -> str:
        slots_held.append(len(backend.lock_info(key)))
        return "charged"

    backend = settings_for(eager_app).backend()
    key = charge.lock_key_for((1,), {})
    task_id = str(uuid.uuid4())
    first_delivery = backend.acquire(key, ttl=30, limit=3, owner=Owner.here(task_id, pid=1))
    assert first_delivery is not None
    threading.Timer(0.3, first_delivery.release).start()
    # Two slots are free, but this copy's task id holds one: it waits for that delivery.
    assert charge.apply((1,), task_id=task_id).get() == "charged"
    assert first_delivery.released
    assert slots_held == [1]


def test_throttle_with_lock_limit_keeps_each_runs_slot_n_starts_per_window(
    eager_app: Celery, clock: FakeClock
) -> None:
    @singleton_task(eager_app, throttle=10, lock_limit=2)
    def send_digest(user: int) -> str:
        return "sent"

    assert [send_digest.delay(1).get() for _ in range(3)] == ["sent", "sent", None]
    clock.advance(10)
    assert send_digest.delay(1).get() == "sent"


def test_a_call_made_while_the_lock_server_is_down_is_published_undebounced(
    queue_app: Celery, published, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from celery_singleton_lock.errors import LockBackendUnavailable

    @singleton_task(queue_app, debounce=5)
    def job(n: int) -> int:
        return n

    def down(*args: Any, **kwargs: Any) -> Any:
        raise LockBackendUnavailable("no answer", url="memory://")

    monkeypatch.setattr(settings_for(queue_app).backend("queued"), "attempt", down)
    result = job.delay(1)
    assert [m["headers"]["id"] for m in published] == [result.id]
    assert DEBOUNCE_HEADER not in published[0]["headers"]  # it runs like any call
    assert "publishing without debouncing it" in caplog.text
