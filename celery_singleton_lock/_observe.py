"""The one seam through which the lock flow reports to metrics and events.

``observer`` is None unless a worker turned metrics (``singleton_lock_metrics_port``) or
events (``-E``) on, so with both off every report costs the lock flow one ``is None``
test. The task, the contention path and the lease keeper call the methods below; locks
released and lost reach the observers through the ``lock_released`` and ``lock_lost``
signals, which are sent anyway (see metrics.py and events.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_singleton_lock.lease import HeldLock
    from celery_singleton_lock.policies import Contention

__all__ = ["Fanout", "Observer", "backend_scheme", "install", "observer", "task_name"]

#: The outcomes of a contention, as the ``outcome`` label and event fields spell them.
OUTCOMES = ("skipped", "retried", "waited", "raised")


class Observer:
    """What the lock flow reports; every method does nothing here.

    ``task`` is the :class:`SingletonTask` whose call it is.
    """

    def acquired(self, task: Any, held: HeldLock) -> None:
        """A task run got its lock (at once, or after contention)."""

    def contended(self, task: Any, contention: Contention) -> None:
        """A task run found its lock taken; its policy decides next."""

    def contention_ended(
        self, task: Any, contention: Contention, outcome: str, seconds: float
    ) -> None:
        """The policy decided: ``outcome`` is one of :data:`OUTCOMES`, ``seconds`` the
        time from the refusal to the decision (for "waited": the wait for the lock)."""

    def superseded(self, task: Any, key: str, later_task_id: str) -> None:
        """A ``debounce`` call ended as skipped: ``later_task_id``, a later call of its
        key, runs instead (no contention: the lock was never asked for)."""

    def renewed(self, backend: Any, seconds: float) -> None:
        """One renewal round trip of the lease keeper took ``seconds``."""

    def backend_error(self, task: Any, url: str | None, operation: str) -> None:
        """The lock server failed an ``operation`` ("acquire", "renew", "release");
        ``task`` is None for a renewal round, which serves every task of the process."""


class Fanout(Observer):
    """Several observers as one (metrics and events both on)."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def acquired(self, task: Any, held: HeldLock) -> None:
        for each in self.observers:
            each.acquired(task, held)

    def contended(self, task: Any, contention: Contention) -> None:
        for each in self.observers:
            each.contended(task, contention)

    def contention_ended(
        self, task: Any, contention: Contention, outcome: str, seconds: float
    ) -> None:
        for each in self.observers:
            each.contention_ended(task, contention, outcome, seconds)

    def superseded(self, task: Any, key: str, later_task_id: str) -> None:
        for each in self.observers:
            each.superseded(task, key, later_task_id)

    def renewed(self, backend: Any, seconds: float) -> None:
        for each in self.observers:
            each.renewed(backend, seconds)

    def backend_error(self, task: Any, url: str | None, operation: str) -> None:
        for each in self.observers:
            each.backend_error(task, url, operation)


#: The active observer of this process (inherited by prefork children at fork).
observer: Observer | None = None


def install(new: Observer) -> None:
    """Add ``new`` to this process's observers."""
    global observer  # noqa: PLW0603 - the seam is one module global, read without a lock
    if observer is None:
        observer = new
    elif isinstance(observer, Fanout):
        observer = Fanout(*observer.observers, new)
    else:
        observer = Fanout(observer, new)


def uninstall(old: Observer) -> None:
    """Remove ``old`` (a worker shutting down, a test)."""
    global observer  # noqa: PLW0603
    current = observer.observers if isinstance(observer, Fanout) else (observer,)
    rest = tuple(each for each in current if each is not None and each is not old)
    observer = None if not rest else rest[0] if len(rest) == 1 else Fanout(*rest)


def task_name(task: Any) -> str:
    """The ``task`` label: the task's name; "" for a lock taken outside a task."""
    name = getattr(task, "name", None)
    return name if isinstance(name, str) else ""


def backend_scheme(backend_or_url: Any) -> str:
    """The ``backend`` label: the lock server's URL scheme ("redis", "etcd", ...)."""
    url = backend_or_url if isinstance(backend_or_url, str) else getattr(backend_or_url, "url", "")
    if isinstance(url, str) and "://" in url:
        return url.partition("://")[0]
    schemes = getattr(backend_or_url, "schemes", ())
    return str(schemes[0]) if schemes else "unknown"
