"""The other processes of the contract suite's cross-process promises (tests/contract.py).

Each function runs in a child process and talks to the test through one end of a
``multiprocessing`` pipe: it says what it holds as soon as it holds it, so the test acts
on a fact (never after a sleep), and it answers the test's questions about what it sees.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

from celery_singleton_lock import LockLost, connect
from celery_singleton_lock.backends.base import LockBackend
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.lease import HeldLock, clock_drift
from tests.conftest import wait_until


class BackendSpec(NamedTuple):
    """How another process opens the same backend: ``connect(url, **options)``.

    Picklable, so it crosses to a spawned child.
    """

    url: str | list[str]
    options: dict[str, Any] = {}  # noqa: RUF012 - a NamedTuple default, never mutated

    def connect(self, **overrides: Any) -> LockBackend:
        return connect(self.url, **{**self.options, **overrides})


def lease_started_at(held: HeldLock) -> float:
    """When (time.monotonic, the same clock in every process on Linux) the lease's last
    confirmation was sent: the server's lease ends one TTL after it received that."""
    return held._valid_until - held.ttl + clock_drift(held.ttl)


def hold_slot(spec: BackendSpec, key: str, ttl: float, limit: int, pipe: Connection) -> None:
    """:func:`hold` a slot of the semaphore ``key`` of ``limit`` slots."""
    hold(spec, key, ttl, None, pipe, limit)


def hold(
    spec: BackendSpec, key: str, ttl: float, task_id: str | None, pipe: Connection, limit: int = 1
) -> None:
    """Take ``key`` (owned by ``task_id`` in this process; a slot of it, for ``limit`` > 1)
    and keep it (the lease keeper renews it), reporting every renewal.

    Sends ``("held", fencing_token, pid, lease start)`` once it holds the lock, then
    ``("renewed", lease start)`` after each confirmed renewal. On ``"check"`` (after a
    SIGSTOP and SIGCONT), waits until it sees the lock lost and sends ``("checked", lost,
    ensure_held raised LockLost, release's result)``; on ``"exit"`` it returns.
    """
    backend = spec.connect()
    held = backend.acquire(key, ttl=ttl, owner=Owner.here(task_id), limit=limit)
    assert held is not None
    started = lease_started_at(held)
    pipe.send(("held", held.fencing_token, os.getpid(), started))
    while True:
        if pipe.poll(0.02):
            command = pipe.recv()
            if command == "exit":
                return
            if command == "check":
                pipe.send(("checked", *_check_lost(held)))
                continue
        if lease_started_at(held) != started and not held.lost:
            started = lease_started_at(held)
            pipe.send(("renewed", started))


def _check_lost(held: HeldLock) -> tuple[bool, bool, bool]:
    # Its clock ran on while it was stopped: the validity deadline has passed, or the
    # keeper's next round hears from the server that the lease is gone.
    wait_until(lambda: held.lost, 10, "the paused holder to see its lease gone")
    try:
        held.ensure_held()
        raised = False
    except LockLost:
        raised = True
    return held.lost, raised, held.release()


def count_under_lock(spec: BackendSpec, key: str, counter: str, rounds: int, start: Any) -> None:
    """``rounds`` read-modify-write increments of the number in the file ``counter``, each
    under the lock; the file also keeps the last fencing token, which must only rise."""
    backend = spec.connect()
    path = Path(counter)
    start.wait(30)
    for _ in range(rounds):
        with backend.lock(key, ttl=10, timeout=60) as held:
            count, token = (int(word) for word in (path.read_text() or "0 0").split())  # read ...
            assert held.fencing_token > token, (held.fencing_token, token)
            path.write_text(f"{count + 1} {held.fencing_token}")  # ... then write: not atomic
    backend.close()


def enter_under_semaphore(
    spec: BackendSpec, key: str, limit: int, journal: str, rounds: int, start: Any
) -> None:
    """``rounds`` times: take a slot of ``key`` (waiting), append ``"in <fencing token>"``
    to the file ``journal``, work a little, append ``"out <fencing token>"``, release.

    Each line is one small ``O_APPEND`` write, so lines never interleave; the in/out
    lines of a run sit inside the time it held its slot, so the most runs the journal
    shows at once is never more than really ran at once.
    """
    backend = spec.connect()
    start.wait(30)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
    try:
        for _ in range(rounds):
            with backend.lock(key, ttl=10, timeout=60, limit=limit) as held:
                os.write(fd, f"in {held.fencing_token} {os.getpid()}\n".encode())
                time.sleep(0.01)  # the protected work: long enough for the slots to fill
                os.write(fd, f"out {held.fencing_token} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
        backend.close()


def inherit(
    kept: HeldLock, release: bool, spec: BackendSpec, own_key: str, ttl: float, pipe: Connection
) -> None:
    """A forked child holding a copy of its parent's ``kept``. With ``release``, it tries
    to release it, sending ``("tried", release's result)`` (``("tried", None)`` without);
    then it takes a lock of its own, so that its lease keeper runs, until ``"exit"``."""
    outcome: object = None
    if release:
        try:
            outcome = kept.release()
        except Exception as exc:  # the parent expects False: an error is a failure to show
            outcome = repr(exc)
    pipe.send(("tried", outcome))
    backend = spec.connect()
    own = backend.acquire(own_key, ttl=ttl)
    assert own is not None
    while pipe.recv() != "exit":
        pass
    backend.release(own)
    backend.close()
