"""SingletonScheduler without servers: slots, claims, leadership, on the memory backend.

Two schedulers of one app stand for two beat processes: they share the app's in-process
lock store. The fake clock moves leases; ``apply_async`` is recorded instead of sent.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pytest
from celery import Celery
from celery.beat import PersistentScheduler, ScheduleEntry, Scheduler
from celery.schedules import crontab

from celery_singleton_lock import ConfigurationError
from celery_singleton_lock.beat import (
    SLOT_HEADER,
    SingletonScheduler,
    SingletonSchedulerMixin,
    singleton_scheduler,
    slot_of,
)
from celery_singleton_lock.config import read_settings
from tests.unit.conftest import FakeClock

UTC = dt.timezone.utc


class Recording(SingletonScheduler):
    """A SingletonScheduler that records what it would publish."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sent: list[ScheduleEntry] = []
        super().__init__(*args, **kwargs)

    def apply_async(self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **_: Any) -> None:
        self.sent.append(entry)


@pytest.fixture
def beat_app(eager_app: Celery) -> Celery:
    eager_app.conf.singleton_lock_beat_ttl = 10
    return eager_app


def beat(app: Celery) -> Recording:
    return Recording(app=app, lazy=True, max_interval=5)


def entry(app: Celery, run_every: Any, last_run_at: dt.datetime | None = None) -> ScheduleEntry:
    return ScheduleEntry(
        name="report", task="shop.report", schedule=run_every, app=app,
        last_run_at=last_run_at or dt.datetime(2024, 5, 1, 11, 0, tzinfo=UTC),
    )


class TestSlots:
    def test_interval_slots_are_whole_multiples_of_the_period_since_the_epoch(self, eager_app):
        now = dt.datetime(2024, 5, 1, 12, 7, 31, 400_000, tzinfo=UTC)
        assert slot_of(entry(eager_app, 1.0), now) == now.replace(microsecond=0)
        quarter = slot_of(entry(eager_app, dt.timedelta(minutes=15)), now)
        assert quarter == now.replace(minute=0, second=0, microsecond=0)

    def test_a_crontab_slot_is_its_latest_instant_not_the_first_after_the_last_run(self, eager_app):
        now = dt.datetime(2024, 5, 1, 12, 40, 30, tzinfo=UTC)
        cron = crontab(minute="*/15", nowfun=lambda: now, app=eager_app)
        stale = entry(eager_app, cron, last_run_at=dt.datetime(2024, 4, 1, tzinfo=UTC))
        assert slot_of(stale, now) == dt.datetime(2024, 5, 1, 12, 30, tzinfo=UTC)

    def test_a_sparse_crontab_is_found_days_back(self, eager_app):
        now = dt.datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)  # a Wednesday
        cron = crontab(minute=0, hour=9, day_of_week="mon", nowfun=lambda: now, app=eager_app)
        assert slot_of(entry(eager_app, cron), now) == dt.datetime(2024, 4, 29, 9, 0, tzinfo=UTC)


class TestClaims:
    def test_a_slot_is_claimed_once_and_an_older_one_never_after_a_newer(self, beat_app):
        first, second = beat(beat_app), beat(beat_app)
        job = entry(beat_app, 1.0)
        at = dt.datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC)
        assert first._claim(job, at, "t1") is not None
        assert second._claim(job, at, "t2") is None  # the same slot
        assert second._claim(job, at - dt.timedelta(seconds=1), "t3") is None  # an older one
        assert second._claim(job, at + dt.timedelta(seconds=1), "t4") is not None  # replaces it
        assert first._claim(job, at, "t5") is None

    def test_a_claim_is_not_renewed_and_expires_by_itself(self, beat_app, clock: FakeClock, keeper):
        job = entry(beat_app, 1.0)
        at = dt.datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC)
        claim = beat(beat_app)._claim(job, at, "t1")
        assert claim is not None
        assert claim not in keeper.tracked()
        clock.advance(claim.ttl)
        assert beat(beat_app)._claim(job, at, "t2") is not None


class TestLeadership:
    def test_one_leads_the_other_stands_by_until_the_leader_closes(self, beat_app, caplog):
        caplog.set_level(logging.INFO, logger="celery_singleton_lock.beat")
        first, second = beat(beat_app), beat(beat_app)
        assert first.tick() == 0.0
        assert first.is_leader
        assert second.tick() == 0.0
        assert not second.is_leader
        first.close()
        assert second.tick() == 0.0  # woken at once: the lock is free
        assert second.is_leader
        messages = [r.getMessage() for r in caplog.records]
        assert any("another beat leads 'unit'" in m for m in messages)
        assert any("released the leadership of 'unit'" in m for m in messages)

    def test_only_the_leader_publishes_and_stamps_the_slot(self, beat_app):
        leader, standby = beat(beat_app), beat(beat_app)
        leader.tick()
        standby.tick()
        job = entry(beat_app, 1.0)
        leader.apply_entry(job)
        standby.apply_entry(job)
        assert len(leader.sent) == 1
        assert standby.sent == []
        headers = leader.sent[0].options["headers"]
        assert headers[SLOT_HEADER].startswith("report@")
        assert leader.sent[0].options["task_id"]
        assert job.options == {}  # the schedule's own entry is left as it was

    def test_a_leader_whose_lease_is_gone_stops_emitting_and_stands_by(self, beat_app, clock, caplog):
        leader = beat(beat_app)
        leader.tick()
        clock.advance(10)  # no renewal confirmed the lease within its TTL
        leader.apply_entry(entry(beat_app, 1.0))
        assert leader.sent == []
        assert not leader.is_leader
        assert "lost the leadership of 'unit'" in caplog.text

    def test_reserve_counts_an_interval_entrys_next_run_from_its_slot(self, beat_app):
        leader = beat(beat_app)
        job = entry(beat_app, 1.0)
        leader.schedule[job.name] = job
        new = leader.reserve(job)
        assert new.last_run_at.microsecond == 0
        assert new.last_run_at <= dt.datetime.now(UTC)


def test_the_factory_makes_any_scheduler_a_singleton_one():
    cls = singleton_scheduler(PersistentScheduler)
    assert cls.__name__ == "SingletonPersistentScheduler"
    assert issubclass(cls, SingletonSchedulerMixin)
    assert issubclass(cls, PersistentScheduler)
    assert issubclass(SingletonScheduler, Scheduler)
    with pytest.raises(TypeError):
        singleton_scheduler(dict)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("singleton_lock_beat_ttl", 0),
        ("singleton_lock_beat_slot_grace", "60"),
        ("singleton_lock_beat_name", ""),
        ("singleton_lock_enqueue_once_ttl", -1),
    ],
)
def test_a_bad_beat_or_enqueue_setting_is_a_configuration_error_naming_it(setting, value):
    app = Celery("unit", broker="memory://")
    app.conf[setting] = value
    with pytest.raises(ConfigurationError) as info:
        read_settings(app.conf)
    assert info.value.option == setting


def test_beat_and_enqueue_settings_defaults():
    settings = read_settings(Celery("unit", broker="memory://").conf)
    assert (settings.beat_ttl, settings.beat_name, settings.beat_slot_grace) == (30.0, None, 60.0)
    assert settings.enqueue_once_ttl == 3600.0
