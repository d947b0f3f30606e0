"""Signals sent along the lock's life, in the process where it happens.

Connect like any Celery signal::

    from celery_singleton_lock.signals import task_skipped

    @task_skipped.connect
    def count_skip(sender, key, task_id, **kwargs): ...

``sender`` is the task for task-driven locks and the backend for locks taken
through the lock API. Every signal passes ``key``; the others are named below.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["lock_acquired", "lock_contended", "lock_lost", "lock_released", "task_skipped"]

#: A lock was granted: ``key``, ``held`` (the :class:`~celery_singleton_lock.HeldLock`).
lock_acquired = Signal(name="lock_acquired", providing_args={"key", "held"})

#: A lock was found taken and the contention policy is about to decide:
#: ``key``, ``task_id``, ``policy``.
lock_contended = Signal(name="lock_contended", providing_args={"key", "task_id", "policy"})

#: A lock was released: ``key``, ``held``, ``was_held`` (False when it had been lost).
lock_released = Signal(name="lock_released", providing_args={"key", "held", "was_held"})

#: Renewal proved a lease gone while its holder still ran: ``key``, ``held``, ``reason``.
lock_lost = Signal(name="lock_lost", providing_args={"key", "held", "reason"})

#: A task call was skipped because its lock was taken: ``key``, ``task_id``; or because a
#: later ``debounce`` call of its key superseded it: then also ``reason``
#: (``"superseded by <task id>"``).
task_skipped = Signal(name="task_skipped", providing_args={"key", "task_id", "reason"})
