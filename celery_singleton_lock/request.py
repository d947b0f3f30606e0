"""The worker's main process: free the lock of a pool process it killed or lost, once that
process is dead, and only the lock that process held.

Celery reports a run's end to the main process in three ways that leave a lock behind:
``revoke(terminate=True)`` (any signal), a hard time limit, and a pool process that died
(``WorkerLostError``). The lock would then wait for its TTL. :class:`SingletonRequest`
(every :class:`~celery_singleton_lock.SingletonTask` uses it) frees it sooner, with two
rules that keep "one body at a time" (issue 9):

* **Only when the process is dead.** A soft revoke (``signal="SIGUSR1"``) raises
  ``SoftTimeLimitExceeded`` in the body, which may catch it and go on working; the lock
  stays with that body for as long as its process lives (it still renews and releases
  it). The kernel tells us of the exit: a pidfd becomes readable, no polling.
* **Only the lock that process held.** The release compares host, pid and task id all
  at once (:meth:`LockBackend.release_owned`). A redelivered copy of the same message
  (``acks_late``) runs under the same task id in another process or on another host; its
  lock is not ours to free when our copy dies.

Timeline of the bug this prevents::

    A (host 1, pid 10)  runs task T, holds lock K as (host 1, 10, T)
    B (host 1, pid 20)  gets T again (visibility timeout), waits for K
    B's child killed    B's main process frees "T's lock" by task id: A's lock is gone
    another call        runs beside A's body              <- two bodies at once

With the owner check, B frees only (host 1, 20, T), which does not exist.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.worker.request import Request

from celery_singleton_lock._per_process import PerProcess
from celery_singleton_lock.backends.base import Refused
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.errors import LockError

if TYPE_CHECKING:
    from celery_singleton_lock.backends.base import LockBackend

__all__ = ["SingletonRequest", "release_when_dead"]

logger = logging.getLogger("celery_singleton_lock.release")


#: Errors the pool reports for a run whose process was killed or died.
_KILLED = (Terminated, TimeLimitExceeded, WorkerLostError)


@dataclass(frozen=True)
class _Orphan:
    """A lock that a pool process may still hold, to release once that process is dead."""

    backend: LockBackend
    key: str
    owner: Owner
    label: str  # "task[id]", for the log line
    limit: int = 1  # the task's lock_limit: which slots the owner may hold


class _DeathWatch:
    """One daemon thread per process that waits, on pidfds, for processes to exit.

    Created on first use (and again after a fork). Releases run on this thread, so the
    worker's event loop never waits on the lock server for them.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._guard = threading.Lock()
        self._incoming: list[tuple[int, _Orphan]] = []
        threading.Thread(target=self._run, name="celery-singleton-lock-deathwatch", daemon=True).start()

    @classmethod
    def for_process(cls) -> _DeathWatch:
        return _death_watch.get()

    def add(self, pid: int, orphan: _Orphan) -> None:
        with self._guard:
            self._incoming.append((pid, orphan))
        os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        while True:
            try:
                for selected, _ in self._selector.select():
                    if selected.fd == self._wake_r:
                        self._take_incoming()
                    else:
                        self._selector.unregister(selected.fd)
                        os.close(selected.fd)
                        _release(selected.data)
            except Exception:  # the watch must outlive any bug: log it and go on
                logger.exception("death watch: a round failed; going on")

    def _take_incoming(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        with self._guard:
            incoming, self._incoming = self._incoming, []
        for pid, orphan in incoming:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:  # already gone (and reaped)
                _release(orphan)
                continue
            self._selector.register(pidfd, selectors.EVENT_READ, orphan)


_death_watch: PerProcess[_DeathWatch] = PerProcess(_DeathWatch, threading.Lock)


def _release(orphan: _Orphan) -> None:
    try:
        released = orphan.backend.release_owned(orphan.key, orphan.owner, limit=orphan.limit)
    except LockError as exc:
        logger.warning(
            "could not release the lock of %s after its process %s died: %s; it expires by its TTL",
            orphan.label, orphan.owner.pid, exc,
        )
        return
    if released:
        logger.info(
            "released the lock of %s: its pool process %s is dead", orphan.label, orphan.owner.pid
        )


def release_when_dead(backend: LockBackend, key: str, owner: Owner, label: str, limit: int = 1) -> bool:
    """Release ``key`` as soon as process ``owner.pid`` (of this host) has exited, if
    ``owner`` still holds it then. Returns at once.

    :returns: False where the platform cannot watch processes (no ``os.pidfd_open``):
        the lock then ends with its TTL, since the dead process no longer renews it.
    """
    if not hasattr(os, "pidfd_open"):
        return False
    _DeathWatch.for_process().add(owner.pid, _Orphan(backend, key, owner, label, limit))
    return True


class SingletonRequest(Request):  # type: ignore[misc]
    """Celery's worker-side request, freeing the lock of a run whose process was killed.

    Set as ``SingletonTask.Request``. A task that needs a Request class of its own should
    subclass this one.
    """

    def terminate(self, pool: Any, signal: Any = None) -> None:
        # Revoke with terminate, any signal: the process may live on (SIGUSR1 is only a
        # soft limit), so wait for its death rather than trusting the signal.
        super().terminate(pool, signal)
        self._release_when_dead()

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:  # the pool kills the process now
            self._release_when_dead()

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        lost = isinstance(exc, WorkerLostError)
        if lost:  # the process has exited already: settle its lock now, before the state
            self._settle_lost_process()
        try:
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            if not lost and (isinstance(exc, _KILLED) or not return_ok):
                self._release_when_dead()

    @property
    def store_errors(self) -> bool:
        # A redelivered copy that died while it waited for its first delivery must not
        # write FAILURE over the state of that delivery, which is still running.
        return not getattr(self, "_state_is_elsewhere", False) and bool(super().store_errors)

    def _settle_lost_process(self) -> None:
        found = self._lock_of_killed()
        if found is None:
            return
        backend, key, owner, label = found
        limit = self.task.lock_options().lock_limit
        try:
            if backend.release_owned(key, owner, limit=limit):
                logger.info("released the lock of %s: its pool process %s is dead", label, owner.pid)
                return
            if not (self.delivery_info or {}).get("redelivered"):
                return  # a first delivery waits behind no other delivery of itself
            # It held nothing: did it wait behind another delivery of the same message?
            # (One round trip; the probe, if granted, is released at once.)
            outcome = backend.attempt(
                key, self.task.lock_options().ttl, owner=Owner.here(self.id), limit=limit
            )
        except LockError as exc:
            logger.warning("could not settle the lock of %s after its process died: %s", label, exc)
            return
        if isinstance(outcome, Refused):
            if outcome.holder_task_id == self.id:
                self._state_is_elsewhere = True
                logger.info(
                    "%s: a redelivered copy died while its first delivery holds the lock; "
                    "leaving the task's state to that delivery", label,
                )
        else:
            backend.release(outcome)

    def _release_when_dead(self) -> None:
        found = self._lock_of_killed()
        if found is not None:
            release_when_dead(*found, limit=self.task.lock_options().lock_limit)

    def _lock_of_killed(self) -> tuple[LockBackend, str, Owner, str] | None:
        """The backend, key and owner of the lock the killed pool process may hold."""
        pid = self.worker_pid
        if not pid or pid == os.getpid():  # never started, or solo/threads: nothing was killed
            return None
        label = f"{self.task.name}[{self.id}]"
        args, kwargs = tuple(self.args or ()), dict(self.kwargs or {})
        try:
            key = self.task.lock_key_for(args, kwargs)
            backend = self.task.lock_options().settings.backend()
        except LockError as exc:
            logger.warning("cannot release the lock of killed %s: %s", label, exc)
            return None
        from celery_singleton_lock.task import lock_signature  # task.py names this module

        # The owner exactly as the pool process stored it (release_owned compares it all).
        signature = lock_signature(self.task.name, self, args, kwargs)
        return backend, key, Owner.here(self.id, pid=pid, signature=signature), label
