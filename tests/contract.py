"""The behaviour every lock backend promises, run against each backend.

A subclass provides the ``backend`` fixture, a ``second_backend`` fixture (another client
of the same server, as another process would have) and ``expire(backend, key)``, which
makes a lease vanish as if it had expired.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from celery_singleton_lock import ConfigurationError, HeldLock, LockContended, LockLost
from celery_singleton_lock.backends.base import MAX_KEY_BYTES, MAX_TTL, MIN_TTL, LockBackend
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.signals import lock_lost
from tests.conftest import wait_until


class BackendContract:
    #: How late after its TTL the server may free a dead holder's lock (seconds).
    expiry_lateness = 0.5

    def expire(self, backend: LockBackend, key: str) -> None:
        raise NotImplementedError

    def test_acquire_release_and_fencing_tokens_increase(self, backend, unique_key):
        tokens = []
        for _ in range(3):
            held = backend.acquire(unique_key, ttl=10)
            assert isinstance(held, HeldLock)
            assert held.key == unique_key
            assert not held.lost
            tokens.append(held.fencing_token)
            assert backend.release(held) is True
        assert tokens == sorted(tokens)
        assert len(set(tokens)) == 3

    def test_second_acquire_is_refused_while_held(self, backend, second_backend, unique_key):
        held = backend.acquire(unique_key, ttl=10)
        assert held is not None
        assert second_backend.acquire(unique_key, ttl=10) is None
        assert backend.acquire(unique_key, ttl=10) is None  # no reentrancy, even in-process
        assert backend.release(held) is True
        assert backend.release(held) is False  # one release per acquisition
        other = second_backend.acquire(unique_key, ttl=10)
        assert other is not None
        second_backend.release(other)

    def test_tokens_are_random_and_distinct(self, backend, unique_key):
        first = backend.acquire(unique_key, ttl=10)
        backend.release(first)
        second = backend.acquire(unique_key, ttl=10)
        backend.release(second)
        assert first.token != second.token
        assert len(first.token) >= 32

    def test_release_never_deletes_another_holders_lock(self, backend, second_backend, unique_key):
        stale = backend.acquire(unique_key, ttl=10)
        self.expire(backend, unique_key)
        current = second_backend.acquire(unique_key, ttl=10)
        assert current is not None
        assert stale.release() is False
        assert backend.acquire(unique_key, ttl=10) is None  # still the second holder's
        assert second_backend.release(current) is True

    def test_lock_context_manager_never_runs_body_when_taken(self, backend, second_backend, unique_key):
        held = backend.acquire(unique_key, ttl=10)
        ran = []
        with pytest.raises(LockContended) as info, second_backend.lock(unique_key, ttl=10, timeout=0.2):
            ran.append(True)
        assert ran == []
        assert info.value.key == unique_key
        backend.release(held)
        with second_backend.lock(unique_key, ttl=10, timeout=1) as inside:
            assert not inside.lost
        assert inside.released

    def test_blocking_acquire_is_woken_by_release(self, backend, second_backend, unique_key):
        held = backend.acquire(unique_key, ttl=30)
        release_at: list[float] = []

        def release_soon():
            time.sleep(0.3)
            release_at.append(time.monotonic())
            backend.release(held)

        threading.Thread(target=release_soon).start()
        got = second_backend.acquire(unique_key, ttl=30, blocking=True, timeout=10)
        woke_at = time.monotonic()
        assert got is not None
        # Woken by the release itself, far sooner than the 30 s lease would end.
        assert woke_at - release_at[0] < 0.2
        second_backend.release(got)

    def test_blocking_acquire_times_out(self, backend, second_backend, unique_key):
        held = backend.acquire(unique_key, ttl=30)
        start = time.monotonic()
        assert second_backend.acquire(unique_key, ttl=30, blocking=True, timeout=0.5) is None
        waited = time.monotonic() - start
        assert 0.5 <= waited < 1.5
        backend.release(held)

    def test_waiter_gets_the_lock_when_a_dead_holders_lease_expires(
        self, backend, second_backend, unique_key
    ):
        held = backend.acquire(unique_key, ttl=1.0)
        LeaseKeeper.for_process().untrack(held)  # as if its process had died: no renewal
        start = time.monotonic()
        got = second_backend.acquire(unique_key, ttl=10, blocking=True, timeout=5)
        waited = time.monotonic() - start
        assert got is not None
        # At the expiry, neither before nor a poll later.
        assert 0.8 <= waited < 1.0 + self.expiry_lateness
        second_backend.release(got)

    def test_renewal_keeps_a_lease_past_its_ttl(self, backend, second_backend, unique_key):
        held = backend.acquire(unique_key, ttl=0.6)
        time.sleep(1.5)  # two and a half TTLs: only renewal can keep it
        assert not held.lost
        assert second_backend.acquire(unique_key, ttl=1) is None
        assert backend.release(held) is True

    def test_loss_is_detected_and_announced(self, backend, unique_key):
        lost_events: list[str] = []

        def on_lost(sender, key, held, reason, **kwargs):
            lost_events.append(key)

        lock_lost.connect(on_lost, weak=False)
        try:
            held = backend.acquire(unique_key, ttl=0.9)
            self.expire(backend, unique_key)
            wait_until(lambda: held.lost, 3, "renewal to notice the lease is gone")
            with pytest.raises(LockLost):
                held.ensure_held()
            wait_until(lambda: lost_events, 1, "lock_lost signal")
            assert lost_events == [unique_key]
            assert held.release() is False
        finally:
            lock_lost.disconnect(on_lost)

    def test_release_owned_needs_host_pid_and_task_id_all_equal(self, backend, unique_key):
        # A redelivered copy of task-A in another process (or on another host) shares
        # the task id; releasing "task-A's lock" for it must not free the live run's.
        held = backend.acquire(unique_key, ttl=10, owner=Owner("host-1", 101, task_id="task-A"))
        for stranger in (
            Owner("host-1", 101, task_id="task-B"),
            Owner("host-1", 202, task_id="task-A"),
            Owner("host-2", 101, task_id="task-A"),
            Owner("host-1", 101, task_id=None),
            Owner("", 0, task_id="task-A"),
        ):
            assert backend.release_owned(unique_key, stranger) is False, stranger
        assert backend.acquire(unique_key, ttl=10) is None  # still held
        assert backend.release_owned(unique_key, Owner("host-1", 101, task_id="task-A")) is True
        assert backend.acquire(unique_key, ttl=10) is not None
        assert held.release() is False

    def test_threads_counting_under_the_lock_lose_no_update(self, backend, unique_key):
        counter = {"value": 0}

        def worker():
            for _ in range(25):
                with backend.lock(unique_key, ttl=10, timeout=30):
                    value = counter["value"]
                    time.sleep(0)  # invite a thread switch inside the critical section
                    counter["value"] = value + 1

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert counter["value"] == 200

    @pytest.mark.parametrize("ttl", [math.inf, math.nan, 0.001, 0.05, 1e10, 0, -1, "5", None, True])
    def test_a_ttl_out_of_bounds_is_a_configuration_error_naming_ttl(self, backend, unique_key, ttl):
        for take in (
            lambda: backend.acquire(unique_key, ttl=ttl),
            lambda: backend.acquire(unique_key, ttl=ttl, blocking=True, timeout=1),
            lambda: backend.lock(unique_key, ttl=ttl, timeout=1).__enter__(),
        ):
            with pytest.raises(ConfigurationError) as info:
                take()
            assert info.value.option == "ttl"
            assert "from 0.1 to 315360000" in str(info.value)
        held = backend.acquire(unique_key, ttl=10)  # nothing was written
        assert held is not None
        assert backend.release(held) is True

    @pytest.mark.parametrize("ttl", [MIN_TTL, MAX_TTL])
    def test_the_shortest_and_longest_ttl_give_a_held_lock(self, backend, second_backend, unique_key, ttl):
        held = backend.acquire(unique_key, ttl=ttl)
        assert held is not None
        held.ensure_held()  # not already lost: the drift margin leaves most of the lease
        assert second_backend.acquire(unique_key, ttl=10) is None
        assert backend.release(held) is True

    @pytest.mark.parametrize("timeout", [math.nan, -1, -math.inf, 1e10, "1", True])
    def test_a_bad_timeout_is_a_configuration_error_at_once(
        self, backend, second_backend, unique_key, timeout
    ):
        held = backend.acquire(unique_key, ttl=30)
        start = time.monotonic()
        for take in (
            lambda: second_backend.acquire(unique_key, ttl=30, blocking=True, timeout=timeout),
            lambda: second_backend.lock(unique_key, ttl=30, timeout=timeout).__enter__(),
        ):
            with pytest.raises(ConfigurationError) as info:
                take()
            assert info.value.option == "timeout"
        assert time.monotonic() - start < 1.0  # refused, not waited on
        backend.release(held)
        with pytest.raises(ConfigurationError):  # also when the lock is free
            second_backend.acquire(unique_key, ttl=30, blocking=True, timeout=timeout)

    def test_an_infinite_timeout_waits_without_limit_until_the_release(
        self, backend, second_backend, unique_key
    ):
        held = backend.acquire(unique_key, ttl=30)
        release_at: list[float] = []

        def release_soon():
            time.sleep(0.3)
            release_at.append(time.monotonic())
            backend.release(held)

        threading.Thread(target=release_soon).start()
        got = second_backend.acquire(unique_key, ttl=30, blocking=True, timeout=math.inf)
        woke_at = time.monotonic()
        assert got is not None
        assert woke_at - release_at[0] < 0.2
        second_backend.release(got)
        with second_backend.lock(unique_key, ttl=30, timeout=math.inf) as inside:
            assert not inside.lost

    @pytest.mark.parametrize(
        "key", [b"report:1", "report:\udc80", "\ud800", "", 42, None], ids=repr
    )
    def test_a_key_that_is_not_utf8_text_is_a_configuration_error_naming_it(self, backend, key):
        with pytest.raises(ConfigurationError) as info:
            backend.acquire(key, ttl=10)
        assert info.value.option == "key"
        assert repr(key)[:20] in str(info.value)

    def test_an_over_long_key_is_refused_naming_the_limit(self, backend, unique_key):
        longest = unique_key + "k" * (MAX_KEY_BYTES - len(unique_key.encode()))
        held = backend.acquire(longest, ttl=10)
        assert held is not None
        assert backend.release(held) is True
        for key in (longest + "k", unique_key + "é" * MAX_KEY_BYTES, "x" * 2_000_000):
            with pytest.raises(ConfigurationError) as info:
                backend.acquire(key, ttl=10)
            assert info.value.option == "key"
            assert f"at most {MAX_KEY_BYTES}" in str(info.value)
            assert len(str(info.value)) < 300  # names the key without repeating it whole

    def test_a_forged_token_that_is_a_prefix_of_the_real_one_neither_renews_nor_releases(
        self, backend, unique_key
    ):
        held = backend.acquire(unique_key, ttl=10)
        for token in ("", held.token[:1], held.token[: len(held.token) // 2], held.token[:-1]):
            forged = HeldLock(
                backend, unique_key, token, held.fencing_token, held.ttl, held.owner,
                valid_until=backend.clock() + held.ttl,
            )
            assert backend.renew([forged]) == [False], token
            assert backend.release(forged) is False, token
            assert backend.acquire(unique_key, ttl=10) is None, token  # still held ...
            assert backend.renew([held]) == [True], token  # ... by the real holder
        assert backend.release(held) is True
