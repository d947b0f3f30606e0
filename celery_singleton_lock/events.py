"""Celery events of the locks, for Flower and other event consumers.

Sent when the worker sends task events (``celery worker -E``, or
``worker_send_task_events = True``), from the process where it happens (the pool
process for a prefork worker), with the run's ``uuid`` and the worker's ``hostname``
like Celery's own ``task-*`` events:

========================  ==============================================================
``task-lock-contended``   the run found its lock taken: ``lock_key``, ``lock_holder``
                          (the holding task's id, when the server told), ``lock_policy``
``task-lock-skipped``     the run was skipped: ``lock_key``, ``lock_holder``; a
                          ``debounce`` call superseded by a later one also has
                          ``lock_skip_reason`` ("superseded by <task id>", which is
                          ``lock_holder``)
``task-lock-waited``      the run got its lock after waiting: ``lock_key``,
                          ``lock_wait_seconds``
``task-lock-lost``        renewal proved the run's lease gone while it ran: ``lock_key``,
                          ``lock_lost_reason``
========================  ==============================================================

The fields are prefixed with ``lock_`` so that a consumer that merges event fields into
its task record (``celery.events.state``, Flower) keeps its own ``result``, ``state``...
Events are best effort: an event that cannot be published at once (the broker is down)
is dropped, never retried inside the task. The switch is read when the worker starts;
the ``enable_events`` remote-control command, which Flower may send, reaches only the
worker's main process, not its pool processes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.signals import celeryd_after_setup

from celery_singleton_lock import _observe, signals

if TYPE_CHECKING:
    from celery_singleton_lock.lease import HeldLock
    from celery_singleton_lock.policies import Contention

__all__ = ["EVENT_TYPES", "LockEvents"]

logger = logging.getLogger("celery_singleton_lock.events")

EVENT_TYPES = ("task-lock-contended", "task-lock-skipped", "task-lock-waited", "task-lock-lost")


class LockEvents(_observe.Observer):
    """Sends the events above for the runs of a worker.

    :param hostname: the worker's node name, the events' ``hostname``.
    """

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def contended(self, task: Any, contention: Contention) -> None:
        self._send_for_run(
            task, "task-lock-contended",
            lock_key=contention.key,
            lock_holder=contention.refused.holder_task_id,
            lock_policy=repr(task.lock_options().policy),
        )

    def contention_ended(
        self, task: Any, contention: Contention, outcome: str, seconds: float
    ) -> None:
        if outcome == "skipped":
            self._send_for_run(
                task, "task-lock-skipped",
                lock_key=contention.key, lock_holder=contention.refused.holder_task_id,
            )
        elif outcome == "waited":
            self._send_for_run(
                task, "task-lock-waited", lock_key=contention.key, lock_wait_seconds=round(seconds, 6)
            )

    def superseded(self, task: Any, key: str, later_task_id: str) -> None:
        self._send_for_run(
            task, "task-lock-skipped", lock_key=key, lock_holder=later_task_id,
            lock_skip_reason=f"superseded by {later_task_id}",
        )

    def lost(self, held: HeldLock, reason: str) -> None:
        # Sent by the lease keeper's thread, or the task's at the end of its body: the
        # run is the lock owner's task id, not the thread's current request.
        app = getattr(held.sender, "app", None)
        if app is None or not held.owner.task_id:
            return  # a lock taken outside a task
        try:
            with app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send(
                    "task-lock-lost", uuid=held.owner.task_id, retry=False,
                    lock_key=held.key, lock_lost_reason=reason,
                )
        except Exception as exc:  # best effort: the run's outcome does not depend on it
            logger.debug("could not send task-lock-lost for %r: %s", held.key, exc)

    def _send_for_run(self, task: Any, event_type: str, **fields: Any) -> None:
        try:
            task.send_event(event_type, retry=False, **fields)
        except Exception as exc:  # best effort: the run goes on without its event
            logger.debug("could not send %s: %s", event_type, exc)


def _on_lock_lost(sender: Any = None, held: Any = None, reason: str = "", **_: Any) -> None:
    if _events is not None and held is not None:
        _events.lost(held, reason)


#: This worker's events observer, when it sends task events (inherited by its pool).
_events: LockEvents | None = None


def start(worker: Any) -> LockEvents | None:
    """Send lock events from the runs of ``worker`` if it sends task events.

    :param worker: the starting :class:`celery.worker.WorkController`.
    """
    global _events  # noqa: PLW0603 - one switch per worker process, inherited by its pool
    if not getattr(worker, "task_events", False) or _events is not None:
        return _events
    _events = LockEvents(worker.hostname)
    _observe.install(_events)
    signals.lock_lost.connect(_on_lock_lost, weak=False, dispatch_uid="csl.events.lost")
    return _events


def stop() -> None:
    """Stop sending lock events (tests)."""
    global _events  # noqa: PLW0603
    if _events is not None:
        signals.lock_lost.disconnect(dispatch_uid="csl.events.lost")
        _observe.uninstall(_events)
        _events = None


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _start_with_worker(instance: Any = None, **_: Any) -> None:
    if instance is not None:
        start(instance)
