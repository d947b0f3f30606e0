"""Highly available ``celery beat``: many beat processes, one leader, every slot once.

Run as many beats as you like::

    celery -A proj beat -S celery_singleton_lock.beat:SingletonScheduler

Two mechanisms, each enough on its own for the common case, together for the hard ones:

**Leadership.** Only the holder of the leader lease (key ``leader:<beat name>`` in the
``<prefix>.beat`` namespace) emits. The lease is an ordinary lock, renewed by the lease
keeper thread (so a tick that takes long cannot lose it). Standbys block in
``backend.wait()``: woken by the server when the leader releases (a clean shutdown), or
when its lease runs out (a crash), never by polling. A leader that can no longer prove its
lease (renewal refused, or failing until its deadline) emits nothing more and stands by.

**Slot claims.** Before publishing, the leader claims the entry's *slot*, the instant the
entry is scheduled for, with set-if-absent; a slot already claimed is not published. That
covers what leadership cannot: a leader paused (GC, SIGSTOP) between its last check and
the publish while another took over, and a restarted beat replaying a due entry::

    t0  A leads, emits 12:00:00 (claims it)
    t1  A is paused; its lease expires; B is elected and emits 12:00:01 (claims it)
    t2  A resumes: its lease is lost by its own clock, so it stands by; had it been past
        that check already, its claim for 12:00:01 (or older) would be refused

There is one claim key per entry, holding the newest slot emitted: a claim for a slot
that is older than or equal to the stored one is refused, a newer one replaces it. So a
stale emitter can never go back in time, and the server holds one small key per entry.
A claim also expires by itself: at the entry's next slot plus ``singleton_lock_beat_slot_grace``.

A slot is the same instant in every beat:

* interval schedules (``schedule(run_every)``, plain numbers and timedeltas) are aligned
  to whole multiples of ``run_every`` since the Unix epoch: a 1-second entry is due at
  every whole second, a 15-minute one at :00, :15, :30 and :45;
* every other schedule (``crontab``, ``solar``...) names the latest instant at or before
  now at which it is due: a beat that takes over at 12:00:40 and finds a minutely crontab
  due names 12:00, the slot the old leader may already have emitted.

The published message carries its slot in the ``singleton_slot`` header
(``"<entry>@<ISO time>"``), readable in the task as ``self.request.singleton_slot``.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
from typing import TYPE_CHECKING, Any

from celery.beat import Scheduler
from celery.schedules import schedule as interval_schedule
from celery.utils import uuid

from celery_singleton_lock.backends.base import Refused
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.config import settings_for
from celery_singleton_lock.errors import LockError
from celery_singleton_lock.keys import resource_name
from celery_singleton_lock.lease import HeldLock, LeaseKeeper

if TYPE_CHECKING:
    from celery.beat import ScheduleEntry

    from celery_singleton_lock.backends.base import LockBackend

    _SchedulerBase = Scheduler
else:
    _SchedulerBase = object

__all__ = ["SLOT_HEADER", "SingletonScheduler", "SingletonSchedulerMixin", "singleton_scheduler", "slot_of"]

logger = logging.getLogger("celery_singleton_lock.beat")

#: The message header naming the slot a beat emission belongs to.
SLOT_HEADER = "singleton_slot"

_UTC = dt.timezone.utc
#: How far back :func:`slot_of` looks for a non-interval schedule's latest due instant,
#: widening step by step so that a dense schedule is found in a short window.
_LOOKBACK = (
    dt.timedelta(minutes=1),
    dt.timedelta(hours=1),
    dt.timedelta(days=1),
    dt.timedelta(days=8),
    dt.timedelta(days=367),
)
#: After the lock server failed to answer, a standby tries again this soon.
_STANDBY_RETRY = 1.0


def slot_of(entry: ScheduleEntry, now: dt.datetime) -> dt.datetime:
    """The instant ``entry`` is due for at ``now``, the same in every beat process.

    :param entry: a due schedule entry.
    :param now: the current time, timezone-aware.
    :returns: an aware UTC datetime at or before ``now``.
    """
    schedule = entry.schedule
    if isinstance(schedule, interval_schedule):
        period = schedule.run_every.total_seconds()
        return dt.datetime.fromtimestamp(math.floor(now.timestamp() / period) * period, _UTC)
    for window in _LOOKBACK:
        instant = _next_due_after(schedule, now - window)
        if instant is not None and instant <= now:
            while True:  # the window may hold several: take the last one
                following = _next_due_after(schedule, instant)
                if following is None or following > now:
                    return instant.astimezone(_UTC)
                instant = following
    # Nothing within a year (or a schedule that cannot tell): the instant it is due for
    # counting from its own last run, which beats sharing a schedule store agree on.
    return (_next_due_after(schedule, entry.last_run_at) or now).astimezone(_UTC)


def _next_due_after(schedule: Any, instant: dt.datetime) -> dt.datetime | None:
    """The first instant after ``instant`` at which ``schedule`` is due (None: unknown)."""
    try:
        remaining: dt.timedelta = schedule.remaining_estimate(instant)
    except NotImplementedError:  # a custom schedule with is_due() only
        return None
    # remaining_estimate() counts from the schedule's own clock: add it back.
    now: dt.datetime = schedule.maybe_make_aware(schedule.now())
    return now + remaining


class SingletonSchedulerMixin(_SchedulerBase):  # type: ignore[misc,valid-type]
    """Gives any ``celery.beat.Scheduler`` subclass one leader and slot claims.

    Put it first among the bases, or use :func:`singleton_scheduler`::

        class SingletonDatabaseScheduler(SingletonSchedulerMixin, DatabaseScheduler):
            pass

    Settings: ``singleton_lock_beat_ttl`` (leader lease seconds: a standby takes over at
    most this long after the leader died), ``singleton_lock_beat_name`` (beats with the
    same name elect one leader; default: the app's main name) and
    ``singleton_lock_beat_slot_grace``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Ours before the base's: a non-lazy base sets up its schedule in __init__.
        app = kwargs["app"] if "app" in kwargs else args[0]
        settings = settings_for(app)
        self._lock_backend: LockBackend = settings.backend("beat")
        self._group = resource_name(settings.beat_name or app.main or "celery")
        self._leader_key = f"leader:{self._group}"
        self._leader_ttl = settings.beat_ttl
        self._slot_grace = settings.beat_slot_grace
        self._owner = Owner.here()
        self._leader: HeldLock | None = None
        self._refused: Refused | None = None
        self._reserved_slots: dict[str, dt.datetime] = {}
        super().__init__(*args, **kwargs)

    # -- leadership ----------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while this beat holds a leader lease it can prove (it may emit)."""
        held = self._leader
        if held is None:
            return False
        if not held.lost:
            return True
        logger.warning(
            "beat: lost the leadership of %r (%s); emitting nothing until elected again",
            self._group, held.lost_reason,
        )
        self._leader = self._refused = None
        held.release_quietly()
        return False

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Emit what is due when leading; otherwise wait to be elected.

        A standby blocks here until the server wakes it (the leader released or its lease
        ran out), for at most ``max_interval``, so beat's own loop still turns.
        """
        if self.is_leader:
            interval: float = super().tick(*args, **kwargs)
            return interval
        try:
            if self._refused is None:
                outcome: HeldLock | Refused | None = self._lock_backend.attempt(
                    self._leader_key, self._leader_ttl, owner=self._owner
                )
            else:
                outcome = self._lock_backend.wait(
                    self._leader_key, self._leader_ttl, timeout=self.max_interval,
                    owner=self._owner, refused=self._refused,
                )
        except LockError as exc:
            logger.warning("beat: cannot reach the lock server (%s); standing by", exc)
            self._refused = None
            return min(_STANDBY_RETRY, float(self.max_interval))
        if isinstance(outcome, HeldLock):
            self._leader, self._refused = outcome, None
            logger.info(
                "beat: elected leader of %r (fencing token %s); emitting",
                self._group, outcome.fencing_token,
            )
        elif isinstance(outcome, Refused):
            if self._refused is None:
                logger.info("beat: another beat leads %r; standing by", self._group)
            self._refused = outcome
        else:  # the wait timed out: look again, so a lease that expired meanwhile is seen
            self._refused = None
        return 0.0

    def close(self) -> None:
        """Hand the leadership over (a standby is woken at once), then close the base."""
        held, self._leader = self._leader, None
        if held is not None:
            held.release_quietly()
            logger.info("beat: released the leadership of %r", self._group)
        super().close()

    # -- slots ---------------------------------------------------------------------------

    def reserve(self, entry: ScheduleEntry) -> ScheduleEntry:
        """Celery's reserve; an interval entry's next run counts from its slot, not now.

        Counting from the moment of sending would let every run start a little later than
        the one before (the time a tick takes), until one slot is skipped.
        """
        slot = slot_of(entry, entry.default_now())
        self._reserved_slots[entry.name] = slot
        new_entry = super().reserve(entry)
        if isinstance(new_entry.schedule, interval_schedule):
            new_entry.last_run_at = slot.astimezone(new_entry.last_run_at.tzinfo or _UTC)
        return new_entry

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        """Publish ``entry`` if this beat leads and wins the claim of its slot."""
        slot = self._reserved_slots.pop(entry.name, None) or slot_of(entry, entry.default_now())
        if not self.is_leader:
            return
        slot_name = f"{entry.name}@{slot.isoformat()}"
        task_id = entry.options.get("task_id") or uuid()
        claim = self._claim(entry, slot, task_id)
        if claim is None:
            logger.info("beat: slot %s was already emitted; not publishing it", slot_name)
            return
        if not self.is_leader:  # lost while claiming: let the new leader emit this slot
            claim.release_quietly()
            return
        stamped = copy.copy(entry)
        headers = {**(entry.options.get("headers") or {}), SLOT_HEADER: slot_name}
        stamped.options = {**entry.options, "task_id": task_id, "headers": headers}
        super().apply_entry(stamped, producer=producer)

    def _claim(self, entry: ScheduleEntry, slot: dt.datetime, task_id: str) -> HeldLock | None:
        """Claim ``slot`` of ``entry``: the claim if it is newer than the one stored."""
        key = f"slot:{self._group}:{resource_name(entry.name)}"
        stamp = round(slot.timestamp() * 1000)
        next_slot = _next_due_after(entry.schedule, slot)
        until_next = (next_slot - entry.default_now()).total_seconds() if next_slot else 0.0
        ttl = max(until_next, 0.0) + self._slot_grace
        owner = Owner.of_message(f"{stamp}/{task_id}")
        for _ in range(3):  # each turn replaces one older claim; racing beats may interleave
            try:
                outcome = self._lock_backend.attempt(key, ttl, owner=owner)
                if isinstance(outcome, HeldLock):
                    LeaseKeeper.for_process().untrack(outcome)  # it expires by itself
                    return outcome
                stored = _claimed_stamp(outcome.holder_task_id)
                if stored is None or stored >= stamp:
                    return None
                self._lock_backend.release_owned(key, Owner.of_message(outcome.holder_task_id or ""))
            except LockError as exc:
                logger.error("beat: cannot claim a slot of %r (%s); not publishing it", entry.name, exc)
                return None
        return None


def _claimed_stamp(holder: str | None) -> int | None:
    """The slot (ms since the epoch) a claim's owner task id names; None if unreadable."""
    stamp, _, _ = (holder or "").partition("/")
    return int(stamp) if stamp.isdigit() else None


class SingletonScheduler(SingletonSchedulerMixin, Scheduler):  # type: ignore[misc]
    """Celery's in-memory scheduler with one leader and slot claims.

    No schedule file: slot claims on the lock server replace what a file would keep (a
    restarted beat does not emit a slot that was emitted before), and several beats on
    one host need no file each.
    """


def singleton_scheduler(base: type[Any]) -> type[Any]:
    """Return ``base`` (a ``celery.beat.Scheduler`` subclass) with one leader and slot claims.

    ::

        from django_celery_beat.schedulers import DatabaseScheduler
        SingletonDatabaseScheduler = singleton_scheduler(DatabaseScheduler)
        # celery -A proj beat -S proj.beat:SingletonDatabaseScheduler

    The class is named ``Singleton<Base>``; give it a module-level name so ``-S`` finds it.
    """
    if not (isinstance(base, type) and issubclass(base, Scheduler)):
        msg = f"singleton_scheduler() needs a celery.beat.Scheduler subclass, got {base!r}"
        raise TypeError(msg)
    return type(
        f"Singleton{base.__name__}",
        (SingletonSchedulerMixin, base),
        {"__doc__": f"{base.__name__} with one leader among many beats and slot claims."},
    )
