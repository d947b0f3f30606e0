"""An in-process lock backend: for unit tests and ``task_always_eager``.

``memory://`` locks exclude threads of one process only. Backends created with the same
URL share one store, so ``connect("memory://")`` twice gives two views of the same locks.
It passes the same contract tests as the Redis backend; it proves nothing about servers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from celery_singleton_lock.backends.base import SLOT_MARK, Granted, LockBackend, LockInfo, Refused
from celery_singleton_lock.backends.owner import Owner

__all__ = ["MemoryBackend"]


@dataclass
class _Entry:
    token: str
    owner: Owner
    expires_at: float
    fence: int = 0
    granted_at: float = 0.0  # Unix time
    slot: int | None = None
    limit: int = 1


@dataclass
class _Store:
    guard: threading.Condition = field(default_factory=threading.Condition)
    entries: dict[str, _Entry] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)


class MemoryBackend(LockBackend):
    """Locks in a dict of this process, woken by a condition variable."""

    schemes = ("memory",)
    _stores: ClassVar[dict[str, _Store]] = {}
    _stores_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        url: str = "memory://",
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        shared: bool = False,
    ) -> None:
        super().__init__(url, prefix=prefix, connect_timeout=connect_timeout, clock=clock)
        if shared:
            with self._stores_guard:
                self._store = self._stores.setdefault(url, _Store())
        else:
            self._store = _Store()

    @classmethod
    def from_url(cls, url: str | Sequence[str], **options: Any) -> LockBackend:
        # Through connect(), every backend of one memory:// URL in a process is one store,
        # as every client of one server would be.
        options.setdefault("shared", True)
        return super().from_url(url, **options)

    def _live(self, key: str) -> _Entry | None:
        entry = self._store.entries.get(key)
        if entry is not None and self.clock() >= entry.expires_at:
            del self._store.entries[key]
            return None
        return entry

    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        with self._store.guard:
            holder = self._live(key)
            if holder is not None:
                return Refused(holder.expires_at - self.clock(), holder.owner.task_id or None)
            fence = self._store.fences.get(key, 0) + 1
            self._store.fences[key] = fence
            self._store.entries[key] = _Entry(token, owner, self.clock() + ttl, fence, time.time())
            return Granted(fence)

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused:
        with self._store.guard:
            free: int | None = None
            soonest: _Entry | None = None
            for slot in range(limit):
                holder = self._live(self.slot_key(key, slot))
                if holder is None:
                    free = slot if free is None else free
                    continue
                if owner.task_id and holder.owner.task_id == owner.task_id:
                    # A redelivered copy of a run that holds a slot: never a second one.
                    return Refused(holder.expires_at - self.clock(), holder.owner.task_id)
                if soonest is None or holder.expires_at < soonest.expires_at:
                    soonest = holder
            if free is None:
                assert soonest is not None
                return Refused(soonest.expires_at - self.clock(), soonest.owner.task_id or None)
            # One counter per key, whatever the slot: tokens rise across all of them.
            fence = self._store.fences.get(key, 0) + 1
            self._store.fences[key] = fence
            record = _Entry(token, owner, self.clock() + ttl, fence, time.time(), free, limit)
            self._store.entries[self.slot_key(key, free)] = record
            return Granted(fence, slot=free)

    def _wait_for_release(self, key: str, timeout: float) -> None:
        # Woken by the release of any record: the base tries again, bounded by the
        # soonest expiry it was told.
        with self._store.guard:
            self._store.guard.wait(timeout=timeout)

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        with self._store.guard:
            results = []
            for key, token, ttl in items:
                entry = self._live(key)
                ours = entry is not None and entry.token == token
                if ours and entry is not None:
                    entry.expires_at = self.clock() + ttl
                results.append(ours)
            return results

    def _release(self, key: str, field: str, value: str) -> bool:
        with self._store.guard:
            entry = self._live(key)
            if entry is None:
                return False
            if (entry.token if field == "token" else entry.owner.as_json()) != value:
                return False
            del self._store.entries[key]
            self._store.guard.notify_all()
            return True

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        start = f"{self.prefix}:"
        with self._store.guard:
            if key is None:
                keys = [k for k in self._store.entries if k.startswith(start)]
            else:
                record = self._full_key(key)
                keys = [k for k in self._store.entries if k == record or k.startswith(record + SLOT_MARK)]
            live = [(k, entry) for k in keys if (entry := self._live(k)) is not None]
            now = self.clock()
        return [
            LockInfo(
                key=k[len(start):].partition(SLOT_MARK)[0], owner=entry.owner, token=entry.token,
                fencing_token=entry.fence, ttl=entry.expires_at - now,
                held_since=entry.granted_at, slot=entry.slot, limit=entry.limit,
                location=f"{self.url} {k}",
            )
            for k, entry in live
        ]

    @classmethod
    def reset(cls, url: str = "memory://") -> None:
        """Empty the shared store of ``url``: no lock is held any more.

        Between tests: a waiter is woken and finds the lock free; a holder's next renewal
        finds its lease gone (``lock_lost``). Fencing tokens go on rising, as on a server.
        """
        with cls._stores_guard:
            store = cls._stores.get(url)
        if store is None:
            return
        with store.guard:
            store.entries.clear()
            store.guard.notify_all()

    def expire_now(self, key: str) -> None:
        """Drop ``key`` as if its lease had expired (tests of loss)."""
        with self._store.guard:
            self._store.entries.pop(self._full_key(key), None)
            self._store.guard.notify_all()
