"""SingletonTask in eager mode and direct calls: skip, raise, run-and-release, options.

The lock is held "by someone else" through the app's own memory backend, the one the
task uses (``settings_for(app).backend()``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, current_app
from celery.app.trace import build_tracer

from celery_singleton_lock import (
    ConfigurationError,
    Contention,
    HeldLock,
    LockContended,
    LockLost,
    Retry,
    SingletonTask,
    Skip,
    Skipped,
    Wait,
    current_lock,
    singleton_task,
)
from celery_singleton_lock.backends.base import LockBackend
from celery_singleton_lock.config import settings_for
from celery_singleton_lock.errors import LockKeyError
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.signals import lock_contended, lock_lost, task_skipped

STYLES = ["app.task(base=SingletonTask)", "singleton_task(app)", "singleton_task"]


def decorate(style: str, app: Celery, fun: Callable[..., Any], **options: Any) -> Any:
    """Make ``fun`` a singleton task the way users write it."""
    if style == "app.task(base=SingletonTask)":
        return app.task(base=SingletonTask, **options)(fun)
    if style == "singleton_task(app)":
        return singleton_task(app, **options)(fun)
    # Bare/app-less: a shared task, bound to the current app, which is ``app`` (the newest).
    assert app is current_app._get_current_object()
    return singleton_task(**options)(fun) if options else singleton_task(fun)


def lock_backend(app: Celery) -> LockBackend:
    return settings_for(app).backend()


def hold(app: Celery, task: Any, *args: Any, **kwargs: Any) -> HeldLock:
    """Take the lock a call ``task(*args, **kwargs)`` needs, as another worker would."""
    held = lock_backend(app).acquire(task.lock_key_for(args, kwargs), ttl=30)
    assert held is not None
    return held


def is_free(app: Celery, key: str) -> bool:
    probe = lock_backend(app).acquire(key, ttl=30)
    if probe is None:
        return False
    probe.release()
    return True


# -- contention ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_a_call_whose_key_is_held_is_skipped(
    style: str, eager_app: Celery, record_signal, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[int] = []

    def sync_account(account_id: int) -> str:
        ran.append(account_id)
        return "synced"

    task = decorate(style, eager_app, sync_account)
    holder = hold(eager_app, task, 7)
    skipped = record_signal(task_skipped)
    caplog.set_level(logging.INFO, logger="celery_singleton_lock.task")

    result = task.delay(7)

    assert ran == []
    assert result.state == "SUCCESS"
    assert result.result is None
    key = task.lock_key_for((7,), {})
    assert [(call["key"], call["task_id"]) for call in skipped] == [(key, result.id)]
    assert skipped[0]["sender"].name == task.name
    lines = [
        r.getMessage() for r in caplog.records
        if r.name == "celery_singleton_lock.task" and r.levelno == logging.INFO
    ]
    assert any(key in line and result.id in line for line in lines)
    # Another account is another key: it runs.
    assert task.delay(8).result == "synced"
    assert ran == [8]
    assert holder.release() is True  # the holder's lock was left alone


def test_a_skipped_call_returns_the_skip_result(eager_app: Celery) -> None:
    @eager_app.task(base=SingletonTask, on_contention=Skip(result="busy"))
    def report(day: str) -> str:
        return "built"

    holder = hold(eager_app, report, "monday")
    assert report.delay("monday").result == "busy"
    holder.release()


def test_a_direct_call_is_locked_too(eager_app: Celery) -> None:
    ran: list[int] = []

    @eager_app.task(base=SingletonTask)
    def add(x: int, y: int) -> int:
        ran.append(x)
        return x + y

    holder = hold(eager_app, add, 1, 2)
    assert add(1, y=2) is None  # same key written another way: skipped
    assert ran == []
    holder.release()
    assert add(1, 2) == 3


@pytest.mark.parametrize("style", STYLES)
def test_raise_policy_raises_lock_contended(style: str, eager_app: Celery) -> None:
    ran: list[int] = []

    def charge(invoice_id: int) -> None:
        ran.append(invoice_id)

    task = decorate(style, eager_app, charge, on_contention="raise")
    holder = hold(eager_app, task, 42)
    key = task.lock_key_for((42,), {})

    result = task.delay(42)
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockContended)
    assert result.result.key == key
    with pytest.raises(LockContended):
        task.apply(args=(42,), throw=True)
    with pytest.raises(LockContended):
        task(42)
    assert ran == []
    holder.release()


def test_the_app_setting_is_the_default_policy(eager_app: Celery) -> None:
    eager_app.conf.singleton_lock_on_contention = "raise"

    @eager_app.task(base=SingletonTask)
    def charge(invoice_id: int) -> None: ...

    @eager_app.task(base=SingletonTask, on_contention="skip")
    def refund(invoice_id: int) -> None: ...

    holders = [hold(eager_app, charge, 1), hold(eager_app, refund, 1)]
    assert isinstance(charge.delay(1).result, LockContended)
    assert refund.delay(1).state == "SUCCESS"
    for holder in holders:
        holder.release()


def test_retry_policy_gives_up_with_lock_contended(eager_app: Celery, record_signal) -> None:
    contended = record_signal(lock_contended)

    @eager_app.task(base=SingletonTask, on_contention=Retry(countdown=0, max_retries=2))
    def sync(account_id: int) -> None: ...

    holder = hold(eager_app, sync, 3)
    result = sync.delay(3)
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockContended)
    assert len(contended) == 3  # the first run and its two retries
    holder.release()


def test_retry_policy_runs_once_the_lock_is_free(eager_app: Celery, record_signal) -> None:
    contended = record_signal(lock_contended)
    holder: list[HeldLock] = []

    def release_on_first_contention(sender: Any = None, **kwargs: Any) -> None:
        if len(contended) == 1:
            holder.pop().release()

    lock_contended.connect(release_on_first_contention, weak=False)
    try:

        @eager_app.task(base=SingletonTask, on_contention=Retry(countdown=0, max_retries=3))
        def sync(account_id: int) -> str:
            return "synced"

        holder.append(hold(eager_app, sync, 3))
        result = sync.delay(3)
    finally:
        lock_contended.disconnect(release_on_first_contention)
    assert result.state == "SUCCESS"
    assert result.result == "synced"
    assert len(contended) == 1


def test_wait_policy_that_times_out_applies_its_fallback(eager_app: Celery) -> None:
    @eager_app.task(base=SingletonTask, on_contention=Wait(timeout=0) | Skip(result="gave up"))
    def sync(account_id: int) -> str:
        return "synced"

    holder = hold(eager_app, sync, 3)
    assert sync.delay(3).result == "gave up"
    holder.release()
    assert sync.delay(3).result == "synced"


def test_retry_then_skip_retries_then_ends_as_skipped(eager_app: Celery, record_signal) -> None:
    contended = record_signal(lock_contended)
    skipped = record_signal(task_skipped)

    @eager_app.task(base=SingletonTask, on_contention=Retry(countdown=0, max_retries=2) | Skip("gave up"))
    def sync(account_id: int) -> str:
        return "synced"

    holder = hold(eager_app, sync, 3)
    result = sync.delay(3)
    assert (result.state, result.result) == ("SUCCESS", "gave up")
    assert len(contended) == 3  # the first run and its two retries
    assert len(skipped) == 1
    holder.release()


def test_a_chain_of_names_as_a_task_option(eager_app: Celery, record_signal) -> None:
    contended = record_signal(lock_contended)

    @eager_app.task(base=SingletonTask, on_contention="retry|raise", max_retries=1)
    def sync(account_id: int) -> None: ...

    holder = hold(eager_app, sync, 3)
    result = sync.delay(3)
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockContended)
    assert "gave up" not in str(result.result)  # Raise() failed it, not Retry giving up
    # Retry()'s own default budget, 100 retries: the task's max_retries=1 does not size it.
    assert len(contended) == 1 + 100
    holder.release()


def test_a_chain_of_names_as_the_app_setting(eager_app: Celery) -> None:
    eager_app.conf.singleton_lock_on_contention = "wait|skip"
    eager_app.conf.singleton_lock_wait_timeout = 0

    @eager_app.task(base=SingletonTask)
    def sync(account_id: int) -> str:
        return "synced"

    holder = hold(eager_app, sync, 3)
    assert sync.delay(3).state == "SUCCESS"
    assert sync.delay(3).result is None
    holder.release()
    assert sync.delay(3).result == "synced"


class Busy:
    """A user's policy class, given as the class."""

    def __call__(self, contention: Contention) -> Skipped:
        return Skipped(f"busy: {contention.key}")


def test_a_users_policy_class_is_made_once_and_decides(eager_app: Celery) -> None:
    @eager_app.task(base=SingletonTask, on_contention=Busy)
    def sync(account_id: int) -> str:
        return "synced"

    assert isinstance(sync.lock_options().policy, Busy)
    holder = hold(eager_app, sync, 3)
    assert sync.delay(3).result == f"busy: {sync.lock_key_for((3,), {})}"
    holder.release()


# -- running with the lock -----------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_a_free_call_runs_and_releases_after(style: str, eager_app: Celery) -> None:
    seen_free_inside: list[bool] = []

    def rebuild(report_id: int, full: bool = False) -> str:
        seen_free_inside.append(is_free(eager_app, key))
        return f"rebuilt {report_id}"

    task = decorate(style, eager_app, rebuild)
    key = task.lock_key_for((5,), {})

    result = task.delay(5)

    assert result.state == "SUCCESS"
    assert result.result == "rebuilt 5"
    assert seen_free_inside == [False]  # held while the body ran
    assert is_free(eager_app, key)
    assert task.delay(report_id=5).result == "rebuilt 5"  # and can be taken again


@pytest.mark.parametrize("style", STYLES)
def test_the_lock_is_released_after_the_body_raises(style: str, eager_app: Celery) -> None:
    def explode(report_id: int) -> None:
        raise ValueError(f"bad report {report_id}")

    task = decorate(style, eager_app, explode)
    key = task.lock_key_for((5,), {})

    result = task.delay(5)
    assert result.state == "FAILURE"
    assert isinstance(result.result, ValueError)
    assert is_free(eager_app, key)
    with pytest.raises(ValueError, match="bad report 5"):
        task(5)
    assert is_free(eager_app, key)


def test_current_lock_is_the_tasks_lock_inside_the_body_and_none_outside(eager_app: Celery) -> None:
    seen: list[HeldLock | None] = []

    @eager_app.task(base=SingletonTask, lock_ttl=12)
    def work(x: int, y: int = 2) -> int:
        seen.append(current_lock())
        return x

    assert current_lock() is None
    assert work.delay(1).result == 1
    assert current_lock() is None
    [held] = seen
    assert isinstance(held, HeldLock)
    assert held.key == work.lock_key_for((1,), {"y": 2})
    assert held.ttl == 12
    assert held.released  # released after the body


def test_current_lock_of_a_nested_singleton_call_is_the_inner_one(eager_app: Celery) -> None:
    seen: list[tuple[str, str | None]] = []

    @eager_app.task(base=SingletonTask, lock_key="inner:{n}")
    def inner(n: int) -> None:
        lock = current_lock()
        seen.append(("inner", lock.key if lock else None))

    @eager_app.task(base=SingletonTask, lock_key="outer:{n}")
    def outer(n: int) -> None:
        inner(n)
        lock = current_lock()
        seen.append(("outer", lock.key if lock else None))

    outer.delay(3)
    assert seen == [("inner", "res:inner:3"), ("outer", "res:outer:3")]


def test_lock_ttl_option_wins_over_the_app_setting(eager_app: Celery) -> None:
    eager_app.conf.singleton_lock_ttl = 45
    ttls: list[float] = []

    @eager_app.task(base=SingletonTask)
    def default_ttl() -> None:
        lock = current_lock()
        assert lock is not None
        ttls.append(lock.ttl)

    @eager_app.task(base=SingletonTask, lock_ttl=7)
    def own_ttl() -> None:
        lock = current_lock()
        assert lock is not None
        ttls.append(lock.ttl)

    default_ttl.delay()
    own_ttl.delay()
    assert ttls == [45, 7]


def test_arguments_without_a_key_fail_the_task_without_running_it(eager_app: Celery) -> None:
    ran: list[Any] = []

    @eager_app.task(base=SingletonTask)
    def process(payload: Any) -> None:
        ran.append(payload)

    with pytest.raises(LockKeyError) as info:
        process(object())
    assert info.value.argument == "payload"
    assert ran == []


# -- losing the lock mid-run ---------------------------------------------------------------


def _lose_current_lock(clock: Any, keeper: LeaseKeeper) -> None:
    held = current_lock()
    assert held is not None
    clock.advance(held.ttl)  # no renewal confirmed in time
    keeper.renew_due()
    assert held.lost


def test_on_lock_lost_log_finishes_the_task_and_reports_the_loss(
    eager_app: Celery, clock, keeper: LeaseKeeper, record_signal, caplog: pytest.LogCaptureFixture
) -> None:
    lost = record_signal(lock_lost)

    @eager_app.task(base=SingletonTask)
    def long_job(n: int) -> str:
        _lose_current_lock(clock, keeper)
        return "done"

    with caplog.at_level(logging.ERROR, logger="celery_singleton_lock.lease"):
        result = long_job.delay(1)
    assert result.state == "SUCCESS"
    assert result.result == "done"
    assert len(lost) == 1
    assert lost[0]["key"] == long_job.lock_key_for((1,), {})
    assert lost[0]["sender"].name == long_job.name
    assert any(r.levelno == logging.ERROR for r in caplog.records if r.name == "celery_singleton_lock.lease")


@pytest.mark.parametrize("style", STYLES[:2])
def test_on_lock_lost_raise_fails_the_task_with_lock_lost(
    style: str, eager_app: Celery, clock, keeper: LeaseKeeper
) -> None:
    ran: list[int] = []

    def long_job(n: int) -> str:
        _lose_current_lock(clock, keeper)
        ran.append(n)
        return "done"

    task = decorate(style, eager_app, long_job, on_lock_lost="raise")
    result = task.delay(1)
    assert ran == [1]
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockLost)
    assert result.result.key == task.lock_key_for((1,), {})


# -- options are checked at decoration -----------------------------------------------------

BAD_OPTIONS = [
    ("lock_ttl", 0),
    ("lock_ttl", -1),
    ("lock_ttl", "60"),
    ("on_contention", "sometimes"),
    ("on_contention", 42),
    ("on_contention", "skip|retry"),
    ("on_contention", LockKeyError),  # a class that is no policy: LockKeyError() needs a message
    ("on_lock_lost", "ignore"),
    ("lock_key", ("nope",)),
    ("lock_key", "invoice:{nope}"),
    ("lock_key", "invoice:{}"),
    ("lock_key", 42),
]


def invoice(invoice_id: int) -> None: ...


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_option_of_app_task_is_rejected_when_bound(eager_app: Celery, option: str, value: Any) -> None:
    eager_app.finalize()  # a finalized app binds a task at decoration time
    with pytest.raises(ConfigurationError) as info:
        eager_app.task(base=SingletonTask, **{option: value})(invoice)
    assert info.value.option == option
    assert option in str(info.value)


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
@pytest.mark.parametrize("with_app", [True, False])
def test_bad_option_of_singleton_task_is_rejected_at_decoration(
    eager_app: Celery, option: str, value: Any, with_app: bool
) -> None:
    decorator = (
        singleton_task(eager_app, **{option: value}) if with_app else singleton_task(**{option: value})
    )
    with pytest.raises(ConfigurationError) as info:
        decorator(invoice)
    assert info.value.option == option
    assert option in str(info.value)


def test_singleton_task_with_bind_checks_the_key_against_the_arguments_after_self(
    eager_app: Celery,
) -> None:
    @singleton_task(eager_app, bind=True, lock_key=("invoice_id",))
    def send(self: Any, invoice_id: int) -> str:
        return self.request.id

    assert send.delay(1).state == "SUCCESS"
    with pytest.raises(ConfigurationError) as info:
        singleton_task(eager_app, bind=True, lock_key=("self",))(lambda self, invoice_id: None)
    assert info.value.option == "lock_key"


# -- self.retry() --------------------------------------------------------------------------


def test_self_retry_releases_the_lock_before_the_retry_is_published(
    eager_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run the way a worker does (not eager), so that retry() publishes a message.
    eager_app.conf.task_always_eager = False

    @eager_app.task(base=SingletonTask, bind=True)
    def flaky(self: Any, n: int) -> None:
        raise self.retry(countdown=5, max_retries=1)

    task = eager_app.tasks[flaky.name]
    key = task.lock_key_for((3,), {})
    free_when_published: list[bool] = []

    def publish(*args: Any, **kwargs: Any) -> None:
        free_when_published.append(is_free(eager_app, key))

    monkeypatch.setattr(task, "apply_async", publish)
    task_id = str(uuid.uuid4())
    tracer = build_tracer(task.name, task, app=eager_app, eager=False, propagate=False)
    outcome = tracer(task_id, (3,), {}, {"id": task_id, "retries": 0, "delivery_info": {}})

    assert outcome.info.state == "RETRY"
    assert free_when_published == [True]
    assert is_free(eager_app, key)


def test_self_retry_in_eager_mode_runs_again_with_the_lock(eager_app: Celery) -> None:
    runs: list[tuple[int, bool]] = []

    @eager_app.task(base=SingletonTask, bind=True)
    def flaky(self: Any, n: int) -> str:
        held = current_lock()
        runs.append((self.request.retries, held is not None and not held.lost))
        if self.request.retries < 2:
            raise self.retry(countdown=0, max_retries=3)
        return "finally"

    result = flaky.delay(3)
    assert result.state == "SUCCESS"
    assert result.result == "finally"
    assert runs == [(0, True), (1, True), (2, True)]
    assert is_free(eager_app, flaky.lock_key_for((3,), {}))


# -- options as class attributes -----------------------------------------------------------


def test_class_based_task_takes_its_options_from_class_attributes(eager_app: Celery) -> None:
    class SyncAccount(SingletonTask):
        name = "unit.sync_account"
        lock_key = ("account_id",)
        lock_ttl = 9

        def run(self, account_id: int, verbose: bool = False) -> tuple[float, str]:
            held = current_lock()
            assert held is not None
            return held.ttl, held.key

    task = eager_app.register_task(SyncAccount())
    key = task.lock_key_for((3,), {})
    assert task.lock_key_for((3,), {"verbose": True}) == key  # verbose is not part of the key
    assert task.delay(3, verbose=True).result == (9.0, key)


def test_class_based_task_with_a_bad_attribute_is_rejected_when_registered(eager_app: Celery) -> None:
    class Broken(SingletonTask):
        name = "unit.broken"
        on_contention = "sometimes"

        def run(self, x: int) -> None: ...

    with pytest.raises(ConfigurationError) as info:
        eager_app.register_task(Broken())
    assert info.value.option == "on_contention"


# -- README ----------------------------------------------------------------------------------


def test_the_readme_example_of_a_policy_of_ones_own_runs_and_prints_what_it_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### Writing your own policy"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    promised = [line.split("# ", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")]
    assert capsys.readouterr().out.splitlines() == promised


def test_the_body_sees_its_own_request_also_when_it_calls_itself_directly(eager_app: Celery) -> None:
    # The tracer's run calls the body directly (it pushed the request already); a nested
    # direct call still gets a request of its own, with its own arguments, as in Celery.
    seen: list[tuple[str | None, tuple[Any, ...], bool]] = []

    @eager_app.task(base=SingletonTask, bind=True)
    def countdown(self: Any, n: int) -> None:
        seen.append((self.request.id, tuple(self.request.args), bool(self.request.called_directly)))
        if n:
            countdown(n - 1)  # another key (other arguments): it runs, nested

    result = countdown.apply(args=(1,))
    assert result.successful()
    assert seen[0] == (result.id, (1,), False)
    # The nested call's request is what Celery itself gives one (it changed in 5.7: the
    # id is kept; before, a direct call had no id).
    plain_seen: list[tuple[str | None, tuple[Any, ...], bool]] = []

    @eager_app.task(bind=True)
    def plain(self: Any, n: int) -> None:
        plain_seen.append((self.request.id, tuple(self.request.args), bool(self.request.called_directly)))
        if n:
            plain(n - 1)

    plain_result = plain.apply(args=(1,))
    same_id = [(entry[0] == result.id, *entry[1:]) for entry in seen]
    assert same_id == [(entry[0] == plain_result.id, *entry[1:]) for entry in plain_seen]
