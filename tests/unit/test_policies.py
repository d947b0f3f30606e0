"""Contention policies: parsing, Retry's countdowns, validation, composition, outcomes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from celery_singleton_lock.backends.base import Refused
from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.errors import ConfigurationError, LockContended
from celery_singleton_lock.lease import HeldLock
from celery_singleton_lock.policies import Contention, Raise, Retry, Skip, Skipped, Wait, parse_policy

# -- parse_policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("skip", Skip()), ("retry", Retry()), ("wait", Wait()), ("raise", Raise()), (" Skip ", Skip())],
)
def test_parse_policy_reads_the_four_names(name: str, expected: Any) -> None:
    assert parse_policy(name) == expected


def test_parse_policy_accepts_policy_objects_classes_and_callables() -> None:
    retry = Retry(countdown=3)
    assert parse_policy(retry) is retry
    assert parse_policy(Raise) == Raise()

    def custom(contention: Contention) -> Skipped:
        return Skipped("custom")

    assert parse_policy(custom) is custom


@pytest.mark.parametrize("bad", ["sometimes", "", "skipp", 42, None, ["skip"]])
def test_parse_policy_rejects_anything_else_naming_the_option(bad: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_policy(bad)
    assert info.value.option == "on_contention"
    assert "on_contention" in str(info.value)


def test_parse_policy_names_the_option_it_is_given() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_policy("sometimes", "singleton_lock_on_contention")
    assert info.value.option == "singleton_lock_on_contention"
    assert "singleton_lock_on_contention" in str(info.value)


# -- Retry's countdowns --------------------------------------------------------------------


def test_retry_countdown_without_jitter_grows_by_backoff_up_to_backoff_max() -> None:
    retry = Retry(countdown=10, backoff=2, backoff_max=60, jitter=0)
    assert [retry.countdown_for(n) for n in range(6)] == [10, 20, 40, 60, 60, 60]


def test_retry_countdown_without_backoff_stays_the_same() -> None:
    retry = Retry(countdown=7, jitter=0)
    assert {retry.countdown_for(n) for n in range(10)} == {7}


def test_retry_jitter_spreads_countdowns_within_its_fraction() -> None:
    retry = Retry(countdown=10, backoff=2, backoff_max=1000, jitter=0.2, _random=random.Random(7))
    for retries, base in [(0, 10), (1, 20), (3, 80)]:
        samples = [retry.countdown_for(retries) for _ in range(300)]
        assert all(base * 0.8 <= s <= base * 1.2 for s in samples)
        assert max(samples) - min(samples) > base * 0.2  # the spread is actually used
    assert Retry(countdown=0, jitter=1).countdown_for(0) == 0


def test_retry_countdown_never_exceeds_backoff_max_even_with_jitter() -> None:
    retry = Retry(countdown=10, backoff=2, backoff_max=60, jitter=0.1, _random=random.Random(7))
    assert max(retry.countdown_for(10) for _ in range(300)) <= 60


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"countdown": -1}, "countdown"),
        ({"countdown": "10"}, "countdown"),
        ({"countdown": True}, "countdown"),
        ({"backoff": 0.5}, "backoff"),
        ({"backoff_max": -1}, "backoff_max"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
    ],
)
def test_invalid_retry_arguments_are_configuration_errors(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Retry(**kwargs)
    assert info.value.option == "on_contention"
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"timeout": -1}, "timeout"), ({"timeout": "5"}, "timeout"), ({"then": 42}, "then")],
)
def test_invalid_wait_arguments_are_configuration_errors(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Wait(**kwargs)
    assert info.value.option == "on_contention"
    assert named in str(info.value)


# -- composition ---------------------------------------------------------------------------


def test_wait_or_retry_waits_then_retries() -> None:
    combined = Wait(5) | Retry(30)
    assert combined == Wait(timeout=5, then=Retry(countdown=30))
    assert combined.timeout == 5
    assert combined.then == Retry(countdown=30)


def test_wait_or_a_policy_name() -> None:
    assert Wait(2) | "raise" == Wait(timeout=2, then=Raise())


def test_wait_or_a_non_policy_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        Wait(2) | 42  # type: ignore[operator]


def test_wait_falls_back_to_retry_by_default() -> None:
    assert Wait().then == Retry()


# -- what each policy decides --------------------------------------------------------------


@pytest.fixture
def backend(clock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


def contention_on(backend: MemoryBackend, key: str) -> tuple[HeldLock, Contention]:
    """Hold ``key`` and return the holder and the contention a second taker meets."""
    holder = backend.acquire(key, ttl=30)
    assert holder is not None
    refused = backend.attempt(key, ttl=30)
    assert isinstance(refused, Refused)
    owner = Owner(host="test", pid=1)
    return holder, Contention(key=key, ttl=30, backend=backend, owner=owner, refused=refused)


def test_skip_returns_skipped_with_its_result(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    assert Skip()(contention) == Skipped(None)
    assert Skip(result={"skipped": True})(contention) == Skipped({"skipped": True})


def test_raise_raises_lock_contended_with_the_key(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    with pytest.raises(LockContended) as info:
        Raise()(contention)
    assert info.value.key == "report:1"
    assert "report:1" in str(info.value)


def test_retry_outside_a_task_raises_lock_contended(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    assert not contention.can_retry
    with pytest.raises(LockContended) as info:
        Retry()(contention)
    assert info.value.key == "report:1"


def test_wait_that_times_out_hands_over_to_then(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    assert Wait(timeout=0, then=Skip("too late"))(contention) == Skipped("too late")


def test_wait_returns_the_lock_once_the_holder_released(backend: MemoryBackend) -> None:
    holder, contention = contention_on(backend, "report:1")
    assert holder.release() is True
    held = Wait(timeout=5, then=Raise())(contention)
    assert isinstance(held, HeldLock)
    assert held.key == "report:1"
    assert held.fencing_token > holder.fencing_token
    assert backend.release(held) is True
