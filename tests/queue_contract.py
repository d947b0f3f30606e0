"""The promises of the backends whose waiters stand in a line on the server (etcd, ZooKeeper).

Each waiter writes an entry (etcd) or a node (ZooKeeper) behind the holders' and watches
only the one ahead, so the line is first come, first served and a release wakes one
waiter. A backend's test module subclasses :class:`QueueContract` and provides:

``backend``      fixture: a connected backend, closed after the test.
``backends``     fixture: a maker of more backends of the same server (each its own
                 connections, as another process's), closed after the test; see
                 :func:`connections`.
``line_length``  fixture: ``line_length(key)``, how many entries stand in ``key``'s line
                 (holders and waiters), read straight from the server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery_singleton_lock import HeldLock, connect
from celery_singleton_lock.backends.base import LockBackend
from celery_singleton_lock.backends.owner import Owner
from tests.conftest import wait_until

__all__ = ["Line", "QueueContract", "connections", "queue_waiters"]


@contextmanager
def connections(default_url: str) -> Iterator[Callable[..., LockBackend]]:
    """``make(url=None, **options)`` connects a backend (to ``default_url`` unless told);
    every backend made is closed on exit."""
    made: list[LockBackend] = []

    def make(url: str | None = None, **options: Any) -> LockBackend:
        made.append(connect(url or default_url, **options))
        return made[-1]

    try:
        yield make
    finally:
        for backend in made:
            backend.close()


@dataclass
class Line:
    """Waiters queued by :func:`queue_waiters`: ``order`` lists each one's index as it
    gets its turn; waiter ``i`` releases once ``proceed[i]`` is set."""

    order: list[int]
    proceed: list[threading.Event]
    waiters: list[LockBackend]
    threads: list[threading.Thread]

    def wakeups(self) -> list[int]:
        return [waiter.wakeups for waiter in self.waiters]  # type: ignore[attr-defined]

    def finish(self) -> None:
        """Let every waiter release, and wait for their threads."""
        for event in self.proceed:
            event.set()
        for thread in self.threads:
            thread.join(10)


def queue_waiters(
    backends: Callable[..., LockBackend],
    line_length: Callable[[str], int],
    key: str,
    count: int,
    *,
    limit: int = 1,
    ahead: int = 1,
) -> Line:
    """``count`` threads, each with a backend of its own, that queue for ``key`` one after
    another (each queued, behind ``ahead`` entries and the waiters before it, before the
    next starts); each records its turn, then waits for permission to release."""
    line = Line([], [threading.Event() for _ in range(count)], [backends() for _ in range(count)], [])

    def wait(i: int) -> None:
        held = line.waiters[i].acquire(key, ttl=10, blocking=True, timeout=30, limit=limit)
        line.order.append(i)
        line.proceed[i].wait(30)
        line.waiters[i].release(held)

    for i in range(count):
        line.threads.append(threading.Thread(target=wait, args=(i,)))
        line.threads[-1].start()
        wait_until(lambda i=i: line_length(key) == ahead + i + 1, 10, f"waiter {i} to queue")
    return line


class QueueContract:
    """The promises of a line of waiters kept on the server (see the module docstring)."""

    def test_waiters_get_the_lock_in_the_order_they_queued_and_each_release_wakes_one(
        self, backend, backends, line_length, unique_key
    ):
        holder = backend.acquire(unique_key, ttl=10)
        line = queue_waiters(backends, line_length, unique_key, 5)
        assert sum(line.wakeups()) == 0
        backend.release(holder)
        for i in range(5):
            wait_until(lambda i=i: len(line.order) == i + 1, 10, f"turn {i}")
            # Only the waiter right behind the released entry was told; nobody else woke.
            assert sum(line.wakeups()) == i + 1
            line.proceed[i].set()
        line.finish()
        assert line.order == [0, 1, 2, 3, 4]

    def test_a_waiter_that_gives_up_leaves_the_line_and_the_next_moves_up(
        self, backend, backends, line_length, unique_key
    ):
        holder = backend.acquire(unique_key, ttl=10)
        quitter, patient = backends(), backends()
        assert quitter.acquire(unique_key, ttl=10, blocking=True, timeout=0.3) is None
        assert line_length(unique_key) == 1  # its entry went with it
        # A waiter queued behind one that gives up moves up and still gets the lock.
        got: list[HeldLock | None] = []
        late = threading.Thread(
            target=lambda: got.append(quitter.acquire(unique_key, ttl=10, blocking=True, timeout=0.6))
        )
        late.start()
        wait_until(lambda: line_length(unique_key) == 2, 5, "the quitter to queue")
        behind = threading.Thread(
            target=lambda: got.append(patient.acquire(unique_key, ttl=10, blocking=True, timeout=10))
        )
        behind.start()
        late.join(5)
        assert got == [None]
        backend.release(holder)
        behind.join(5)
        assert got[1] is not None
        assert got[1].fencing_token > holder.fencing_token
        assert patient.release(got[1]) is True

    # -- semaphores (limit > 1) ----------------------------------------------------------

    def test_semaphore_waiters_get_slots_in_the_order_they_queued(
        self, backend, backends, line_length, unique_key
    ):
        holders = [backend.acquire(unique_key, ttl=10, limit=2) for _ in range(2)]
        line = queue_waiters(backends, line_length, unique_key, 3, limit=2, ahead=2)
        assert line.order == []
        backend.release(holders[1])
        wait_until(lambda: line.order == [0], 10, "the first waiter's slot")
        backend.release(holders[0])
        wait_until(lambda: line.order == [0, 1], 10, "the second waiter's slot")
        line.proceed[0].set()
        wait_until(lambda: line.order == [0, 1, 2], 10, "the third waiter's slot")
        line.finish()

    def test_each_freed_slot_wakes_one_waiter_and_moves_the_next_up(
        self, backend, backends, line_length, unique_key
    ):
        # Five waiters on a full semaphore of 2. A freed slot wakes the first waiter (it
        # watches the entries ahead); its grant wakes the one behind it, which watches
        # the entries ahead from then on. Nobody else wakes: the cost of a slot does not
        # grow with the line.
        holders = [backend.acquire(unique_key, ttl=10, limit=2) for _ in range(2)]
        line = queue_waiters(backends, line_length, unique_key, 5, limit=2, ahead=2)
        assert line.wakeups() == [0] * 5
        expected = [0] * 5
        for turn in range(5):
            if turn < 2:
                backend.release(holders[turn])
            else:
                line.proceed[turn - 2].set()
            wait_until(lambda turn=turn: len(line.order) == turn + 1, 10, f"slot {turn}")
            expected[turn] += 1
            if turn + 1 < 5:
                expected[turn + 1] += 1
            wait_until(lambda: line.wakeups() == expected, 10, f"wake-ups {expected}")
        assert line.order == [0, 1, 2, 3, 4]
        line.finish()

    def test_a_deploy_that_changes_the_limit_needs_no_cleanup(
        self, backend, backends, line_length, unique_key
    ):
        # The old deploy's two holders (limit 2) stay while the new one (limit 4) starts:
        # the new limit counts every holder, old or new, and so does the old one. (kazoo's
        # Semaphore stores its limit in the lock's node and refuses another; here each
        # acquirer's limit is in its own entry.)
        old = [backend.acquire(unique_key, ttl=10, limit=2) for _ in range(2)]
        new = [backend.acquire(unique_key, ttl=10, limit=4) for _ in range(2)]
        assert None not in old + new
        assert backend.acquire(unique_key, ttl=10, limit=4) is None
        assert backend.acquire(unique_key, ttl=10, limit=2) is None
        # And back to 2: a waiter of limit 2 gets in once fewer than 2 are ahead of it.
        waiter = backends()
        got: list[HeldLock | None] = []
        thread = threading.Thread(
            target=lambda: got.append(waiter.acquire(unique_key, ttl=10, blocking=True, timeout=30, limit=2))
        )
        thread.start()
        wait_until(lambda: line_length(unique_key) == 5, 10, "the waiter to queue")
        for held in old + new[:1]:
            assert backend.release(held) is True
        thread.join(10)
        assert got[0] is not None
        assert got[0].fencing_token > max(h.fencing_token for h in old + new)
        assert sorted(info.limit for info in backend.lock_info(unique_key)) == [2, 4]
        assert backend.acquire(unique_key, ttl=10, limit=2) is None  # two ahead
        third = backend.acquire(unique_key, ttl=10, limit=4)  # but fewer than 4
        assert third is not None
        for held in (third, new[1], got[0]):
            assert held.release() is True
        assert line_length(unique_key) == 0

    def test_a_waiting_redelivered_copy_never_takes_a_second_slot(
        self, backend, backends, line_length, unique_key
    ):
        first = backend.acquire(unique_key, ttl=10, limit=3, owner=Owner.here("task-a"))
        copy = backends()
        got: list[HeldLock | None] = []
        thread = threading.Thread(target=lambda: got.append(copy.acquire(
            unique_key, ttl=10, blocking=True, timeout=30, limit=3, owner=Owner.here("task-a")
        )))
        thread.start()
        wait_until(lambda: line_length(unique_key) == 2, 10, "the copy to queue")
        other = backend.acquire(unique_key, ttl=10, limit=3, owner=Owner.here("task-b"))
        assert other is not None  # a free slot for anyone else
        assert [info.owner.task_id for info in backend.lock_info(unique_key)] == ["task-a", "task-b"]
        assert backend.release(first) is True
        thread.join(10)
        assert got[0] is not None
        assert got[0].fencing_token > other.fencing_token
        for held in (other, got[0]):
            assert held.release() is True
