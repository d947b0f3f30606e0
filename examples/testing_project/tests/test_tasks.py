from shop.celery import app
from shop.tasks import rebuild_report, sync_account

from celery_singleton_lock import LockContended
from celery_singleton_lock.testing import hold_lock


def test_a_report_that_is_being_rebuilt_is_skipped(locks, lock_events):
    with hold_lock(rebuild_report, "2024-05-01"):  # as if another worker were rebuilding it
        result = rebuild_report.delay("2024-05-01")
    lock_events.assert_skipped(result)
    assert result.get() is None


def test_a_report_of_another_day_runs(locks, lock_events):
    with hold_lock(rebuild_report, "2024-05-01"):
        result = rebuild_report.delay("2024-05-02")
    lock_events.assert_ran_locked(result)
    assert result.get() == "report of 2024-05-02"


def test_a_busy_account_is_retried_then_fails(locks, lock_events):
    with hold_lock(sync_account, 7):
        result = sync_account.delay(7, full=True)  # lock_key=("account_id",): the same lock
    # In eager mode a retry runs again at once: the first run and its 2 retries met the lock.
    assert len(lock_events.contended) == 3
    assert isinstance(result.result, LockContended)


def test_the_lock_is_free_after_a_run(locks):
    assert sync_account.delay(7).get() == {"account": 7, "full": False}
    with hold_lock(sync_account, 7) as held:  # would raise AssertionError if still held
        assert held.key == sync_account.lock_key_for((7,), {})


def test_what_a_sync_does_without_locking(locks, no_singleton_locks):
    with hold_lock(sync_account, 7):  # this lock would make the call retry
        assert sync_account(7, full=True) == {"account": 7, "full": True}


def test_on_a_real_redis(configure_lock_backend, redis_lock_url, lock_events):
    configure_lock_backend(app, redis_lock_url)  # a throw-away redis-server, or a container
    with hold_lock(rebuild_report, "2024-05-01"):
        skipped = rebuild_report.delay("2024-05-01")
    lock_events.assert_skipped(skipped)
    assert rebuild_report.delay("2024-05-01").get() == "report of 2024-05-01"
