"""The helpers our users' tests use (celery_singleton_lock.testing): one store with the
tasks, hold_lock, locking_disabled, the recorded events and their assertions."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_singleton_lock import SingletonTask, current_lock, singleton_task
from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.config import settings_for
from celery_singleton_lock.testing import (
    HOLD_LOCK_TASK_ID,
    LockServerUnavailable,
    hold_lock,
    lock_server,
    locking_disabled,
    record_lock_events,
    use_lock_backend,
)


@pytest.fixture
def shop() -> Iterator[Celery]:
    """A user's app as it is configured for production: its locks on a Redis."""
    app = Celery("shop", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, singleton_lock_backend="redis://127.0.0.1:1/0")
    yield app
    app.close()


def test_memory_lock_backend_is_the_store_that_memory_tasks_use(memory_lock_backend: MemoryBackend) -> None:
    app = Celery("shop", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, singleton_lock_backend="memory://")

    @app.task(base=SingletonTask)
    def rebuild(day: str) -> str:
        return day

    held = memory_lock_backend.acquire(rebuild.lock_key_for(("mon",), {}), ttl=30)
    assert held is not None
    assert rebuild.delay("mon").result is None  # skipped: the fixture's lock is the task's
    held.release()
    assert rebuild.delay("mon").result == "mon"


def test_use_lock_backend_points_the_tasks_at_it_and_restores_the_app(shop: Celery) -> None:
    @shop.task(base=SingletonTask)
    def rebuild(day: str) -> str:
        return day

    with use_lock_backend(shop, "memory://", ttl=7) as backend:
        assert rebuild.lock_options().ttl == 7
        held = backend.acquire(rebuild.lock_key_for(("mon",), {}), ttl=30)
        assert held is not None
        assert rebuild.delay("mon").result is None
    # Left as the user configured it; the store is empty again.
    assert settings_for(shop).backend_url == "redis://127.0.0.1:1/0"
    assert rebuild.lock_options().ttl == 60
    assert "singleton_lock_ttl" not in shop.conf.changes
    assert held.backend.acquire(rebuild.lock_key_for(("mon",), {}), ttl=1) is not None


def test_hold_lock_makes_that_call_meet_a_taken_lock(shop: Celery, caplog: pytest.LogCaptureFixture) -> None:
    @singleton_task(shop, lock_key=("account_id",))
    def sync(account_id: int, full: bool = False) -> int:
        return account_id

    caplog.set_level(logging.INFO, logger="celery_singleton_lock.task")
    with use_lock_backend(shop), record_lock_events() as events:
        with hold_lock(sync, account_id=7) as held:
            assert held.owner.task_id == HOLD_LOCK_TASK_ID
            skipped = sync.delay(7, full=True)
            other = sync.delay(8)
        after = sync.delay(7)
        events.assert_skipped(skipped)
        events.assert_not_skipped(other)
        events.assert_ran_locked(after)
        assert [e.task_name for e in events.skipped] == [sync.name]
    assert any(skipped.id in r.getMessage() for r in caplog.records)


def test_hold_lock_of_a_held_lock_fails_the_test(shop: Celery) -> None:
    @shop.task(base=SingletonTask)
    def rebuild(day: str) -> None: ...

    with (
        use_lock_backend(shop),
        hold_lock(rebuild, "mon"),
        pytest.raises(AssertionError, match="already held"),
        hold_lock(rebuild, "mon"),
    ):
        pass


def test_the_assertions_say_what_happened_instead(shop: Celery) -> None:
    @shop.task(base=SingletonTask)
    def rebuild(day: str) -> str:
        return day

    with use_lock_backend(shop), record_lock_events() as events:
        ran = rebuild.delay("mon")
        with hold_lock(rebuild, "tue"):
            skipped = rebuild.delay("tue")
        with pytest.raises(AssertionError, match=rf"call {ran.id} was not skipped .*rebuild\[{skipped.id}\]"):
            events.assert_skipped(ran)
        with pytest.raises(AssertionError, match="was skipped"):
            events.assert_not_skipped(skipped.id)
        with pytest.raises(AssertionError, match="never held its lock"):
            events.assert_ran_locked(skipped)
        with pytest.raises(TypeError, match="AsyncResult"):
            events.assert_skipped(42)


def test_locking_disabled_runs_bodies_without_a_lock(shop: Celery) -> None:
    seen: list[object] = []

    @shop.task(base=SingletonTask, enqueue_once=True)
    def rebuild(day: str) -> str:
        seen.append(current_lock())
        return day

    other = Celery("other", broker="memory://", set_as_current=False)
    other.conf.update(task_always_eager=True, singleton_lock_backend="memory://")

    @other.task(base=SingletonTask)
    def elsewhere(day: str) -> str:
        return day

    with (
        use_lock_backend(shop),
        use_lock_backend(other),
        hold_lock(rebuild, "mon"),
        hold_lock(elsewhere, "mon"),
    ):
        with locking_disabled(shop):
            assert rebuild.delay("mon").result == "mon"
            assert elsewhere.delay("mon").result is None  # another app: still locked
        with locking_disabled():
            assert elsewhere.delay("mon").result == "mon"
        assert rebuild.delay("mon").result is None
    assert seen == [None]
    other.close()


def test_lock_server_without_its_program_or_docker_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    monkeypatch.delenv("CSL_REQUIRE_DOCKER", raising=False)
    with pytest.raises(LockServerUnavailable) as info, lock_server("redis"):
        pass
    assert "redis-server is not on PATH" in str(info.value)
    assert "no Docker daemon answers (docker.from_env" in str(info.value)
    monkeypatch.setenv("CSL_REQUIRE_DOCKER", "1")
    asks = "CSL_REQUIRE_DOCKER=1 asks for a container"
    with pytest.raises(LockServerUnavailable, match=asks), lock_server("redis"):
        pass
    with pytest.raises(ValueError, match="unknown lock server kind 'mysql'"), lock_server("mysql"):
        pass
