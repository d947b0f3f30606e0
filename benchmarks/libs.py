"""One adapter per lock library, all used the way each library documents.

Every adapter offers the same three steps, so the scenarios treat them alike:

``try_acquire(key, ttl)``               one non-blocking attempt: a handle or None
``acquire_blocking(key, ttl, timeout)`` the library's own way of waiting: a handle or None
``release(handle)``                     True when the lock was still ours

Every peer talks to the server through ``redis.Redis.from_url(url)`` with redis-py's
default options (celery-once builds exactly that client from the URL itself);
celery-singleton-lock gets the same URL through its ``connect``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import redis

#: Display names, in table order.
LABELS = {
    "raw": "raw redis-py (SET NX PX + DEL)",
    "ours": "celery-singleton-lock",
    "redis-py": "redis-py Lock",
    "python-redis-lock": "python-redis-lock",
    "pottery": "pottery Redlock (1 master)",
    "celery-once": "celery-once Redis backend",
    "ours-redlock": "celery-singleton-lock Redlock (3 masters)",
    "pottery-redlock": "pottery Redlock (3 masters)",
}

#: How each library waits for a held lock (the "wait" column).
WAIT_STYLE = {
    "raw": "n/a (no blocking mode)",
    "ours": "BLPOP on a per-key signal list, bounded by holder TTL",
    "redis-py": "polls SET NX every 0.1 s (its default sleep)",
    "python-redis-lock": "BLPOP on a per-key signal list, bounded by expire",
    "pottery": "polls, random sleep 0-0.2 s (its retry delay)",
    "celery-once": "none of its own: we loop raise_or_lock with a 10 ms sleep",
    "ours-redlock": "BLPOP on every master at once, bounded by holder TTL",
    "pottery-redlock": "polls, random sleep 0-0.2 s (its retry delay)",
}

CELERY_ONCE_POLL_S = 0.010


class Unavailable(RuntimeError):
    """The library cannot be imported or set up in this environment."""


class RawLoop:
    """The floor: ``SET key token NX PX`` then ``DEL key``; two round trips, no safety."""

    name = "raw"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def try_acquire(self, key: str, ttl: float) -> str | None:
        token = os.urandom(16).hex()
        if self.client.set(key, token, nx=True, px=int(ttl * 1000)):
            return key
        return None

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> str | None:
        raise NotImplementedError("the raw loop has no blocking mode")

    def release(self, handle: str) -> bool:
        return bool(self.client.delete(handle))

    def redis_key(self, key: str) -> str:
        return key

    def close(self) -> None:
        self.client.close()


class Ours:
    """celery-singleton-lock: ``connect(url)``, ``acquire``/``release``."""

    name = "ours"

    def __init__(self, url: str) -> None:
        try:
            from celery_singleton_lock import connect
        except ImportError as exc:
            raise Unavailable(f"celery_singleton_lock is not importable: {exc}") from exc
        self.backend = connect(url)

    def try_acquire(self, key: str, ttl: float) -> Any:
        return self.backend.acquire(key, ttl=ttl, blocking=False)

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> Any:
        return self.backend.acquire(key, ttl=ttl, blocking=True, timeout=timeout)

    def release(self, handle: Any) -> bool:
        return bool(self.backend.release(handle))

    def redis_key(self, key: str) -> str | None:
        return None  # found on the server (see scenario_crash.find_lock_key)

    def close(self) -> None:
        self.backend.close()


class RedisPyLock:
    """redis-py's ``client.lock(name, timeout=ttl)``: SET NX PX, release by Lua script."""

    name = "redis-py"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def try_acquire(self, key: str, ttl: float) -> Any:
        lock = self.client.lock(key, timeout=ttl)
        return lock if lock.acquire(blocking=False) else None

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> Any:
        lock = self.client.lock(key, timeout=ttl, blocking_timeout=timeout)
        return lock if lock.acquire(blocking=True) else None

    def release(self, handle: Any) -> bool:
        handle.release()  # raises when the lock was no longer ours
        return True

    def redis_key(self, key: str) -> str:
        return key

    def close(self) -> None:
        self.client.close()


class PythonRedisLock:
    """python-redis-lock: ``redis_lock.Lock(client, name, expire=ttl)``.

    Its expire is whole seconds; ``auto_renewal=True`` (one thread per lock) is used
    where a scenario needs the lock kept alive (crash, renewal), not for throughput.
    """

    name = "python-redis-lock"

    def __init__(self, url: str) -> None:
        try:
            import redis_lock
        except ImportError as exc:
            raise Unavailable(f"python-redis-lock is not installed: {exc}") from exc
        self.mod = redis_lock
        self.client = redis.Redis.from_url(url)

    def make(self, key: str, ttl: float, *, auto_renewal: bool = False) -> Any:
        return self.mod.Lock(self.client, key, expire=max(1, round(ttl)), auto_renewal=auto_renewal)

    def try_acquire(self, key: str, ttl: float, *, auto_renewal: bool = False) -> Any:
        lock = self.make(key, ttl, auto_renewal=auto_renewal)
        return lock if lock.acquire(blocking=False) else None

    def acquire_blocking(
        self, key: str, ttl: float, timeout: float | None, *, auto_renewal: bool = False
    ) -> Any:
        lock = self.make(key, ttl, auto_renewal=auto_renewal)
        if timeout is not None:
            # whole seconds, at least 1; without auto-renewal it may not exceed expire
            timeout = max(1, math.ceil(timeout))
            if not auto_renewal:
                timeout = min(timeout, max(1, round(ttl)))
        return lock if lock.acquire(blocking=True, timeout=timeout) else None

    def release(self, handle: Any) -> bool:
        handle.release()  # raises when the lock was no longer ours
        return True

    def redis_key(self, key: str) -> str:
        return "lock:" + key

    def close(self) -> None:
        self.client.close()


class PotteryRedlock:
    """pottery ``Redlock(key=..., masters={client}, auto_release_time=ttl)``, one master."""

    name = "pottery"

    def __init__(self, url: str) -> None:
        try:
            from pottery import Redlock
        except ImportError as exc:
            raise Unavailable(f"pottery is not installed: {exc}") from exc
        self.cls = Redlock
        self.client = redis.Redis.from_url(url)

    def try_acquire(self, key: str, ttl: float) -> Any:
        lock = self.cls(key=key, masters={self.client}, auto_release_time=ttl)
        return lock if lock.acquire(blocking=False) else None

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> Any:
        lock = self.cls(key=key, masters={self.client}, auto_release_time=ttl)
        return lock if lock.acquire(blocking=True, timeout=timeout) else None

    def release(self, handle: Any) -> bool:
        handle.release()  # raises when the lock was no longer ours
        return True

    def redis_key(self, key: str) -> str:
        return "redlock:" + key

    def close(self) -> None:
        self.client.close()


class OursRedlock(Ours):
    """celery-singleton-lock on several masters: ``connect("redlock://h1,h2,h3/0")``."""

    name = "ours-redlock"


class PotteryRedlockMasters(PotteryRedlock):
    """pottery ``Redlock`` over the masters of a ``redlock://`` URL, one client each."""

    name = "pottery-redlock"

    def __init__(self, url: str) -> None:
        try:
            from pottery import Redlock
        except ImportError as exc:
            raise Unavailable(f"pottery is not installed: {exc}") from exc
        from celery_singleton_lock.backends.redlock import node_urls

        self.cls = Redlock
        self.clients = [redis.Redis.from_url(u) for u in node_urls(url)]

    def try_acquire(self, key: str, ttl: float) -> Any:
        lock = self.cls(key=key, masters=set(self.clients), auto_release_time=ttl)
        return lock if lock.acquire(blocking=False) else None

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> Any:
        lock = self.cls(key=key, masters=set(self.clients), auto_release_time=ttl)
        return lock if lock.acquire(blocking=True, timeout=timeout) else None

    def close(self) -> None:
        for client in self.clients:
            client.close()


class CeleryOnce:
    """celery-once's ``backends.Redis``: ``raise_or_lock(key, timeout)`` / ``clear_lock``.

    It has no blocking wait: :meth:`acquire_blocking` loops on ``raise_or_lock`` with a
    10 ms sleep. It caches one client per process, built from the first URL it sees.
    """

    name = "celery-once"

    def __init__(self, url: str) -> None:
        try:
            from celery_once import AlreadyQueued
            from celery_once.backends import Redis as OnceRedis
        except ImportError as exc:
            raise Unavailable(f"celery_once is not installed: {exc}") from exc
        self.already = AlreadyQueued
        self.backend = OnceRedis({"url": url, "default_timeout": 60})

    def try_acquire(self, key: str, ttl: float) -> str | None:
        try:
            self.backend.raise_or_lock(key, timeout=ttl)
        except self.already:
            return None
        return key

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            handle = self.try_acquire(key, ttl)
            if handle is not None or time.monotonic() >= deadline:
                return handle
            time.sleep(CELERY_ONCE_POLL_S)

    def release(self, handle: str) -> bool:
        return bool(self.backend.clear_lock(handle))

    def redis_key(self, key: str) -> str:
        return key

    def close(self) -> None:
        pass  # the client is celery-once's module-level singleton


ADAPTERS: dict[str, type] = {
    "raw": RawLoop,
    "ours": Ours,
    "redis-py": RedisPyLock,
    "python-redis-lock": PythonRedisLock,
    "pottery": PotteryRedlock,
    "celery-once": CeleryOnce,
    "ours-redlock": OursRedlock,
    "pottery-redlock": PotteryRedlockMasters,
}


def make_adapter(lib: str, url: str) -> Any:
    return ADAPTERS[lib](url)


def available(libs: list[str], url: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Adapters for the libraries that can be set up here, and why the others cannot."""
    ok: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for lib in libs:
        try:
            ok[lib] = make_adapter(lib, url)
        except Unavailable as exc:
            missing[lib] = str(exc)
    return ok, missing
