"""celery-singleton-lock: run each Celery task signature once at a time.

A distributed lease per task signature, taken right before the task body runs, renewed
while it runs and released after; see README.md for the tour.
"""

from __future__ import annotations

from celery_singleton_lock.backends import connect
from celery_singleton_lock.errors import (
    ConfigurationError,
    LockBackendUnavailable,
    LockContended,
    LockError,
    LockKeyError,
    LockLost,
)
from celery_singleton_lock.lease import HeldLock
from celery_singleton_lock.policies import Contention, Raise, Retry, Skip, Skipped, Wait
from celery_singleton_lock.task import SingletonTask, current_lock, singleton_task

__all__ = [
    "ConfigurationError",
    "Contention",
    "HeldLock",
    "LockBackendUnavailable",
    "LockContended",
    "LockError",
    "LockKeyError",
    "LockLost",
    "Raise",
    "Retry",
    "SingletonTask",
    "Skip",
    "Skipped",
    "Wait",
    "connect",
    "current_lock",
    "singleton_task",
]

__version__ = "0.1.0"
