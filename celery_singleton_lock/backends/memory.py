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

from celery_singleton_lock.backends.base import Granted, LockBackend, LockInfo, Refused
from celery_singleton_lock.backends.owner import Owner

__all__ = ["MemoryBackend"]


@dataclass
class _Entry:
    token: str
    owner: Owner
    expires_at: float
    fence: int = 0
    granted_at: float = 0.0  # Unix time


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

    def _wait_for_release(self, key: str, timeout: float) -> None:
        with self._store.guard:
            self._store.guard.wait_for(lambda: self._live(key) is None, timeout=timeout)

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
            keys = [self._full_key(key)] if key is not None else [
                k for k in self._store.entries if k.startswith(start)
            ]
            live = [(k, entry) for k in keys if (entry := self._live(k)) is not None]
            now = self.clock()
        return [
            LockInfo(
                key=k[len(start):], owner=entry.owner, token=entry.token,
                fencing_token=entry.fence, ttl=entry.expires_at - now,
                held_since=entry.granted_at, location=f"{self.url} {k}",
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
