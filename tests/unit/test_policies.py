"""Contention policies: parsing, Retry's countdowns, validation, composition, outcomes."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from celery_singleton_lock.backends.base import Refused
from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.errors import ConfigurationError, LockContended
from celery_singleton_lock.lease import HeldLock
from celery_singleton_lock.policies import (
    DEFAULT_CONTENTION_RETRIES,
    RETRIES_HEADER,
    Contention,
    Raise,
    Retry,
    Skip,
    Skipped,
    Wait,
    backoff_delay,
    parse_policy,
)

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


class Busy:
    """A user's policy class, made without arguments."""

    def __call__(self, contention: Contention) -> Skipped:
        return Skipped("busy")


class NeedsArguments:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, contention: Contention) -> Skipped:
        return Skipped(self.reason)


def test_parse_policy_makes_a_users_policy_class_with_no_arguments() -> None:
    policy = parse_policy(Busy)
    assert isinstance(policy, Busy)


def test_a_policy_class_that_needs_arguments_is_a_configuration_error_naming_the_option() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_policy(NeedsArguments)
    assert info.value.option == "on_contention"
    assert "on_contention=NeedsArguments" in str(info.value)
    assert "pass an instance" in str(info.value)


def test_a_class_whose_instances_are_not_callable_is_not_a_policy() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_policy(dict, "singleton_lock_on_contention")
    assert info.value.option == "singleton_lock_on_contention"
    assert "not a callable policy" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("retry|skip", Retry() | Skip()),
        (" Wait | retry|SKIP ", Wait() | Retry() | Skip()),
        ("wait|raise", Wait(then=Raise())),
        ("retry|retry", Retry(then=Retry())),
    ],
)
def test_parse_policy_reads_a_chain_of_names(text: str, expected: Any) -> None:
    assert parse_policy(text) == expected


@pytest.mark.parametrize("text", ["skip|retry", "retry|raise|skip", "wait|skip|wait"])
def test_a_chain_of_names_with_an_unreachable_step_names_the_option(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_policy(text, "singleton_lock_on_contention")
    assert info.value.option == "singleton_lock_on_contention"
    assert f"singleton_lock_on_contention={text!r}" in str(info.value)
    assert "never runs out" in str(info.value)


@pytest.mark.parametrize(
    "bad", ["sometimes", "", "skipp", 42, None, ["skip"], "retry|", "|skip", "retry||skip", "retry|later"]
)
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


def test_backoff_delay_is_exponential_and_capped() -> None:
    delays = [backoff_delay(n, first=1, factor=2, cap=10) for n in range(6)]
    assert delays == [1, 2, 4, 8, 10, 10]
    assert backoff_delay(5000, first=1, factor=2.0, cap=60) == 60  # no OverflowError


def test_backoff_delay_draws_within_its_spread_and_never_above_the_cap() -> None:
    rng = random.Random(3)
    # The outage retries' shape: each delay drawn from the upper half of 2**n.
    for attempt in range(5):
        samples = [
            backoff_delay(attempt, first=1, factor=2, cap=60, spread=(0.5, 1.0), rng=rng) for _ in range(200)
        ]
        assert all(2**attempt / 2 <= s <= 2**attempt for s in samples)
        assert max(samples) - min(samples) > 2**attempt / 4
    capped = [backoff_delay(6, first=1, factor=2, cap=60, spread=(0.9, 1.1), rng=rng) for _ in range(200)]
    assert max(capped) <= 60


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


def test_wait_alone_retries_when_it_times_out() -> None:
    assert Wait().then is None  # "what Wait does alone": Retry()
    assert Wait(5) | Retry() != Wait(5)  # but an explicit Retry() is a chain of its own


POLICIES = [Skip(), Retry(countdown=1), Wait(timeout=2), Raise()]


@pytest.mark.parametrize("first", [Retry(countdown=1, max_retries=3), Wait(timeout=2)])
@pytest.mark.parametrize("then", POLICIES)
def test_a_policy_that_can_run_out_takes_any_policy_after_it(first: Any, then: Any) -> None:
    chained = first | then
    assert type(chained) is type(first)
    assert chained.then == then
    assert chained == type(first)(**{**vars(first), "then": then})


@pytest.mark.parametrize("first", [Skip(), Skip(result="busy"), Raise()])
@pytest.mark.parametrize("then", [*POLICIES, "retry"])
def test_nothing_can_come_after_skip_or_raise(first: Any, then: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        first | then
    assert info.value.option == "on_contention"
    assert f"nothing can come after {first!r}" in str(info.value)
    assert "never runs out" in str(info.value)


def test_chains_of_three_and_more_nest_the_same_way_however_grouped() -> None:
    left = (Wait(5) | Retry(max_retries=2)) | Skip("late")
    right = Wait(5) | (Retry(max_retries=2) | Skip("late"))
    assert left == right == Wait(5, then=Retry(max_retries=2, then=Skip("late")))
    longest = Wait(1) | Retry(max_retries=1) | Wait(2) | Retry(max_retries=5) | Raise()
    assert longest.then.then.then.then == Raise()


def test_an_unreachable_step_anywhere_in_a_chain_is_found() -> None:
    with pytest.raises(ConfigurationError, match=r"after Skip\(\)"):
        Wait(5) | Retry(max_retries=2) | Skip() | Raise()
    with pytest.raises(ConfigurationError, match=r"after Skip\(\)"):
        Wait(5, then=Skip()) | Raise()


def test_nothing_can_come_after_a_plain_function() -> None:
    def busy(contention: Contention) -> Skipped:
        return Skipped("busy")

    assert (Retry(max_retries=1) | busy).then is busy
    with pytest.raises(ConfigurationError, match="plain callable"):
        Retry(max_retries=1) | busy | Skip()


def test_a_users_policy_class_after_a_chain_is_made_with_no_arguments() -> None:
    assert isinstance((Retry(max_retries=1) | Busy).then, Busy)


@pytest.mark.parametrize(
    ("policy", "text"),
    [
        (Skip(), "Skip()"),
        (Retry(max_retries=3) | Skip(), "Retry(max_retries=3) | Skip()"),
        (Wait(timeout=5) | Retry(countdown=30.0) | Skip(result="busy"),
         "Wait(timeout=5) | Retry(countdown=30.0) | Skip(result='busy')"),
        (Retry(countdown=1.0, max_retries=2, backoff=2.0, jitter=0.0) | Raise(),
         "Retry(countdown=1.0, max_retries=2, backoff=2.0, jitter=0.0) | Raise()"),
    ],
)
def test_a_chain_prints_as_it_is_written_and_reads_back(policy: Any, text: str) -> None:
    assert repr(policy) == text
    assert eval(text) == policy  # our own literal


def test_equal_chains_hash_alike() -> None:
    assert hash(Retry(max_retries=3) | Skip()) == hash(Retry(max_retries=3, then=Skip()))
    assert Retry(max_retries=3) | Skip() != Retry(max_retries=3) | Raise()


def test_a_non_policy_then_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="then"):
        Retry(then=42)  # type: ignore[arg-type]


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


def test_wait_alone_that_times_out_retries(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    with pytest.raises(LockContended, match="direct call cannot be retried"):  # Retry(), alone
        Wait(timeout=0)(contention)


# -- chains at run time: when each policy runs out -----------------------------------------


class Retried(Exception):
    """What FakeTask.retry_for_lock returns for the policy to raise."""

    def __init__(self, countdown: float, exc: LockContended) -> None:
        super().__init__(str(exc))
        self.countdown = countdown
        self.message = str(exc)


class FakeTask:
    """Just what Contention reads of a Celery task: its request and max_retries."""

    def __init__(self, contended_retries: int, *, max_retries: int | None = 3, direct: bool = False) -> None:
        self.max_retries = max_retries
        self.request = SimpleNamespace(
            called_directly=direct, is_eager=False, retries=0,
            **{RETRIES_HEADER: {"contended": contended_retries}},
        )

    def retry_for_lock(self, reason: str, countdown: float, exc: LockContended) -> Retried:
        assert reason == "contended"
        return Retried(countdown, exc)


def decide(policy: Any, contention: Contention, retries: int, **task: Any) -> Any:
    """What ``policy`` does on a run already retried ``retries`` times for contention:
    the Retried it raised, the LockContended it raised, or what it returned."""
    contention.task = FakeTask(retries, **task)  # type: ignore[assignment]
    try:
        return policy(contention)
    except (Retried, LockContended) as exc:
        return exc


def test_retry_then_skip_retries_max_retries_times_then_skips(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    policy = Retry(countdown=1, max_retries=3, jitter=0) | Skip("gave up")
    outcomes = [decide(policy, contention, n) for n in range(5)]
    assert [type(o).__name__ for o in outcomes] == ["Retried"] * 3 + ["Skipped"] * 2
    assert [o.message.rsplit("; ", 1)[1] for o in outcomes[:3]] == [
        "retry 1 of 3 in 1.00s", "retry 2 of 3 in 1.00s", "retry 3 of 3 in 1.00s"
    ]
    assert outcomes[3] == Skipped("gave up")


def test_retry_alone_gives_up_with_lock_contended(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    outcome = decide(Retry(max_retries=2), contention, 2)
    assert isinstance(outcome, LockContended)
    assert "gave up after 2 retries" in str(outcome)


def test_retry_then_raise_fails_with_the_plain_contended_error(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    outcome = decide(Retry(max_retries=1) | Raise(), contention, 1)
    assert isinstance(outcome, LockContended)
    assert str(outcome) == "lock 'report:1' is held by another task"


def test_retry_without_max_retries_has_a_budget_of_its_own_not_the_tasks(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    policy = Retry() | Skip("done")
    assert Retry().max_retries == DEFAULT_CONTENTION_RETRIES == 100
    # The task's max_retries (its own self.retry() budget) plays no part.
    assert isinstance(decide(policy, contention, 99, max_retries=1), Retried)
    assert decide(policy, contention, 100, max_retries=1) == Skipped("done")
    assert decide(policy, contention, 100, max_retries=None) == Skipped("done")
    # max_retries=None: Retry never runs out, and what follows never runs.
    assert isinstance(decide(Retry(max_retries=None) | Skip(), contention, 10_000), Retried)


def test_retry_runs_out_at_once_for_a_direct_call(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    assert decide(Retry(max_retries=3) | Skip("direct"), contention, 0, direct=True) == Skipped("direct")
    alone = decide(Retry(max_retries=3), contention, 0, direct=True)
    assert isinstance(alone, LockContended)
    assert "direct call cannot be retried" in str(alone)


def test_each_retry_of_a_chain_counts_its_own_retries(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    policy = (
        Retry(countdown=1, max_retries=2, jitter=0)
        | Retry(countdown=60, max_retries=3, backoff=2, backoff_max=1000, jitter=0)
        | Skip("exhausted")
    )
    outcomes = [decide(policy, contention, n) for n in range(7)]
    retried = [o for o in outcomes if isinstance(o, Retried)]
    assert [o.countdown for o in retried] == [1, 1, 60, 120, 240]  # the second's backoff starts anew
    assert [o.message.rsplit("; ", 1)[1].split(" in ")[0] for o in retried] == [
        "retry 1 of 2", "retry 2 of 2", "retry 1 of 3", "retry 2 of 3", "retry 3 of 3"
    ]
    assert outcomes[5:] == [Skipped("exhausted")] * 2


def test_retry_then_wait_waits_once_the_retries_are_spent(backend: MemoryBackend) -> None:
    holder, contention = contention_on(backend, "report:1")
    policy = Retry(max_retries=1) | Wait(timeout=0) | Skip("still busy")
    assert isinstance(decide(policy, contention, 0), Retried)
    assert decide(policy, contention, 1) == Skipped("still busy")  # waited 0 s, timed out
    holder.release()
    held = decide(Retry(max_retries=1) | Wait(timeout=5) | Skip("still busy"), contention, 1)
    assert isinstance(held, HeldLock)
    assert backend.release(held) is True


def test_wait_then_retry_then_skip_waits_on_every_run(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    waits: list[float | None] = []
    real_wait = contention.backend.wait

    def counting_wait(*args: Any, timeout: float | None, **kwargs: Any) -> Any:
        waits.append(timeout)
        return real_wait(*args, timeout=timeout, **kwargs)

    contention.backend.wait = counting_wait  # type: ignore[method-assign]
    policy = Wait(timeout=0) | Retry(max_retries=2) | Skip("late")
    outcomes = [decide(policy, contention, n) for n in range(3)]
    assert [type(o).__name__ for o in outcomes] == ["Retried", "Retried", "Skipped"]
    assert waits == [0, 0, 0]


def test_wait_then_wait_waits_twice(backend: MemoryBackend) -> None:
    _, contention = contention_on(backend, "report:1")
    assert (Wait(timeout=0) | Wait(timeout=0) | Skip("twice"))(contention) == Skipped("twice")
