"""The public names: the contract of ARCHITECTURE.md ("Public contract") and a few extras."""

from __future__ import annotations

import celery_singleton_lock

#: Copied from ARCHITECTURE.md, "Public contract (import names)".
CONTRACT = {
    "SingletonTask", "singleton_task", "current_lock",
    "connect", "HeldLock",
    "Skip", "Retry", "Wait", "Raise",
    "LockError", "LockContended", "LockLost", "LockBackendUnavailable", "ConfigurationError",
}


def test_every_contract_name_is_exported_and_importable() -> None:
    missing = CONTRACT - set(celery_singleton_lock.__all__)
    assert missing == set()
    for name in CONTRACT:
        assert getattr(celery_singleton_lock, name) is not None


def test_every_exported_name_exists() -> None:
    for name in celery_singleton_lock.__all__:
        assert hasattr(celery_singleton_lock, name), name
    assert len(celery_singleton_lock.__all__) == len(set(celery_singleton_lock.__all__))


#: Beyond the contract: LockKeyError, which the core issue asks for (an argument with no
#: canonical form), and what a policy of one's own takes and returns (README, "Writing your
#: own policy"): Contention and Skipped.
EXTRA = {"LockKeyError", "Contention", "Skipped"}


def test_all_is_exactly_the_contract_plus_the_extras() -> None:
    assert set(celery_singleton_lock.__all__) == CONTRACT | EXTRA
    assert celery_singleton_lock.__all__ == sorted(celery_singleton_lock.__all__)


def test_the_exported_objects_are_the_implementations() -> None:
    from celery_singleton_lock import backends, errors, lease, policies, task

    assert celery_singleton_lock.SingletonTask is task.SingletonTask
    assert celery_singleton_lock.singleton_task is task.singleton_task
    assert celery_singleton_lock.current_lock is task.current_lock
    assert celery_singleton_lock.connect is backends.connect
    assert celery_singleton_lock.HeldLock is lease.HeldLock
    assert celery_singleton_lock.Wait is policies.Wait
    assert celery_singleton_lock.Contention is policies.Contention
    assert celery_singleton_lock.Skipped is policies.Skipped
    assert celery_singleton_lock.LockError is errors.LockError
