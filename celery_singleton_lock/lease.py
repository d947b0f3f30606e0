"""Held leases and the one thread per process that keeps them alive.

A :class:`HeldLock` is one acquisition: its own random token, its fencing token, and a
local *validity deadline* on the monotonic clock. The deadline is what lets us never
report a lock held that we cannot prove held::

    t0  renewal sent            valid_until = t0 + ttl - drift
    t0+ttl/3  next renewal      (transient error: retried until valid_until)
    valid_until passes          lock declared lost, before the server expires it at t0+ttl

The :class:`LeaseKeeper` renews every lock the process holds about every ``ttl/3``,
batching all due locks of one backend into one round trip. It holds the locks weakly: a
handle dropped without release stops being renewed and the server's TTL frees it. It
cannot die quietly: every failure is logged, and a lease proved gone is marked lost, logged
at ERROR and announced with the ``lock_lost`` signal. It never raises into a task's thread;
the task learns of a loss through :attr:`HeldLock.lost` and :meth:`HeldLock.ensure_held`,
and :meth:`HeldLock.settle` at the end of the body makes sure a loss was announced.

The keeper is a thread of the operating system even in a gevent worker, where a greenlet
would not run while a task body computes; see _native.py for what that takes.
"""

from __future__ import annotations

import _thread
import logging
import math
import os
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from celery_singleton_lock import _native, _observe, signals
from celery_singleton_lock._per_process import PerProcess
from celery_singleton_lock.errors import LockError, LockLost

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from celery_singleton_lock.backends.owner import Owner

__all__ = ["HeldLock", "LeaseKeeper"]

logger = logging.getLogger("celery_singleton_lock.lease")

#: Renew when a third of the TTL has passed; locks due within another sixth are
#: renewed in the same round trip, so many locks settle into one batch per interval.
RENEW_FRACTION = 1 / 3
BATCH_FRACTION = 1 / 6
#: After a transient renewal error, try again this soon (bounded by the deadline).
RETRY_AFTER = 0.5
#: The longest the thread sleeps at once (huge TTLs must not overflow a timed wait).
MAX_SLEEP = 60.0
#: The thread sleeps at most this much less than the renewal interval it learnt from
#: the locks tracked while it slept, so that the next such lock, whose round trip may
#: have been a little slower, is still due after the thread wakes (see ``track``).
LEARNT_MARGIN = 1 / 8


def clock_drift(ttl: float) -> float:
    """Margin for clock rate differences between us and the server (1% + 2 ms)."""
    return ttl * 0.01 + 0.002


class LeaseBackend(Protocol):
    """What a held lease needs of its backend (a :class:`LockBackend` is one). A protocol,
    so that this module does not import the backends, which import it."""

    clock: Callable[[], float]

    def renew(self, locks: Sequence[HeldLock]) -> list[bool]:
        """Replace the TTL of every lock in ``locks`` (one round trip); True where still ours."""

    def release(self, held: HeldLock) -> bool:
        """Release ``held`` if it is still ours."""

    def keep_until(self, held: HeldLock, deadline: float) -> bool:
        """Keep ``held`` taken until ``deadline`` (on ``clock``), then let it go."""


@runtime_checkable
class ForNativeThread(Protocol):
    """A backend whose connections must not be shared with the keeper's OS thread.

    In a gevent-patched process a socket belongs to the thread that created it (see
    _native.py); such a backend gives the keeper a copy of itself with connections of its
    own. A backend without the method is used as it is (memory, grpc channels).
    """

    def for_native_thread(self) -> LeaseBackend:
        """A copy for :meth:`LockBackend.renew` calls from another OS thread."""


class HeldLock:
    """One acquisition of a lock. Returned by :meth:`LockBackend.acquire`.

    :ivar key: the lock's name, as given to ``acquire`` (without the backend's prefix).
    :ivar token: this acquisition's random token; release and renewal compare it.
    :ivar fencing_token: strictly increases with every acquisition of this key; pass it
        to the resource you protect so it can refuse writes from an older holder.
    :ivar ttl: the lease length in seconds.
    :ivar owner: who holds it.
    :ivar slot: which slot of a semaphore it is (0 to ``limit`` - 1); None: an exclusive lock.
    :ivar limit: how many holders the key allows at once (1: an exclusive lock).
    """

    def __init__(
        self,
        backend: LeaseBackend,
        key: str,
        token: str,
        fencing_token: int,
        ttl: float,
        owner: Owner,
        *,
        valid_until: float,
        slot: int | None = None,
        limit: int = 1,
    ) -> None:
        self.backend = backend
        self.key = key
        self.token = token
        self.fencing_token = fencing_token
        self.ttl = ttl
        self.owner = owner
        self.slot = slot
        self.limit = limit
        #: The sender of this lock's signals: the backend, or the task that took it.
        self.sender: Any = backend
        self._state = _native.allocate_lock()  # also taken by the keeper's OS thread
        #: The process that took the lock: only it may release it. A forked child
        #: inherits this object, and its token would match on the server.
        self.taken_by = os.getpid()
        self._valid_until = valid_until
        self._next_renewal = valid_until - ttl + ttl * RENEW_FRACTION
        self._renew_until: float | None = None
        self._lost_reason: str | None = None
        self._loss_announced = False
        self._released = False
        # Under gevent: how to reach the greenlets of the thread that took the lock.
        self._post = _native.poster()

    def __repr__(self) -> str:
        state = "released" if self._released else ("lost" if self.lost else "held")
        slot = "" if self.slot is None else f" slot {self.slot} of {self.limit}"
        return f"<HeldLock {self.key!r}{slot} fencing_token={self.fencing_token} {state}>"

    @property
    def lost(self) -> bool:
        """True once the lease can no longer be proved ours (and we did not release it)."""
        if self._released:
            return False
        return self._lost_reason is not None or self.backend.clock() >= self._valid_until

    @property
    def released(self) -> bool:
        return self._released

    @property
    def lost_reason(self) -> str | None:
        if self._lost_reason is None and self.lost:
            return "its validity deadline passed before a renewal confirmed it"
        return self._lost_reason

    @property
    def valid_for(self) -> float:
        """Seconds this lease is still proved ours by the local clock (0 when lost)."""
        if self.lost or self._released:
            return 0.0
        return max(0.0, self._valid_until - self.backend.clock())

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` unless the lease is still provably ours.

        Call it before an irreversible step (a payment, an e-mail) in a long task.
        """
        if self._released:
            raise LockLost(f"lock {self.key!r} was already released", key=self.key)
        if self.lost:
            raise LockLost(f"lock {self.key!r} was lost: {self.lost_reason}", key=self.key)

    def release(self) -> bool:
        """Release through the backend; see :meth:`LockBackend.release`."""
        return self.backend.release(self)

    def release_quietly(self) -> bool:
        """Release, logging a server error at ERROR instead of raising it: for the end of
        a run, whose outcome stands whatever the release does (the lease then ends by
        its TTL)."""
        try:
            return self.release()
        except LockError as exc:
            if _observe.observer is not None:
                _observe.observer.backend_error(
                    self.sender, getattr(exc, "url", None) or getattr(self.backend, "url", None), "release"
                )
            logger.error("could not release %r: %s; it expires within %ss", self.key, exc, self.ttl)
            return False

    def settle(self) -> bool:
        """Make sure a loss is logged at ERROR and announced with ``lock_lost``, once.

        The task calls it when its body returns (before release). The keeper declares a
        loss as soon as it sees one, but it may not have: the validity deadline may have
        passed between two of its rounds, or a long C call may have kept it from running.
        In a gevent worker the keeper's ``lock_lost`` waits for the hub, which a body that
        never yields does not give back; this sends it now, in the task's thread.

        :returns: True if the lock was lost (it is no longer provably ours).
        """
        if not self.lost:
            return False
        reason = self.lost_reason or "it was lost"
        LeaseKeeper.for_process().declare_lost(self, reason, announce_here=True)
        return True

    def stop_renewal_at(self, deadline: float) -> None:
        """Stop renewing at ``deadline`` (monotonic); the server's TTL then ends the lease.

        Used for a task's hard time limit: the process may be killed then, and the lock
        must not outlive it by more than one TTL.
        """
        self._renew_until = deadline

    # The methods below are the lease keeper's and the backend's.

    def _confirm(self, sent_at: float) -> None:
        with self._state:
            self._valid_until = sent_at + self.ttl - clock_drift(self.ttl)
            self._next_renewal = sent_at + self.ttl * RENEW_FRACTION

    def _mark_lost(self, reason: str) -> bool:
        """Record the loss once; True if this call recorded it."""
        with self._state:
            if self._released or self._lost_reason is not None:
                return False
            self._lost_reason = reason
        return True

    def _announce_loss(self) -> None:
        """Send ``lock_lost`` unless it was sent for this acquisition already."""
        with self._state:
            if self._loss_announced:
                return
            self._loss_announced = True
        reason = self._lost_reason or "it was lost"
        signals.lock_lost.send(sender=self.sender, key=self.key, held=self, reason=reason)

    def _mark_released(self) -> bool:
        """True if this call released it (a handle releases once)."""
        with self._state:
            if self._released:
                return False
            self._released = True
            return True


class LeaseKeeper:
    """One daemon thread per process renewing every held lock; see the module docstring.

    Created lazily by :meth:`for_process`, and again after a fork (a prefork child
    gets its own), so it works in solo, threads, prefork and gevent pools alike.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._locks: weakref.WeakSet[HeldLock] = weakref.WeakSet()
        # OS locks, never gevent's: the keeper's thread is not a greenlet (see _native.py).
        # The guard covers the fields below; nothing slow ever happens while holding it.
        self._guard = _native.allocate_lock()
        self._wakeup = _native.Wakeup()
        self._thread: _native.NativeThread | None = None
        # Under gevent, the copy of each backend whose connections belong to our thread.
        self._renewers: weakref.WeakKeyDictionary[LeaseBackend, LeaseBackend] = (
            weakref.WeakKeyDictionary()
        )
        # When the thread will wake up by itself (time.monotonic); a new lock due later
        # needs no wake-up call, which keeps acquire free of thread switches.
        self._wakes_at = math.inf
        # The longest the thread sleeps next time: learnt from the locks tracked since it
        # last woke (held or released by now) and from the locks it holds.
        self._learnt_interval: float | None = None
        self._sleep_cap: float | None = None  # what the thread's current sleep is bounded by
        #: Round trips sent, and wake-up calls made by ``track``, for tests and benchmarks.
        self.renewal_calls = 0
        self.wakeup_calls = 0
        #: The thread's id in the kernel once it runs (its CPU time: /proc/self/task/<id>).
        self.native_id: int | None = None

    @classmethod
    def for_process(cls) -> LeaseKeeper:
        return _keeper.get()

    def track(self, held: HeldLock) -> None:
        with self._guard:
            self._locks.add(held)
            if self._thread is None or not self._thread.is_alive():
                self._thread = _native.NativeThread(self._run)
            due_in = held._next_renewal - held.backend.clock()
            # Learnt here, not by the thread: a lock held only briefly is gone before the
            # thread looks. The thread then sleeps no longer than this (held locks or
            # not), so a lock like this one taken later is due after the thread wakes: a
            # loop of brief locks needs no wake-up calls, even beside a long-held lock.
            learnt = max(due_in, 0.0) * (1 - LEARNT_MARGIN)
            self._learnt_interval = min(self._learnt_interval or math.inf, learnt)
            if time.monotonic() + due_in < self._wakes_at:
                self.wakeup_calls += 1
                self._wakeup.set()

    def untrack(self, held: HeldLock) -> None:
        with self._guard:
            self._locks.discard(held)

    def tracked(self) -> list[HeldLock]:
        with self._guard:
            return list(self._locks)

    def _run(self) -> None:
        self.native_id = _thread.get_native_id()
        called = False
        while True:
            try:
                with self._guard:
                    delay = self._seconds_to_next(forget=not called)
                    self._wakes_at = math.inf if delay is None else time.monotonic() + delay
                # A lock tracked from here on finds _wakes_at set and leaves a wake-up call,
                # which this wait then returns at once for.
                called = self._wakeup.wait(delay)
                with self._guard:
                    self._wakes_at = -math.inf  # busy: it looks at every lock before sleeping
                self.renew_due()
            except Exception:  # the keeper must outlive any bug: log it and go on
                logger.exception("lease keeper: renewal round failed; retrying")
                self._wakeup.wait(RETRY_AFTER)

    def _seconds_to_next(self, *, forget: bool = True) -> float | None:
        """How long the thread sleeps now (None: until called); under the guard.

        Never longer than the interval learnt since it last woke by its own timer. A
        process taking and releasing locks in a loop then never needs a wake-up call (a
        thread switch per acquire); once it stops, the thread sleeps one more such
        interval, then until its held locks are due (or until called, when it holds none).

        :param forget: the thread slept its whole interval: what it learnt before is
            forgotten. False when a wake-up call ended the sleep (perhaps one left by a lock
            it had seen already): it keeps the interval, or that lock's like would have to
            call it again.
        """
        learnt = self._learnt_interval
        if not forget and self._sleep_cap is not None:
            learnt = min(learnt or math.inf, self._sleep_cap)
        self._sleep_cap, self._learnt_interval = learnt, None
        locks = list(self._locks)
        if not locks:
            return learnt
        self._learnt_interval = min(h.ttl for h in locks) * RENEW_FRACTION
        soonest = min(min(h._next_renewal, h._valid_until) - h.backend.clock() for h in locks)
        return min(max(0.0, soonest), learnt or math.inf, MAX_SLEEP)

    def renew_due(self) -> None:
        """One round: renew every due lock, one backend call per backend."""
        batches: dict[int, tuple[LeaseBackend, list[HeldLock]]] = {}
        for held in self.tracked():
            now = held.backend.clock()  # each backend's clock: tests give memory a fake one
            if held.released:
                self.untrack(held)
                continue
            if held._renew_until is not None and now >= held._renew_until:
                logger.debug("renewal of %r stops (its task ended or hit its time limit)", held.key)
                self.untrack(held)
                continue
            if now >= held._valid_until:
                self.declare_lost(held, "no renewal was confirmed before its validity deadline")
                continue
            if held._next_renewal - held.ttl * BATCH_FRACTION <= now:
                batches.setdefault(id(held.backend), (held.backend, []))[1].append(held)
        for backend, due in batches.values():
            self._renew_batch(backend, due)

    def _renew_batch(self, backend: LeaseBackend, due: list[HeldLock]) -> None:
        sent_at = backend.clock()
        self.renewal_calls += 1
        observer = _observe.observer
        started = time.perf_counter()
        try:
            still_ours = self._renewer(backend).renew(due)
        except LockError as exc:
            if observer is not None:
                url = getattr(exc, "url", None) or getattr(backend, "url", None)
                observer.backend_error(None, url, "renew")
            now = backend.clock()
            retried = [held for held in due if now < held._valid_until]
            for held in due:
                if now >= held._valid_until:
                    self.declare_lost(held, f"renewal kept failing until its deadline: {exc}")
            for held in retried:
                held._next_renewal = min(sent_at + RETRY_AFTER, (sent_at + held._valid_until) / 2)
            if retried:  # one line per round trip, not per lock (there may be thousands)
                others = f" and {len(retried) - 1} more" if len(retried) > 1 else ""
                logger.warning("renewal of %r%s failed (%s); retrying", retried[0].key, others, exc)
            return
        if observer is not None:
            observer.renewed(backend, time.perf_counter() - started)
        for held, ours in zip(due, still_ours, strict=True):
            if ours:
                held._confirm(sent_at)
            else:
                self.declare_lost(held, "the server says it is no longer ours (expired or taken)")

    def _renewer(self, backend: LeaseBackend) -> LeaseBackend:
        """The backend to renew through from this thread (itself, unless under gevent)."""
        if not _native.patched() or not isinstance(backend, ForNativeThread):
            return backend
        renewer = self._renewers.get(backend)
        if renewer is None:
            renewer = self._renewers[backend] = backend.for_native_thread()
        return renewer

    def declare_lost(self, held: HeldLock, reason: str, *, announce_here: bool = False) -> None:
        """Stop renewing ``held``, mark it lost, log at ERROR and send ``lock_lost``: each
        once, whoever calls first (the keeper, or the task through :meth:`HeldLock.settle`).

        :param announce_here: send ``lock_lost`` from the calling thread. Otherwise, in a
            gevent worker, it goes to a new greenlet on the hub of the thread that took the
            lock, where its receivers' sockets live; the ERROR line is logged at once.
        """
        self.untrack(held)
        if held._mark_lost(reason):
            logger.error("lock %r lost: %s", held.key, reason)
        elif held._lost_reason is None:  # released before it could be declared: not lost
            return
        if announce_here or held._post is None:
            held._announce_loss()
        elif not held._loss_announced:
            held._post(held._announce_loss)


# A forked child gets a keeper of its own: the parent's thread does not exist in it, and
# the parent's locks are the parent's to renew.
_keeper: PerProcess[LeaseKeeper] = PerProcess(LeaseKeeper, _native.allocate_lock)
