"""The promises every lock backend keeps, written once and run against each backend.

A backend's test module subclasses one of the two classes below and provides a few
fixtures and methods; every test of the class then runs against that backend. Nothing a
backend provides asserts anything: the promises live here, once.

``BackendContract``: the in-process promises (memory runs only these). Provide:

``backend``                 fixture: a connected backend, closed after the test.
``second_backend``          fixture: another client of the same server, as another
                            process would have.
``expire(backend, key)``    method: make ``key``'s lease vanish as if it had expired.
``expiry_lateness``         class attribute, seconds: how late after its TTL the server
                            may free a dead holder's lock (default 0.5).

``CrossProcessContract(BackendContract)``: also the promises that need other processes
(spawned or forked children, SIGKILL, SIGSTOP) and a real server. Provide ``expire`` and
``expiry_lateness`` as above, and:

``backend_spec``            fixture: a :class:`BackendSpec` ``(url, options)``, picklable,
                            with which ``connect(url, **options)`` in another process
                            reaches the same server. ``backend`` and ``second_backend``
                            default to two connections made from it; override them only
                            when a backend needs more.
``server_operations``       fixture: a :class:`ServerOperations` counting the requests
                            the server has served (the counting itself excluded), or None
                            where they cannot be counted: that test is then skipped, its
                            reason printed in the summary.
``unreachable_url(hosts, password)``  method: this backend's URL naming the
                            ``host:port`` addresses in ``hosts`` (as many as
                            ``unreachable_hosts``, default 1; the contract makes them
                            refuse connections, or accept and never answer) with
                            ``password`` in it.
``check_unreachable(kind, error, elapsed)``  optional method: backend-specific
                            assertions on that failure (its wording, how fast a refusal
                            fails); ``kind`` is "refused" or "silent".
``holder_ttl``              optional class attribute: the TTL of the holders in other
                            processes (1.0 s; each such test waits it out once or twice).

A new backend (ZooKeeper, PostgreSQL, file://) needs nothing else::

    class TestZooKeeperContract(CrossProcessContract):
        expiry_lateness = 1.5

        @pytest.fixture
        def backend_spec(self, zookeeper_url):
            return BackendSpec(zookeeper_url)

        @pytest.fixture
        def server_operations(self, zookeeper_server):
            # Requests only: the sessions' pings go on while nobody asks for anything.
            return ServerOperations(count=lambda: requests_served(zookeeper_server))

        def expire(self, backend, key): ...

        def unreachable_url(self, hosts, password):
            return f"zookeeper://app:{password}@{','.join(hosts)}/"

The cross-process promises (``CrossProcessContract``), and what each child process does
(tests/contract_processes.py):

1. 8 processes x 25 unlocked read-modify-write increments of a file, each under the
   lock, end at exactly 200 (and fencing tokens only rise from one holder to the next);
2. a SIGKILLed holder, kept past its TTL by renewal, is replaced at lease expiry: not
   before its last renewal's TTL ran out (less clock drift), at most ``expiry_lateness``
   after (the waiter is woken, it does not poll);
3. a SIGSTOPped holder past its TTL is replaced; after SIGCONT it sees ``lost``,
   ``ensure_held()`` raises LockLost, its release is refused, and its fencing token is
   smaller than the new holder's;
4. idle waiters cost the server no operations;
5. a refused port and a silent socket fail within ``connect_timeout`` with
   LockBackendUnavailable, whose URL (and the log) masks the password;
6. ``release_owned`` from another process frees a dead holder's lock only for its host,
   pid and task id all equal;
7. a forked child neither releases nor renews its parent's lock;
8. what an operator sees (``celery locks``): a lock held in another process is listed with
   that process's owner and broken from here; that holder then sees ``lost``.

Every backend also lists its held locks (``held_locks``, ``lock_info``) with the holder's
owner, token and fencing token, breaks one (``break_lock``) so that its holder learns it
lost it, and answers ``ping``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest

from celery_singleton_lock import (
    ConfigurationError,
    HeldLock,
    LockBackendUnavailable,
    LockContended,
    LockLost,
)
from celery_singleton_lock.backends.base import (
    MAX_KEY_BYTES,
    MAX_LIMIT,
    MAX_TTL,
    MIN_TTL,
    PING_KEY,
    LockBackend,
    Refused,
)
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.lease import LeaseKeeper, clock_drift
from celery_singleton_lock.signals import lock_lost
from tests import contract_processes
from tests.conftest import wait_until
from tests.contract_processes import BackendSpec, lease_started_at

__all__ = [
    "BackendContract",
    "BackendSpec",
    "CrossProcessContract",
    "ServerOperations",
    "clean_context",
]

@dataclass(frozen=True)
class ServerOperations:
    """The count of requests a server has served, read without adding to it.

    :ivar count: the number so far (only differences between two readings matter).
    :ivar spec: the server it counts, when not ``backend_spec``'s (a server of the
        test's own, that no other client of this process can add to).
    """

    count: Callable[[], int]
    spec: BackendSpec | None = None


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

    def test_keep_until_holds_the_key_to_the_deadline_then_frees_it_for_a_waiter(
        self, backend, second_backend, unique_key
    ):
        # throttle: a successful run's key stays taken after its end. The lease (0.6 s)
        # is shorter than the window: the server's TTL, or renewal, must carry it.
        held = backend.acquire(unique_key, ttl=0.6)
        deadline = time.monotonic() + 1.5
        assert backend.keep_until(held, backend.clock() + 1.5) is True
        time.sleep(0.9)
        assert second_backend.acquire(unique_key, ttl=1) is None
        got = second_backend.acquire(unique_key, ttl=5, blocking=True, timeout=5)
        woke_at = time.monotonic()
        assert got is not None
        assert deadline - 0.05 <= woke_at < deadline + self.expiry_lateness
        second_backend.release(got)

    def test_keep_until_holds_a_semaphore_slot_to_the_deadline_and_the_others_go_on(
        self, backend, second_backend, unique_key
    ):
        # throttle with lock_limit: each successful run keeps its own slot.
        kept, other = (backend.acquire(unique_key, ttl=0.6, limit=2) for _ in range(2))
        deadline = time.monotonic() + 1.5
        assert backend.keep_until(kept, backend.clock() + 1.5) is True
        assert backend.release(other) is True
        again = second_backend.acquire(unique_key, ttl=5, limit=2)  # the other slot is free
        assert again is not None
        assert second_backend.acquire(unique_key, ttl=5, limit=2) is None
        got = second_backend.acquire(unique_key, ttl=5, limit=2, blocking=True, timeout=5)
        assert got is not None
        assert deadline - 0.05 <= time.monotonic() < deadline + self.expiry_lateness
        second_backend.release(again)
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


    # -- what operators see (celery locks) ---------------------------------------------

    def test_held_locks_show_each_holder_with_its_owner_token_fencing_token_and_ttl(
        self, backend, second_backend, unique_key
    ):
        key = f"{unique_key}/a%2F b.c"  # characters that stores escape in their names
        owner = Owner.here("task-L", signature="demo.report(42,) {'full': True}")
        held = backend.acquire(key, ttl=30, owner=owner)
        plain = backend.acquire(unique_key, ttl=30)
        try:
            shown = {info.key: info for info in second_backend.held_locks()}
            info = shown[key]
            assert info.owner == owner
            assert info.token == held.token
            assert info.fencing_token == held.fencing_token
            assert info.ttl is None or 20 < info.ttl <= 30
            assert info.held_since is None or abs(info.held_since - time.time()) < 5
            assert shown[unique_key].token == plain.token
            assert [i.token for i in second_backend.lock_info(key)] == [held.token]
        finally:
            backend.release(held)
            backend.release(plain)
        assert second_backend.lock_info(key) == []
        assert not {key, unique_key} & {info.key for info in second_backend.held_locks()}

    def test_a_broken_lock_is_free_and_its_holder_learns_it_lost(self, backend, second_backend, unique_key):
        held = backend.acquire(unique_key, ttl=0.9)
        [info] = second_backend.lock_info(unique_key)
        assert second_backend.break_lock(info) is True
        wait_until(lambda: held.lost, 3, "the holder's renewal to find its lock broken")
        again = second_backend.acquire(unique_key, ttl=10)
        assert again is not None
        assert second_backend.break_lock(info) is False  # that acquisition is gone ...
        assert backend.acquire(unique_key, ttl=10) is None  # ... and the new one stands
        assert held.release() is False
        assert second_backend.release(again) is True

    def test_ping_reaches_every_node_and_takes_a_lock(self, backend):
        report = backend.ping()
        assert report.can_grant, report.grant_error
        assert len(report.nodes) >= report.needed >= 1
        for node in report.nodes:
            assert node.error is None, node
            assert node.round_trip is not None, node
            assert node.round_trip >= 0, node
        assert not [info for info in backend.held_locks() if info.key.startswith(PING_KEY)]


    # -- semaphores: limit=N holders at once ------------------------------------------

    @pytest.mark.parametrize("limit", [0, -1, True, 1.5, "2", None, MAX_LIMIT + 1])
    def test_a_limit_out_of_bounds_is_a_configuration_error_naming_limit(self, backend, unique_key, limit):
        with pytest.raises(ConfigurationError) as info:
            backend.acquire(unique_key, ttl=10, limit=limit)
        assert info.value.option == "limit"
        with pytest.raises(ConfigurationError):
            backend.release_owned(unique_key, Owner.here("t"), limit=limit)

    def test_a_semaphore_grants_its_limit_of_slots_with_rising_fencing_tokens_then_refuses(
        self, backend, second_backend, unique_key
    ):
        held = [b.acquire(unique_key, ttl=10, limit=3) for b in (backend, second_backend, backend)]
        assert all(isinstance(h, HeldLock) for h in held)
        assert sorted(h.slot for h in held) == [0, 1, 2]
        assert {h.limit for h in held} == {3}
        tokens = [h.fencing_token for h in held]
        assert tokens == sorted(tokens)
        assert len(set(tokens)) == 3
        assert second_backend.acquire(unique_key, ttl=10, limit=3) is None  # the 4th
        assert second_backend.acquire(unique_key, ttl=10, limit=3, blocking=True, timeout=0.2) is None
        assert [h.backend.renew([h]) for h in held] == [[True]] * 3  # each slot is a lease
        freed = held.pop(1)
        assert freed.release() is True
        again = second_backend.acquire(unique_key, ttl=10, limit=3)
        assert again is not None
        assert 0 <= again.slot < 3
        assert again.fencing_token > max(tokens)  # above every slot's, not only its own
        for h in [*held, again]:
            assert h.release() is True
        assert backend.lock_info(unique_key) == []

    def test_exclusive_and_semaphore_holders_of_one_key_never_exceed_the_larger_limit(
        self, backend, second_backend, unique_key
    ):
        # A deploy that moves a task from limit 1 to 2 (or back) runs both at once for a
        # while: together they never hold more than 2.
        exclusive = backend.acquire(unique_key, ttl=10)
        assert exclusive is not None
        shared = second_backend.acquire(unique_key, ttl=10, limit=2)
        assert shared is not None
        assert second_backend.acquire(unique_key, ttl=10, limit=2) is None
        assert second_backend.acquire(unique_key, ttl=10) is None
        assert exclusive.release() is True
        assert shared.release() is True
        # A deploy that lowers the limit from 3 to 2: the lower one is enforced.
        wider = backend.acquire(unique_key, ttl=10, limit=3)
        narrower = backend.acquire(unique_key, ttl=10, limit=2)
        assert wider is not None
        assert narrower is not None
        assert backend.acquire(unique_key, ttl=10, limit=2) is None
        assert wider.release() is True
        assert narrower.release() is True

    def test_a_task_id_that_holds_a_slot_is_refused_another_naming_itself(
        self, backend, second_backend, unique_key
    ):
        # A redelivered copy of a running task must wait for its first delivery, never
        # run beside it in a free slot.
        first = backend.acquire(unique_key, ttl=10, limit=3, owner=Owner.here("task-a"))
        assert first is not None
        refused = second_backend.attempt(unique_key, ttl=10, limit=3, owner=Owner.here("task-a"))
        assert isinstance(refused, Refused)
        assert refused.holder_task_id == "task-a"
        other = second_backend.acquire(unique_key, ttl=10, limit=3, owner=Owner.here("task-b"))
        assert other is not None
        assert first.release() is True
        assert other.release() is True

    def test_one_release_of_a_full_semaphore_wakes_one_waiter(self, backend, second_backend, unique_key):
        held = [backend.acquire(unique_key, ttl=30, limit=2) for _ in range(2)]
        assert None not in held
        got: list[tuple[HeldLock | None, float]] = []

        def wait(timeout: float) -> None:
            outcome = second_backend.acquire(unique_key, ttl=30, limit=2, blocking=True, timeout=timeout)
            got.append((outcome, time.monotonic()))

        waiters = [threading.Thread(target=wait, args=(2.0,)) for _ in range(2)]
        for waiter in waiters:
            waiter.start()
        released_at = time.monotonic()
        assert held[0].release() is True
        for waiter in waiters:
            waiter.join(10)
        outcomes = [outcome for outcome, _ in got]
        winners = [outcome for outcome in outcomes if outcome is not None]
        assert len(outcomes) == 2
        assert len(winners) == 1  # one slot freed: one waiter in, the other timed out
        assert min(at for outcome, at in got if outcome is not None) - released_at < 1.0
        assert winners[0].release() is True
        assert held[1].release() is True

    def test_threads_under_a_semaphore_never_exceed_its_limit(self, backend, unique_key):
        rounds = 6 * 5
        state = {"inside": 0, "most": 0, "to_start": rounds, "errors": []}
        changed = threading.Condition()

        def work() -> None:
            try:
                for _ in range(5):
                    with backend.lock(unique_key, ttl=10, timeout=30, limit=3), changed:
                        state["to_start"] -= 1
                        state["inside"] += 1
                        state["most"] = max(state["most"], state["inside"])
                        changed.notify_all()
                        # Until all 3 were held once (or nobody is left to take them),
                        # hold the slot: the limit must be reached, however slow the
                        # server (it cannot hide a semaphore that grants fewer), and
                        # must never be passed.
                        changed.wait_for(lambda: state["most"] >= 3 or state["to_start"] == 0, 20)
                        state["inside"] -= 1
            except Exception as exc:  # reported by the test, not lost in a thread
                state["errors"].append(exc)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert state["errors"] == []
        assert state["to_start"] == 0
        assert state["most"] == 3  # never more, and the slots were really shared

    def test_semaphore_slots_are_listed_apart_and_one_is_broken_alone(
        self, backend, second_backend, unique_key
    ):
        held = [backend.acquire(unique_key, ttl=10, limit=3, owner=Owner.here(f"task-{i}")) for i in range(2)]
        assert None not in held
        infos = second_backend.lock_info(unique_key)
        assert sorted(info.fencing_token for info in infos) == sorted(h.fencing_token for h in held)
        assert {info.slot for info in infos} == {h.slot for h in held}
        assert {info.key for info in infos} == {unique_key}
        assert {info.owner.task_id for info in infos} == {"task-0", "task-1"}
        assert [info.key for info in second_backend.held_locks()].count(unique_key) == 2
        target = next(info for info in infos if info.owner.task_id == "task-0")
        assert second_backend.break_lock(target) is True
        assert held[0].backend.renew([held[0]]) == [False]
        assert held[1].backend.renew([held[1]]) == [True]
        assert held[1].release() is True

    def test_a_waiting_copy_of_a_task_holding_a_slot_gets_one_only_after_its_release(
        self, backend, second_backend, unique_key
    ):
        # A redelivered copy that waits takes none of the free slots while its first
        # delivery runs; other tasks do.
        running = backend.acquire(unique_key, ttl=30, limit=3, owner=Owner.here("task-r"))
        assert running is not None
        got: list[tuple[HeldLock | None, float]] = []

        def wait() -> None:
            outcome = second_backend.acquire(
                unique_key, ttl=30, limit=3, owner=Owner.here("task-r"), blocking=True, timeout=10
            )
            got.append((outcome, time.monotonic()))

        waiter = threading.Thread(target=wait)
        waiter.start()
        try:
            other = backend.acquire(unique_key, ttl=30, limit=3, owner=Owner.here("task-s"))
            assert other is not None
            assert other.release() is True
            assert not got  # the copy waits on
            released_at = time.monotonic()
            assert running.release() is True
        finally:
            waiter.join(10)
        held, got_at = got[0]
        assert held is not None
        assert got_at >= released_at
        assert held.fencing_token > running.fencing_token
        assert held.release() is True

    def test_release_owned_frees_exactly_that_owners_slot(self, backend, unique_key):
        a = backend.acquire(unique_key, ttl=10, limit=3, owner=Owner.here("task-a"))
        b = backend.acquire(unique_key, ttl=10, limit=3, owner=Owner.here("task-b"))
        assert a is not None
        assert b is not None
        assert backend.release_owned(unique_key, Owner.here("task-c"), limit=3) is False
        assert backend.release_owned(unique_key, Owner.here("task-b"), limit=3) is True
        assert [info.owner.task_id for info in backend.lock_info(unique_key)] == ["task-a"]
        assert a.release() is True


class CrossProcessContract(BackendContract):
    """The promises that need other processes and a real server (see the module docstring)."""

    #: How many ``host:port`` addresses :meth:`unreachable_url` names (Redlock: 3).
    unreachable_hosts = 1
    #: The lease of the holders in other processes: short, each test waits it out once.
    holder_ttl = 1.0

    @pytest.fixture
    def backend_spec(self) -> BackendSpec:
        raise NotImplementedError(f"{type(self).__name__} must provide the backend_spec fixture")

    @pytest.fixture
    def backend(self, backend_spec: BackendSpec) -> Iterator[LockBackend]:
        backend = backend_spec.connect()
        yield backend
        backend.close()

    @pytest.fixture
    def second_backend(self, backend_spec: BackendSpec) -> Iterator[LockBackend]:
        backend = backend_spec.connect()
        yield backend
        backend.close()

    @pytest.fixture
    def server_operations(self) -> ServerOperations | None:
        return None

    def unreachable_url(self, hosts: Sequence[str], password: str) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement unreachable_url")

    def check_unreachable(self, kind: str, error: LockBackendUnavailable, elapsed: float) -> None:
        """Backend-specific checks of an unreachable server's failure (none by default)."""

    # -- 1. mutual exclusion across processes -------------------------------------------

    def test_processes_counting_under_the_lock_lose_no_update(self, backend_spec, unique_key, tmp_path):
        counter = tmp_path / "counter"
        counter.write_text("0 0")
        _run_together(8, contract_processes.count_under_lock, backend_spec, unique_key, str(counter), 25)
        assert counter.read_text().split()[0] == "200"

    def test_processes_under_a_semaphore_never_exceed_its_limit_and_tokens_never_repeat(
        self, backend_spec, unique_key, tmp_path
    ):
        journal = tmp_path / "journal"
        journal.write_text("")
        rounds = 6
        enter = contract_processes.enter_under_semaphore
        _run_together(8, enter, backend_spec, unique_key, 3, str(journal), rounds)
        inside: set[str] = set()
        most = 0
        entered: dict[str, list[int]] = {}
        for line in journal.read_text().splitlines():
            what, token, pid = line.split()
            if what == "in":
                inside.add(token)
                most = max(most, len(inside))
                entered.setdefault(pid, []).append(int(token))
            else:
                inside.remove(token)
        tokens = [token for each in entered.values() for token in each]
        assert len(tokens) == 8 * rounds
        assert len(set(tokens)) == 8 * rounds  # never repeated, across every slot
        assert all(each == sorted(each) for each in entered.values())  # and rising
        assert most <= 3  # that all 3 are granted at once, the in-process promises show

    # -- 2. a crashed holder ------------------------------------------------------------

    def test_a_sigkilled_holder_is_replaced_at_lease_expiry_never_before(
        self, backend_spec, backend, unique_key
    ):
        ttl = self.holder_ttl
        with _child("clean", contract_processes.hold, backend_spec, unique_key, ttl, None) as (holder, pipe):
            first_start = _receive(pipe, 60, "held")[3]
            last_start = first_start
            while last_start < first_start + ttl:  # alive past its TTL through renewal alone
                last_start = _receive(pipe, ttl, "renewed")[1]
            assert backend.acquire(unique_key, ttl=5) is None  # it really holds the lock
            os.kill(holder.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            holder.join(5)
            last_start = max([last_start, *(report[1] for report in _drain(pipe, "renewed"))])
        got = backend.acquire(unique_key, ttl=5, blocking=True, timeout=ttl + self.expiry_lateness + 5)
        acquired_at = time.monotonic()
        assert got is not None
        # Never before the lease the holder last renewed had run out (less clock drift) ...
        assert acquired_at >= last_start + ttl - clock_drift(ttl) - 0.02, acquired_at - last_start
        # ... and at most the server's lateness after it (the waiter did not poll). The
        # kill came right after a renewal's report, before the next could be sent (the
        # keeper renews a third of a TTL apart, a sixth at the soonest).
        assert killed_at < last_start + ttl / 6
        assert acquired_at < last_start + ttl + self.expiry_lateness, acquired_at - last_start
        assert backend.release(got) is True

    def test_a_sigkilled_holders_slot_is_freed_at_lease_expiry_never_before(
        self, backend_spec, backend, unique_key
    ):
        ttl = self.holder_ttl
        kept = backend.acquire(unique_key, ttl=30, limit=2)
        assert kept is not None
        child = _child("clean", contract_processes.hold_slot, backend_spec, unique_key, ttl, 2)
        with child as (holder, pipe):
            last_start = _receive(pipe, 60, "held")[3]
            assert backend.acquire(unique_key, ttl=5, limit=2) is None  # both slots taken
            os.kill(holder.pid, signal.SIGKILL)
            holder.join(5)
            last_start = max([last_start, *(report[1] for report in _drain(pipe, "renewed"))])
        got = backend.acquire(
            unique_key, ttl=5, limit=2, blocking=True, timeout=ttl + self.expiry_lateness + 5
        )
        acquired_at = time.monotonic()
        assert got is not None
        assert acquired_at >= last_start + ttl - clock_drift(ttl) - 0.02, acquired_at - last_start
        assert acquired_at < last_start + ttl + self.expiry_lateness, acquired_at - last_start
        assert got.fencing_token > kept.fencing_token
        assert backend.release(got) is True
        assert backend.release(kept) is True

    def test_a_paused_holder_is_replaced_then_learns_it_lost_and_holds_an_older_token(
        self, backend_spec, backend, second_backend, unique_key
    ):
        ttl = self.holder_ttl
        with _child("clean", contract_processes.hold, backend_spec, unique_key, ttl, None) as (holder, pipe):
            paused_token = _receive(pipe, 60, "held")[1]
            os.kill(holder.pid, signal.SIGSTOP)  # a pause (GC, swap, a VM) longer than the TTL
            successor = backend.acquire(
                unique_key, ttl=10, blocking=True, timeout=ttl + self.expiry_lateness + 5
            )
            assert successor is not None
            assert successor.fencing_token > paused_token
            os.kill(holder.pid, signal.SIGCONT)
            pipe.send("check")
            _, lost, raised, released = _receive(pipe, 15, "checked")
            assert lost is True  # it never went on believing it held the lock
            assert raised is True  # ensure_held() raised LockLost
            assert released is False  # and its late release was refused ...
            assert second_backend.acquire(unique_key, ttl=1) is None  # ... leaving the successor's lock
            pipe.send("exit")
            holder.join(10)
            assert holder.exitcode == 0
        assert backend.release(successor) is True

    # -- 4. waiting costs nothing -------------------------------------------------------

    def test_idle_waiters_cost_the_server_no_operations(self, backend_spec, server_operations, unique_key):
        if server_operations is None:
            pytest.skip(f"{type(self).__name__}: this server's operations cannot be counted")
        spec = server_operations.spec or backend_spec
        count = server_operations.count
        with ExitStack() as cleanup:
            holder_backend, *waiters = (spec.connect() for _ in range(5))
            for each in (holder_backend, *waiters):
                cleanup.callback(each.close)
            holder = holder_backend.acquire(unique_key, ttl=30)  # renewed only after 10 s
            assert holder is not None
            waiting = [_announce_waiting(waiter) for waiter in waiters]
            outcomes: list[bool] = []

            def wait_then_release(waiter: LockBackend) -> None:
                got = waiter.acquire(unique_key, ttl=30, blocking=True, timeout=20)
                outcomes.append(got is not None)
                if got is not None:
                    waiter.release(got)

            threads = [threading.Thread(target=wait_then_release, args=(w,)) for w in waiters]
            for thread in threads:
                thread.start()
            wait_until(lambda: all(w.is_set() for w in waiting), 10, "4 waiters to wait")
            _settle(count)  # their requests to start waiting are served
            before = count()
            threading.Event().wait(2.0)  # the quiet period being measured
            assert count() - before == 0
            holder_backend.release(holder)
            for thread in threads:
                thread.join(30)
            assert outcomes == [True] * 4  # each release woke the next waiter

    # -- 5. an unreachable server -------------------------------------------------------

    @pytest.mark.parametrize("kind", ["refused", "silent"])
    def test_an_unreachable_server_fails_within_the_connect_timeout_with_the_password_masked(
        self, kind, caplog
    ):
        connect_timeout = 0.5
        with ExitStack() as cleanup:
            hosts = [_unreachable_address(kind, cleanup) for _ in range(self.unreachable_hosts)]
            url = self.unreachable_url(hosts, "s3cret")
            assert "s3cret" in url
            backend = BackendSpec(url).connect(connect_timeout=connect_timeout)
            cleanup.callback(backend.close)
            caplog.set_level(logging.DEBUG)
            start = time.monotonic()
            with pytest.raises(LockBackendUnavailable) as info:
                backend.acquire("k", ttl=5)
            elapsed = time.monotonic() - start
        assert elapsed < connect_timeout + 0.5, elapsed
        error = info.value
        assert error.url == backend.url
        assert "***" in error.url
        assert backend.url in str(error)
        for text in (str(error), error.url, caplog.text):
            assert "s3cret" not in text
        self.check_unreachable(kind, error, elapsed)

    def test_ping_of_an_unreachable_server_fails_in_bounded_time_with_the_password_masked(self):
        connect_timeout = 0.5
        with ExitStack() as cleanup:
            hosts = [_unreachable_address("refused", cleanup) for _ in range(self.unreachable_hosts)]
            url = self.unreachable_url(hosts, "s3cret")
            backend = BackendSpec(url).connect(connect_timeout=connect_timeout)
            cleanup.callback(backend.close)
            start = time.monotonic()
            report = backend.ping()
            elapsed = time.monotonic() - start
        assert not report.can_grant
        assert any(node.error for node in report.nodes)
        assert elapsed < connect_timeout + 0.5, elapsed
        assert "s3cret" not in repr(report)

    # -- 6. release on behalf of a dead process -----------------------------------------

    def test_release_owned_from_another_process_needs_the_holders_host_pid_and_task_id(
        self, backend_spec, backend, second_backend, unique_key
    ):
        args = (backend_spec, unique_key, 10.0, "task-A")
        with _child("clean", contract_processes.hold, *args) as (holder, pipe):
            holder_pid = _receive(pipe, 60, "held")[2]
            assert holder_pid == holder.pid
            os.kill(holder.pid, signal.SIGKILL)  # a pool process the worker saw die
            holder.join(5)
        for stranger in (
            Owner.here("task-B", pid=holder_pid),
            Owner.here("task-A"),  # this process: a redelivered copy running here
            Owner("another-host", holder_pid, task_id="task-A"),
            Owner.here(None, pid=holder_pid),
            Owner.of_message("task-A"),
        ):
            assert backend.release_owned(unique_key, stranger) is False, stranger
        assert second_backend.acquire(unique_key, ttl=10) is None  # still held
        assert backend.release_owned(unique_key, Owner.here("task-A", pid=holder_pid)) is True
        again = second_backend.acquire(unique_key, ttl=10)
        assert again is not None  # free at once, not at the end of its 10 s lease
        assert backend.release_owned(unique_key, Owner.here("task-A", pid=holder_pid)) is False
        assert second_backend.release(again) is True  # the new holder's lock was not touched

    # -- 8. an operator breaks a lock held by another process ----------------------------

    def test_a_lock_of_another_process_is_listed_with_its_owner_and_broken_from_here(
        self, backend_spec, backend, unique_key
    ):
        args = (backend_spec, unique_key, self.holder_ttl, "task-X")
        with _child("clean", contract_processes.hold, *args) as (holder, pipe):
            _, fencing_token, holder_pid, _ = _receive(pipe, 60, "held")
            [info] = backend.lock_info(unique_key)
            assert (info.owner.pid, info.owner.task_id, info.fencing_token) == (
                holder_pid, "task-X", fencing_token
            )
            self.break_from_another_process(backend, info)
            pipe.send("check")
            _, lost, raised, released = _receive(pipe, 15, "checked")
            assert (lost, raised, released) == (True, True, False)
            pipe.send("exit")
            holder.join(10)
        assert backend.lock_info(unique_key) == []

    def break_from_another_process(self, backend: LockBackend, info: Any) -> None:
        """Break ``info``'s lock, held by another process (file:// replaces it)."""
        assert backend.break_lock(info) is True

    # -- 7. fork safety -----------------------------------------------------------------

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_cannot_release_its_parents_lock(
        self, backend_spec, backend, second_backend, unique_key
    ):
        held = backend.acquire(unique_key, ttl=10)
        assert held is not None
        args = (held, True, backend_spec, unique_key + ":child", self.holder_ttl)
        with _child("fork", contract_processes.inherit, *args) as (child, pipe):
            tried = _receive(pipe, 30, "tried")[1]
            assert tried is False, f"the child's release of its parent's lock returned {tried!r}"
            assert second_backend.acquire(unique_key, ttl=1) is None  # still the parent's
            pipe.send("exit")
            child.join(10)
            assert child.exitcode == 0
        assert backend.release(held) is True

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_neither_renews_its_parents_lock_nor_frees_it_by_exiting(
        self, backend_spec, backend, second_backend, unique_key
    ):
        ttl = self.holder_ttl
        kept = backend.acquire(unique_key + ":kept", ttl=ttl)
        left = backend.acquire(unique_key + ":left", ttl=ttl)
        assert kept is not None
        assert left is not None
        args = (kept, False, backend_spec, unique_key + ":child", ttl)
        with _child("fork", contract_processes.inherit, *args) as (child, pipe):
            _receive(pipe, 30, "tried")  # it runs, its lease keeper renewing a lock of its own
            # The parent stops renewing `left`, which the child inherited too: nobody may
            # keep it alive now, so it is free when its lease ends.
            LeaseKeeper.for_process().untrack(left)
            untracked_at = time.monotonic()
            got = second_backend.acquire(
                unique_key + ":left", ttl=5, blocking=True, timeout=ttl + self.expiry_lateness + 5
            )
            assert got is not None
            assert time.monotonic() - untracked_at < ttl + self.expiry_lateness
            assert second_backend.release(got) is True
            assert second_backend.acquire(unique_key + ":kept", ttl=1) is None  # kept still held
            pipe.send("exit")
            child.join(10)
            assert child.exitcode == 0
        exited_at = time.monotonic()
        # The parent's lock outlives the child's exit: renewed after it, refused to others.
        wait_until(lambda: lease_started_at(kept) > exited_at, ttl, "a renewal after the child exited")
        assert not kept.lost
        assert second_backend.acquire(unique_key + ":kept", ttl=1) is None
        assert backend.release(kept) is True


# -- helpers of the cross-process promises ----------------------------------------------


def clean_context() -> Any:
    """Processes that share nothing with this one (no threads, sockets or leases), like
    "spawn"'s, but forked from a server that has imported the children's module once:
    a child starts in milliseconds, not the half second an import costs."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.contract_processes"])
    return context


def _run_together(count: int, target: Callable[..., None], *args: Any) -> None:
    """Run ``target(*args, start)`` in ``count`` clean child processes, released together
    by the barrier ``start`` once all are connected; each must exit with 0."""
    context = clean_context()
    start = context.Barrier(count + 1)
    processes = [context.Process(target=target, args=(*args, start)) for _ in range(count)]
    try:
        for process in processes:
            process.start()
        start.wait(60)
        for process in processes:
            process.join(120)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()


@contextmanager
def _child(method: str, target: Callable[..., None], *args: Any) -> Iterator[tuple[Any, Connection]]:
    """A child process running ``target(*args, pipe)``, ``method`` "clean" (see
    :func:`clean_context`) or "fork" (a copy of this process, its leases included);
    killed on the way out if it is still alive, whatever the test did to it."""
    context = clean_context() if method == "clean" else multiprocessing.get_context(method)
    ours, theirs = context.Pipe()
    process = context.Process(target=target, args=(*args, theirs), daemon=True)
    process.start()
    try:
        yield process, ours
    finally:
        if process.is_alive():
            os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot die
            process.kill()
        process.join(10)
        ours.close()


def _receive(pipe: Connection, timeout: float, kind: str) -> tuple[Any, ...]:
    """The child's next report of ``kind`` (reports of other kinds are passed over)."""
    deadline = time.monotonic() + timeout
    while pipe.poll(max(0.0, deadline - time.monotonic())):
        report = pipe.recv()
        if report[0] == kind:
            return tuple(report)
    raise AssertionError(f"no {kind!r} report from the child within {timeout}s")


def _drain(pipe: Connection, kind: str) -> list[tuple[Any, ...]]:
    """The reports of ``kind`` a dead child left in the pipe."""
    reports = []
    try:
        while pipe.poll():
            report = pipe.recv()
            if report[0] == kind:
                reports.append(tuple(report))
    except EOFError:
        pass
    return reports


def _announce_waiting(backend: LockBackend) -> threading.Event:
    """An event set when ``backend`` enters its server-side wait (either hook)."""
    entered = threading.Event()
    for name in ("_wait_turn", "_wait_for_release"):
        original = getattr(backend, name)

        def announcing(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            entered.set()
            return _original(*args, **kwargs)

        setattr(backend, name, announcing)
    return entered


def _settle(count: Callable[[], int], quiet: float = 0.3, timeout: float = 10) -> None:
    """Wait until ``count`` stays the same for ``quiet`` seconds."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    last = count()
    while time.monotonic() < deadline:
        pause.wait(quiet)
        now = count()
        if now == last:
            return
        last = now
    raise AssertionError(f"the server's operation count kept moving for {timeout}s")


def _unreachable_address(kind: str, cleanup: ExitStack) -> str:
    """``host:port`` where connections are refused, or accepted and never answered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if kind == "refused":
        sock.close()  # nobody listens there now
    else:
        sock.listen(16)  # the kernel accepts; nobody ever reads or answers
        cleanup.callback(sock.close)
    return f"127.0.0.1:{port}"
