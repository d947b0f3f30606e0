"""The lock API on the memory backend, and the lease keeper, driven by a fake clock.

The keeper's thread never runs here (see conftest); each test calls ``renew_due()``
where the thread would have woken up.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence

import pytest

from celery_singleton_lock import HeldLock, LockContended, LockLost
from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.errors import LockBackendUnavailable
from celery_singleton_lock.lease import LEARNT_MARGIN, LeaseKeeper, clock_drift
from celery_singleton_lock.signals import lock_lost, lock_released

TTL = 30.0


@pytest.fixture
def backend(clock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


@pytest.fixture
def renew_calls(backend: MemoryBackend, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every round trip to the backend's ``_renew``, as the list of keys it carried."""
    calls: list[list[str]] = []
    real = backend._renew

    def spy(items: Sequence[tuple[str, str, float]]) -> list[bool]:
        calls.append([key for key, _, _ in items])
        return real(items)

    monkeypatch.setattr(backend, "_renew", spy)
    return calls


def take(backend: MemoryBackend, key: str, ttl: float = TTL) -> HeldLock:
    held = backend.acquire(key, ttl=ttl)
    assert held is not None
    return held


# -- acquire and release -------------------------------------------------------------------


def test_acquire_returns_a_held_lock(backend: MemoryBackend) -> None:
    held = take(backend, "report:42")
    assert isinstance(held, HeldLock)
    assert held.key == "report:42"
    assert held.ttl == TTL
    assert not held.lost
    assert not held.released
    held.ensure_held()


def test_fencing_tokens_increase_with_every_acquisition_of_a_key(backend: MemoryBackend, clock) -> None:
    tokens = []
    for _ in range(3):
        held = take(backend, "report:42")
        tokens.append(held.fencing_token)
        assert held.release() is True
    expired = take(backend, "report:42", ttl=5)
    clock.advance(6)  # its lease expires without a release
    tokens.append(expired.fencing_token)
    tokens.append(take(backend, "report:42").fencing_token)
    assert tokens == sorted(set(tokens))


def test_fencing_tokens_are_per_key(backend: MemoryBackend) -> None:
    a1 = take(backend, "a")
    take(backend, "b").release()
    take(backend, "b").release()
    a1.release()
    assert take(backend, "a").fencing_token == a1.fencing_token + 1


def test_release_returns_true_then_false(backend: MemoryBackend, record_signal) -> None:
    released = record_signal(lock_released)
    held = take(backend, "report:42")
    assert backend.release(held) is True
    assert held.released
    assert backend.release(held) is False
    assert held.release() is False
    assert [(call["key"], call["held"], call["was_held"]) for call in released] == [("report:42", held, True)]


def test_a_second_release_of_an_old_handle_leaves_the_new_holder_alone(backend: MemoryBackend) -> None:
    old = take(backend, "report:42")
    old.release()
    new = take(backend, "report:42")
    assert old.release() is False
    assert backend.acquire("report:42", ttl=TTL) is None  # still the new holder's
    new.ensure_held()


def test_a_second_acquire_while_held_returns_none(backend: MemoryBackend) -> None:
    held = take(backend, "report:42")
    assert backend.acquire("report:42", ttl=TTL) is None
    assert backend.acquire("report:43", ttl=TTL) is not None  # other keys are free
    held.release()
    assert backend.acquire("report:42", ttl=TTL) is not None


def test_a_lock_is_free_again_once_its_ttl_passed_unrenewed(backend: MemoryBackend, clock) -> None:
    take(backend, "report:42", ttl=10)
    clock.advance(9.9)
    assert backend.acquire("report:42", ttl=TTL) is None
    clock.advance(0.2)
    assert backend.acquire("report:42", ttl=TTL) is not None


def test_a_released_lock_cannot_be_ensured(backend: MemoryBackend) -> None:
    held = take(backend, "report:42")
    held.release()
    with pytest.raises(LockLost):
        held.ensure_held()


@pytest.mark.parametrize("options", [{"blocking": False}, {"timeout": 0}])
def test_lock_context_raises_contended_without_running_the_body(backend: MemoryBackend, options) -> None:
    holder = take(backend, "report:42")
    body_ran = []
    with pytest.raises(LockContended) as info, backend.lock("report:42", ttl=TTL, **options):
        body_ran.append(True)
    assert body_ran == []
    assert info.value.key == "report:42"
    assert holder.release() is True  # the holder was not disturbed


def test_lock_context_holds_the_lock_for_the_block_and_releases_it(backend: MemoryBackend) -> None:
    with backend.lock("report:42", ttl=TTL, timeout=0) as held:
        assert held.key == "report:42"
        assert backend.acquire("report:42", ttl=TTL) is None
    assert held.released
    assert backend.acquire("report:42", ttl=TTL) is not None


def test_lock_context_releases_when_the_body_raises(backend: MemoryBackend) -> None:
    with pytest.raises(RuntimeError), backend.lock("report:42", ttl=TTL, timeout=0):
        raise RuntimeError("boom")
    assert backend.acquire("report:42", ttl=TTL) is not None


@pytest.mark.parametrize(("key", "ttl"), [("", 1), ("k", 0), ("k", -1), ("k", True)])
def test_bad_key_or_ttl_is_a_configuration_error(backend: MemoryBackend, key: str, ttl: float) -> None:
    from celery_singleton_lock import ConfigurationError

    with pytest.raises(ConfigurationError):
        backend.acquire(key, ttl=ttl)


# -- renewal -------------------------------------------------------------------------------


def test_many_due_locks_are_renewed_in_one_backend_call(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]]
) -> None:
    locks = [take(backend, f"job:{i}") for i in range(100)]
    clock.advance(TTL / 3)
    keeper.renew_due()
    assert len(renew_calls) == 1
    assert sorted(renew_calls[0]) == sorted(f"singleton-lock:job:{i}" for i in range(100))
    assert keeper.renewal_calls == 1
    # Renewed: still held well past the first TTL, and so on the backend too.
    clock.advance(TTL - 1)
    assert not any(held.lost for held in locks)
    assert backend.acquire("job:0", ttl=TTL) is None


def test_locks_not_due_are_not_renewed(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]]
) -> None:
    take(backend, "job:1")
    clock.advance(1)
    keeper.renew_due()
    assert renew_calls == []


def test_a_lock_due_soon_joins_the_batch_of_a_due_one(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]]
) -> None:
    early = take(backend, "early")
    clock.advance(4)
    late = take(backend, "late")  # due 4 s after "early", within a sixth of the TTL
    clock.advance(TTL / 3 - 4)
    keeper.renew_due()
    assert len(renew_calls) == 1
    assert sorted(renew_calls[0]) == ["singleton-lock:early", "singleton-lock:late"]
    assert early.valid_for == late.valid_for == pytest.approx(TTL - clock_drift(TTL))


def test_renewed_locks_outlive_many_ttls(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]]
) -> None:
    held = take(backend, "long")
    for _ in range(10):
        clock.advance(TTL / 3)
        keeper.renew_due()
    assert len(renew_calls) == 10
    assert not held.lost
    held.ensure_held()
    assert backend.acquire("long", ttl=TTL) is None
    assert held.release() is True


def test_a_lock_dropped_on_the_server_is_lost_after_renewal(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, record_signal, caplog: pytest.LogCaptureFixture
) -> None:
    lost = record_signal(lock_lost)
    released = record_signal(lock_released)
    held = take(backend, "report:42")
    other = take(backend, "report:43")
    backend.expire_now("report:42")
    assert not held.lost  # nothing can tell before the next renewal
    clock.advance(TTL / 3)
    with caplog.at_level(logging.ERROR, logger="celery_singleton_lock.lease"):
        keeper.renew_due()
        clock.advance(TTL / 3)
        keeper.renew_due()  # a second round announces nothing more
    assert held.lost
    assert held.lost_reason
    assert not other.lost
    assert len(lost) == 1
    assert lost[0]["key"] == "report:42"
    assert lost[0]["held"] is held
    assert lost[0]["sender"] is backend
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and r.name == "celery_singleton_lock.lease"
    ]
    assert len(errors) == 1
    assert "report:42" in errors[0].getMessage()
    with pytest.raises(LockLost) as info:
        held.ensure_held()
    assert info.value.key == "report:42"
    assert held not in keeper.tracked()
    assert held.release() is False  # no longer ours
    assert released[-1]["was_held"] is False


def test_transient_renewal_failures_keep_the_lock_until_its_validity_deadline(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch, record_signal
) -> None:
    lost = record_signal(lock_lost)
    start = clock()
    held = take(backend, "report:42")
    failures = []

    def failing(items: Sequence[tuple[str, str, float]]) -> list[bool]:
        failures.append(clock())
        raise LockBackendUnavailable("the server did not answer", url="memory://")

    monkeypatch.setattr(backend, "_renew", failing)
    deadline = start + TTL - clock_drift(TTL)
    for at in (TTL / 3, TTL / 2, TTL * 0.9, TTL - clock_drift(TTL) - 0.01):
        clock.advance(start + at - clock())
        keeper.renew_due()
        assert not held.lost, at
        held.ensure_held()
    assert len(failures) == 4
    assert lost == []
    clock.advance(deadline + 0.01 - clock())
    assert held.lost  # the local deadline passed: no longer provably ours
    keeper.renew_due()
    assert len(lost) == 1
    assert lost[0]["held"] is held
    with pytest.raises(LockLost):
        held.ensure_held()
    # Declared lost before the server itself would let the lock go.
    assert clock() < start + TTL
    assert held not in keeper.tracked()


def test_a_failed_renewal_of_many_locks_is_one_warning_line(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One round trip failed, not 1,000 renewals: a process holding many locks must not
    # write a line per lock every retry while the server is away.
    held = [take(backend, f"bulk:{i}") for i in range(1000)]

    def failing(items: Sequence[tuple[str, str, float]]) -> list[bool]:
        raise LockBackendUnavailable("the server did not answer", url="memory://")

    monkeypatch.setattr(backend, "_renew", failing)
    clock.advance(TTL / 3)
    with caplog.at_level(logging.WARNING, logger="celery_singleton_lock.lease"):
        keeper.renew_due()
    lines = [r.getMessage() for r in caplog.records if r.name == "celery_singleton_lock.lease"]
    assert len(lines) == 1
    assert "and 999 more failed (the server did not answer" in lines[0]
    assert not any(h.lost for h in held)


def test_a_lock_past_its_deadline_stays_lost_even_if_the_server_still_has_it(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]], record_signal
) -> None:
    # The keeper did not get to run in time (a stalled process): once the local deadline
    # passed, the holder was told the lock is lost; a late renewal must not undo that.
    lost = record_signal(lock_lost)
    held = take(backend, "report:42")
    clock.advance(TTL - clock_drift(TTL) / 2)  # past the deadline, before the server's expiry
    assert held.lost
    keeper.renew_due()
    assert renew_calls == []
    assert held.lost
    assert len(lost) == 1
    with pytest.raises(LockLost):
        held.ensure_held()


def test_a_renewal_after_a_transient_failure_restores_the_lease(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = take(backend, "report:42")
    real = backend._renew

    def failing(items: Sequence[tuple[str, str, float]]) -> list[bool]:
        raise LockBackendUnavailable("the server did not answer", url="memory://")

    monkeypatch.setattr(backend, "_renew", failing)
    clock.advance(TTL / 3)
    keeper.renew_due()
    monkeypatch.setattr(backend, "_renew", real)
    clock.advance(1)  # the retry is due soon after a failure, not a third of the TTL later
    keeper.renew_due()
    assert held.valid_for == pytest.approx(TTL - clock_drift(TTL))
    clock.advance(TTL - 2)  # past the end of the first lease
    assert not held.lost
    assert backend.acquire("report:42", ttl=TTL) is None


def test_stop_renewal_at_stops_renewing(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]]
) -> None:
    limited = take(backend, "limited")
    unlimited = take(backend, "unlimited")
    limited.stop_renewal_at(clock() + 5)
    clock.advance(TTL / 3)
    keeper.renew_due()
    assert renew_calls == [["singleton-lock:unlimited"]]
    assert limited not in keeper.tracked()
    for _ in range(3):
        clock.advance(TTL / 3)
        keeper.renew_due()
    assert all(call == ["singleton-lock:unlimited"] for call in renew_calls)
    assert limited.lost  # its lease ended with the TTL
    assert backend.acquire("limited", ttl=TTL) is not None
    assert not unlimited.lost


def test_a_dropped_handle_is_no_longer_tracked(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]]
) -> None:
    kept = take(backend, "kept")
    dropped = take(backend, "dropped")
    assert len(keeper.tracked()) == 2
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None
    assert keeper.tracked() == [kept]
    clock.advance(TTL / 3)
    keeper.renew_due()
    assert renew_calls == [["singleton-lock:kept"]]
    clock.advance(TTL)  # the server's TTL frees the dropped lock
    assert backend.acquire("dropped", ttl=TTL) is not None


def test_a_released_lock_is_no_longer_renewed(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, renew_calls: list[list[str]]
) -> None:
    held = take(backend, "report:42")
    held.release()
    assert keeper.tracked() == []
    clock.advance(TTL / 3)
    keeper.renew_due()
    assert renew_calls == []


def test_a_huge_ttl_never_makes_the_keeper_sleep_past_its_cap(backend: MemoryBackend, keeper) -> None:
    # A timed wait of the longest TTL allowed (10 years) must not reach the OS as one wait:
    # near 1e10 s it overflows time_t and would kill the keeper thread.
    held = backend.acquire("forever", ttl=3e8)
    assert held is not None
    assert keeper._seconds_to_next() <= 60.0
    backend.release(held)


def test_an_idle_keeper_sleeps_one_more_interval_then_until_called(backend: MemoryBackend, keeper) -> None:
    held = backend.acquire("brief", ttl=3)
    # A third of the TTL, less the margin for a next lock's slower round trip.
    assert keeper._seconds_to_next() == pytest.approx(_learnt(3))
    backend.release(held)
    assert keeper._seconds_to_next() == pytest.approx(1.0)  # no wake-up call needed (held: ttl / 3)
    assert keeper._seconds_to_next() is None


def _learnt(ttl: float) -> float:
    """The interval the keeper learns from a lock of ``ttl`` just taken: it is due a third
    of the TTL after it was sent, less the drift margin; less the keeper's own margin."""
    return (ttl / 3 - clock_drift(ttl)) * (1 - LEARNT_MARGIN)


def _sleep_as_the_thread(keeper: LeaseKeeper) -> float | None:
    """One look of the keeper's thread before it sleeps, as ``_run`` takes it."""
    delay = keeper._seconds_to_next()
    keeper._wakes_at = math.inf if delay is None else time.monotonic() + delay
    return delay


@pytest.fixture
def wakeups(keeper: LeaseKeeper) -> list[int]:
    """The wake-up calls ``track`` makes (the thread never runs in unit tests)."""
    calls: list[int] = []
    keeper._wakeup.set = lambda: calls.append(1)  # type: ignore[method-assign]
    return calls


def test_a_loop_of_brief_locks_never_wakes_the_idle_keeper(
    backend: MemoryBackend, keeper, clock, wakeups
) -> None:
    # The thread never sees these locks held: it must learn the interval from track, or
    # every acquisition would cost a wake-up call (a thread switch).
    backend.release(backend.acquire("brief", ttl=3))
    assert len(wakeups) == keeper.wakeup_calls == 1  # the first lock of a sleeping-until-called keeper
    assert _sleep_as_the_thread(keeper) == pytest.approx(_learnt(3))
    for _ in range(50):
        clock.advance(0.01)
        backend.release(backend.acquire("brief", ttl=3))
    assert len(wakeups) == keeper.wakeup_calls == 1


def test_brief_locks_beside_a_long_held_one_never_wake_the_keeper(
    backend: MemoryBackend, keeper, clock, wakeups
) -> None:
    # The thread sleeps until the long lock is due (in 50 s); each brief lock is due in 1 s.
    # Without the learnt interval, every brief acquisition would wake it.
    long_held = backend.acquire("long", ttl=150)
    assert long_held is not None
    assert keeper.wakeup_calls == 1  # the first lock of a sleeping-until-called keeper
    assert _sleep_as_the_thread(keeper) == pytest.approx(_learnt(150))
    backend.release(backend.acquire("brief", ttl=3))
    assert keeper.wakeup_calls == 2  # the first brief one: the thread learns its interval
    for _ in range(5):  # five wake-ups of the thread, by itself
        delay = _sleep_as_the_thread(keeper)
        assert delay is not None
        assert delay <= 1.0
        for _ in range(100):
            clock.advance(delay / 100)
            backend.release(backend.acquire("brief", ttl=3))
        keeper.renew_due()
    assert keeper.wakeup_calls == len(wakeups) == 2
    assert not long_held.lost
    # Once the brief locks stop, it sleeps one more short interval, then until the long
    # lock is due again.
    assert _sleep_as_the_thread(keeper) == pytest.approx(_learnt(3))
    assert _sleep_as_the_thread(keeper) == pytest.approx(
        long_held._next_renewal - clock(), abs=0.5
    )
    backend.release(long_held)


def test_a_wake_up_call_left_before_the_thread_looked_does_not_make_it_forget(
    backend: MemoryBackend, keeper, clock, wakeups
) -> None:
    # The long lock and the brief one both leave a call before the thread first looks; it
    # learns the brief interval, then its wait returns at once for the pending call. That
    # early return must not cost it what it learnt (the next brief lock would call again).
    long_held = backend.acquire("long", ttl=150)
    assert long_held is not None
    backend.release(backend.acquire("brief", ttl=3))
    assert _sleep_as_the_thread(keeper) == pytest.approx(_learnt(3))
    delay = keeper._seconds_to_next(forget=False)  # woken by the pending call
    assert delay is not None
    assert delay <= _learnt(3) + 1e-9
    calls = keeper.wakeup_calls
    backend.release(backend.acquire("brief", ttl=3))
    assert keeper.wakeup_calls == calls
    backend.release(long_held)


# -- settling at the end of a body, and the keeper's OS thread -----------------------------


def _lease_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.levelno == logging.ERROR and r.name == "celery_singleton_lock.lease"
    ]


def test_settle_declares_a_loss_the_keeper_did_not_get_to(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, record_signal, caplog: pytest.LogCaptureFixture
) -> None:
    # The keeper could not run (a gevent hub kept busy, a long C call): the deadline passed
    # and nobody said so. The task settles its lock when its body returns.
    lost = record_signal(lock_lost)
    held = take(backend, "report:42")
    clock.advance(TTL)
    assert held.lost
    assert lost == []
    with caplog.at_level(logging.ERROR, logger="celery_singleton_lock.lease"):
        assert held.settle() is True
        assert held.settle() is True  # still lost, announced no more
        keeper.renew_due()
    assert [(call["key"], call["held"], call["sender"]) for call in lost] == [("report:42", held, backend)]
    assert "validity deadline" in lost[0]["reason"]
    assert len(_lease_errors(caplog)) == 1
    assert "report:42" in _lease_errors(caplog)[0].getMessage()
    assert held not in keeper.tracked()


def test_settle_of_a_lock_still_held_changes_nothing(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, record_signal, renew_calls: list[list[str]]
) -> None:
    lost = record_signal(lock_lost)
    held = take(backend, "report:42")
    clock.advance(TTL / 3)
    assert held.settle() is False
    assert lost == []
    assert held in keeper.tracked()
    keeper.renew_due()
    assert renew_calls == [["singleton-lock:report:42"]]
    held.release()
    assert held.settle() is False  # released is not lost


def test_a_loss_posted_to_the_hub_is_sent_once_by_whichever_runs_first(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, record_signal, caplog: pytest.LogCaptureFixture
) -> None:
    # Under gevent the keeper logs at once and posts lock_lost to the lock's hub, which a
    # body that never yields does not run until it returns; settle() sends it then.
    lost = record_signal(lock_lost)
    held = take(backend, "report:42")
    posted: list[Callable[[], object]] = []
    held._post = posted.append
    backend.expire_now("report:42")
    clock.advance(TTL / 3)
    with caplog.at_level(logging.ERROR, logger="celery_singleton_lock.lease"):
        keeper.renew_due()
    assert len(_lease_errors(caplog)) == 1  # logged by the keeper, not waiting for the hub
    assert lost == []
    assert len(posted) == 1
    assert held.settle() is True
    assert len(lost) == 1
    posted[0]()  # the hub gets to the posted greenlet at last
    assert len(lost) == 1
    assert "no longer ours" in lost[0]["reason"]
    assert len(_lease_errors(caplog)) == 1


def test_a_posted_loss_needs_no_settle(
    backend: MemoryBackend, clock, keeper: LeaseKeeper, record_signal
) -> None:
    lost = record_signal(lock_lost)
    held = take(backend, "report:42")
    posted: list[Callable[[], object]] = []
    held._post = posted.append
    backend.expire_now("report:42")
    clock.advance(TTL / 3)
    keeper.renew_due()
    posted[0]()  # a body that yields: the hub runs it while the body still runs
    assert [call["held"] for call in lost] == [held]
    assert held.settle() is True
    assert len(lost) == 1


def test_a_lock_released_before_the_keeper_declares_it_is_not_announced(
    backend: MemoryBackend, keeper: LeaseKeeper, record_signal, caplog: pytest.LogCaptureFixture
) -> None:
    lost = record_signal(lock_lost)
    held = take(backend, "report:42")
    held.release()
    with caplog.at_level(logging.ERROR, logger="celery_singleton_lock.lease"):
        keeper.declare_lost(held, "raced with the release")
    assert lost == []
    assert _lease_errors(caplog) == []
    assert not held.lost


class _ThreadBoundBackend(MemoryBackend):
    """A memory backend that says, like Redis, its connections must not cross threads."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.copies: list[MemoryBackend] = []
        self.renewed_here = 0

    def for_native_thread(self) -> MemoryBackend:
        view = copy.copy(self)
        self.copies.append(view)
        return view

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        self.renewed_here += 1
        return super()._renew(items)


@pytest.mark.parametrize("patched", [True, False])
def test_under_gevent_the_keeper_renews_through_one_copy_of_its_own(
    clock, keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    from celery_singleton_lock import _native

    monkeypatch.setattr(_native, "patched", lambda: patched)
    backend = _ThreadBoundBackend(clock)
    held = take(backend, "report:42")  # type: ignore[arg-type]
    for _ in range(3):
        clock.advance(TTL / 3)
        keeper.renew_due()
    assert not held.lost
    assert keeper.renewal_calls == 3
    if patched:
        assert len(backend.copies) == 1  # made once, then kept
        assert backend.renewed_here == 0  # the shared connections were never used
    else:
        assert backend.copies == []
        assert backend.renewed_here == 3


def test_a_wakeup_call_made_before_the_wait_is_not_lost() -> None:
    from celery_singleton_lock._native import Wakeup

    wakeup = Wakeup()
    assert wakeup.wait(0) is False
    wakeup.set()
    wakeup.set()  # calls do not pile up: one wait consumes them
    assert wakeup.wait(0) is True
    assert wakeup.wait(0) is False
