"""One Redis server: ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs.

Keys (the hash tag keeps a lock, its counter and its signal list in one cluster slot)::

    {prefix:key}          "<token>\n<owner JSON: host, pid, task_id>"; its TTL is the lease
    {prefix:key}:fence    fencing counter, seeded from the server clock in microseconds
    {prefix:key}:signal   release announcements; waiters block on it with BLPOP

Every operation is one round trip: acquire, release and the renewal of any number of
locks are each one script call. Waiters cost the server nothing while they block, and
each release wakes one waiter (Redis serves blocked BLPOP clients first come, first served).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery_singleton_lock.backends.base import Granted, LockBackend, Refused
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable
from celery_singleton_lock.lease import Owner, stored_task_id

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.commands.core import Script
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the Redis backend needs redis-py: pip install 'celery-singleton-lock[redis]'"
    raise ConfigurationError(msg, option="singleton_lock_backend") from exc

__all__ = ["RedisBackend", "ScriptCall"]

# redis-py >= 6 tells an exhausted pool apart from a server that does not answer.
_POOL_EXHAUSTED: tuple[type[Exception], ...] = tuple(
    e for e in [getattr(redis.exceptions, "MaxConnectionsError", None)] if e is not None
)

#: Seconds a release announcement waits in the signal list for a waiter that is
#: between its refused attempt and its BLPOP. Without a waiter it simply expires.
SIGNAL_LIFETIME_MS = 1_000
#: The fencing counter outlives idle periods by this much; when it is gone, the next
#: acquisition reseeds it from the server clock, so tokens still only go up.
FENCE_LIFETIME_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class ScriptCall:
    """One call of one of :class:`RedisBackend`'s scripts, not sent yet.

    :ivar key: the lock concerned, for error messages (None for a batch).
    """

    script: Script
    keys: list[str]
    args: list[Any]
    key: str | None


class RedisBackend(LockBackend):
    """Locks on one Redis server; see the module docstring for the keys it uses.

    :param client_options: passed to :meth:`redis.Redis.from_url` (TLS files,
        ``username``/``password``, ``ssl_cert_reqs``...); URL query parameters work too.
    """

    schemes = ("redis", "rediss", "unix")

    # KEYS[1] lock, KEYS[2] fencing counter
    # ARGV[1] value: token, a newline, owner JSON; ARGV[2] ttl ms; ARGV[3] counter lifetime ms
    # returns {1, fencing token} when granted; {0, holder's PTTL ms, holder's value}
    LUA_ACQUIRE = """
    if not redis.call('set', KEYS[1], ARGV[1], 'nx', 'px', ARGV[2]) then
      return {0, redis.call('pttl', KEYS[1]), redis.call('get', KEYS[1])}
    end
    local fence = redis.call('incr', KEYS[2])
    if fence == 1 then
      -- the counter did not exist (first use, expired, evicted, restart): restart it from
      -- the server clock in microseconds, above every token it can have given before
      local now = redis.call('time')
      redis.call('set', KEYS[2], now[1] .. string.format('%06d', tonumber(now[2])), 'px', ARGV[3])
      fence = redis.call('incr', KEYS[2])
    end
    return {1, fence}
    """

    # KEYS[i] locks
    # ARGV[2i-1] token of KEYS[i], ARGV[2i] its ttl ms
    # returns one 1 (TTL replaced, never added to) or 0 (not ours any more) per key
    LUA_RENEW = """
    local ours = {}
    for i, key in ipairs(KEYS) do
      local token = ARGV[2 * i - 1]
      local value = redis.call('get', key)
      if value and string.sub(value, 1, #token) == token then
        redis.call('pexpire', key, ARGV[2 * i])
        ours[i] = 1
      else
        ours[i] = 0
      end
    end
    return ours
    """

    # KEYS[1] lock, KEYS[2] signal list
    # ARGV[1] what to compare: 'token' or 'task_id'; ARGV[2] its expected value;
    # ARGV[3] signal lifetime ms
    # returns 1 when deleted (and one waiter is woken), 0 when not ours
    LUA_RELEASE = """
    local value = redis.call('get', KEYS[1])
    if not value then
      return 0
    end
    if ARGV[1] == 'token' then
      if string.sub(value, 1, #ARGV[2]) ~= ARGV[2] then
        return 0
      end
    else
      local owner = cjson.decode(string.sub(value, string.find(value, '\\n', 1, true) + 1))
      if owner['task_id'] ~= ARGV[2] then
        return 0
      end
    end
    redis.call('del', KEYS[1])
    if redis.call('lpush', KEYS[2], 1) > 1 then
      redis.call('ltrim', KEYS[2], 0, 0)
    end
    redis.call('pexpire', KEYS[2], ARGV[3])
    return 1
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        **client_options: Any,
    ) -> None:
        super().__init__(url, prefix=prefix, connect_timeout=connect_timeout, clock=clock)
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": connect_timeout,
            # One attempt per call: our own deadline logic decides what a failure means,
            # and a hidden retry would stretch the connect-timeout bound.
            "retry": Retry(NoBackoff(), 0),
            **client_options,
        }
        try:
            self._client = redis.Redis.from_url(url, **options)
            # Waiters block a connection each; they get a pool of their own, unbounded,
            # so a crowd of waiters can never starve the releases that would wake them.
            self._waits = redis.Redis.from_url(url, **{**options, "max_connections": 2**31})
        except ValueError as exc:
            msg = f"bad Redis URL {self.url}: {exc}"
            raise ConfigurationError(msg, option="singleton_lock_backend") from None
        self._acquire_script = self._client.register_script(self.LUA_ACQUIRE)
        self._renew_script = self._client.register_script(self.LUA_RENEW)
        self._release_script = self._client.register_script(self.LUA_RELEASE)

    @contextmanager
    def _answering(self, key: str | None = None) -> Iterator[None]:
        """Turn "the server did not answer" into LockBackendUnavailable, URL masked."""
        try:
            yield
        except _POOL_EXHAUSTED as exc:
            msg = f"the connection pool for {self.url} is exhausted ({exc}); raise max_connections"
            raise LockBackendUnavailable(msg, url=self.url, key=key) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            msg = f"Redis at {self.url} did not answer within {self.connect_timeout}s: {exc}"
            raise LockBackendUnavailable(msg, url=self.url, key=key) from None
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                msg = f"Redis at {self.url} refused our credentials: {exc}"
                raise LockBackendUnavailable(msg, url=self.url, key=key) from None
            raise

    def _hashed(self, key: str) -> str:
        return "{" + key + "}"

    # Each operation is a script call built by ``*_call`` and a reply read by ``*_reply``:
    # the hooks below run one call on this server, and the Redlock backend sends the same
    # calls to many servers at once (backends/redlock.py), so the scripts exist only here.

    def acquire_call(self, key: str, token: str, ttl: float, owner: Owner) -> ScriptCall:
        """The script call that tries to take ``key`` (fully prefixed) for ``ttl`` seconds."""
        return ScriptCall(
            self._acquire_script, [self._hashed(key), self.fence_key(key)],
            [owner.stored_with(token), _ms(ttl), FENCE_LIFETIME_MS], key,
        )

    @staticmethod
    def acquire_reply(reply: Any) -> Granted | Refused:
        if reply[0] == 1:
            return Granted(int(reply[1]))
        return Refused(max(int(reply[1]), 1) / 1000, stored_task_id(reply[2]))

    def renew_call(self, items: Sequence[tuple[str, str, float]]) -> ScriptCall:
        """The script call that replaces the TTL of every (key, token, ttl) still ours."""
        args: list[Any] = []
        for _, token, ttl in items:
            args += [token, _ms(ttl)]
        return ScriptCall(self._renew_script, [self._hashed(k) for k, _, _ in items], args, None)

    @staticmethod
    def renew_reply(reply: Any) -> list[bool]:
        return [flag == 1 for flag in reply]

    def release_call(self, key: str, field: str, value: str) -> ScriptCall:
        """The script call that deletes ``key`` if its ``field`` matches, waking one waiter."""
        lock = self._hashed(key)
        return ScriptCall(
            self._release_script, [lock, lock + ":signal"], [field, value, SIGNAL_LIFETIME_MS], key
        )

    @staticmethod
    def release_reply(reply: Any) -> bool:
        return bool(reply == 1)

    def fence_key(self, key: str) -> str:
        """The fencing counter of ``key`` (fully prefixed)."""
        return self._hashed(key) + ":fence"

    def signal_key(self, key: str) -> str:
        """The list a release of ``key`` (fully prefixed) pushes one announcement onto."""
        return self._hashed(key) + ":signal"

    def _run(self, call: ScriptCall) -> Any:
        with self._answering(call.key):
            return call.script(keys=call.keys, args=call.args)

    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        return self.acquire_reply(self._run(self.acquire_call(key, token, ttl, owner)))

    def _wait_for_release(self, key: str, timeout: float) -> None:
        # BLPOP on a connection of the shared pool. Redis checks blocking timeouts only
        # about every 100 ms, so the wait is timed here: when the socket has nothing by
        # then, the connection (with its pending BLPOP) is dropped. The caller tries to
        # acquire after every wait, so a release announced in that instant is not lost.
        signal = self.signal_key(key)
        pool = self._waits.connection_pool
        with self._answering(key):
            connection = pool.get_connection()
            try:
                connection.send_command(  # type: ignore[no-untyped-call]
                    "BLPOP", signal, f"{timeout + 1:.3f}"
                )
                if connection.can_read(timeout=timeout):
                    connection.read_response(timeout=self.connect_timeout)
                else:
                    connection.disconnect()  # type: ignore[no-untyped-call]
            finally:
                pool.release(connection)

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        return self.renew_reply(self._run(self.renew_call(items)))

    def _release(self, key: str, field: str, value: str) -> bool:
        return self.release_reply(self._run(self.release_call(key, field, value)))

    def close(self) -> None:
        self._client.close()
        self._waits.close()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
