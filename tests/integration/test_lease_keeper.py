"""The lease keeper's real thread against a real Redis: what a loop of locks costs it.

The unit tests (tests/unit/test_lease.py) drive the keeper by hand on a fake clock; here
its own thread runs, so a wake-up call it did not need would show in its counters.
"""

from __future__ import annotations

import time

from celery_singleton_lock import connect
from celery_singleton_lock.lease import LeaseKeeper
from tests.conftest import wait_until

BRIEF_TTL = 30.0  # due in about 10 s: the loop below ends long before
LONG_TTL = 150.0  # due in about 50 s


def test_brief_locks_beside_a_long_held_one_never_wake_the_keeper(redis_url: str, unique_key: str) -> None:
    backend = connect(redis_url + "/0")
    keeper = LeaseKeeper.for_process()
    long_held = backend.acquire(unique_key + ":long", ttl=LONG_TTL)
    assert long_held is not None
    backend.release(backend.acquire(unique_key + ":brief", ttl=BRIEF_TTL))  # teaches the interval
    learnt = (BRIEF_TTL / 3) * (1 - 1 / 8)

    def sleeps_the_learnt_interval() -> bool:
        now = time.monotonic()
        return now < keeper._wakes_at <= now + learnt

    wait_until(sleeps_the_learnt_interval, 10, "the keeper thread sleeping the brief locks' interval")
    wakeups = keeper.wakeup_calls
    for i in range(200):
        held = backend.acquire(f"{unique_key}:brief:{i % 4}", ttl=BRIEF_TTL)
        assert held is not None
        backend.release(held)
    # Other tests' locks may fall due meanwhile; what counts is that no acquisition here
    # called the thread.
    assert keeper.wakeup_calls - wakeups == 0
    assert not long_held.lost
    backend.release(long_held)
    backend.close()
