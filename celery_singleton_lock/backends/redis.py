"""One Redis server: ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs.

Keys (the hash tag keeps a lock, its counter and its signal list in one cluster slot)::

    {prefix:key}          "<token>\n<owner JSON: host, pid, task_id>"; its TTL is the lease
    {prefix:key}:fence    the last fencing token; it lives one lock TTL after each grant
    {prefix:key}:signal   release announcements; waiters block on it with BLPOP

Every operation is one round trip: acquire, release and the renewal of any number of
locks are each one script call. Waiters cost the server nothing while they block, and
each release wakes one waiter (Redis serves blocked BLPOP clients first come, first served).

Fencing tokens: each grant's token is ``max(last token + 1, server clock in microseconds)``
(TIME). The clock is the floor that keeps tokens going up where the counter is gone or
behind: a restart without persistence, an evicted or expired counter, a replica promoted
after it missed writes. What can still break it, exactly: a clock stepped backwards by more
than the time since the key's last grant, once that grant's counter has expired (a counter
still there is counted on from, whatever the clock says); or a failover or restart onto a
server whose clock is behind the old server's by more than the time since the last token.

Footprint: nothing outlives a lock for long. After a release, the counter stays until one
TTL after its grant and the signal list for ``SIGNAL_LIFETIME_MS``; then the key has left
nothing behind. Measured on Redis 7.0 (``INFO memory`` ``used_memory`` over 10,000 distinct
keys of 90 characters, each acquired and released once, TTL 10 s): about 390 bytes per key
right after the release, 260 once the signal lists expired, and 0 once the TTL had passed.
The 7-day counters of earlier versions kept about 220 bytes per key for a week.
"""

from __future__ import annotations

import copy
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from celery_singleton_lock.backends.base import Granted, LockBackend, LockInfo, NodeStatus, Refused
from celery_singleton_lock.backends.owner import Owner, split_stored, stored_task_id
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, LockError, mask_url

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.commands.core import Script
    from redis.exceptions import NoScriptError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the Redis backend needs redis-py: pip install 'celery-singleton-lock[redis]'"
    raise ConfigurationError(msg, option="singleton_lock_backend") from exc

__all__ = ["Line", "RedisBackend", "ScriptCall", "SignalWait", "milliseconds", "wait_for_first_signal"]

logger = logging.getLogger("celery_singleton_lock.release")

# redis-py >= 6 tells an exhausted pool apart from a server that does not answer.
_POOL_EXHAUSTED: tuple[type[Exception], ...] = tuple(
    e for e in [getattr(redis.exceptions, "MaxConnectionsError", None)] if e is not None
)
#: Why a connection could not even be opened: nothing was sent.
_NOT_SENT = (ConnectionRefusedError, FileNotFoundError, socket.gaierror)

#: Seconds a release announcement waits in the signal list for a waiter that is
#: between its refused attempt and its BLPOP. Without a waiter it simply expires.
SIGNAL_LIFETIME_MS = 1_000
#: The longest one BLPOP blocks, in seconds. A longer wait (``timeout=inf``, a holder with
#: a huge TTL) is a loop of them, the lock tried after each: one round trip a minute.
MAX_BLOCK = 60.0
#: A release of an acquisition whose outcome is unknown is retried after these pauses
#: (doubling) until the server answers it or the lock's TTL has freed it anyway.
LATE_RELEASE_PAUSE = (0.05, 1.0)


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
    # ARGV[1] value: token, a newline, owner JSON; ARGV[2] ttl ms (the counter's lifetime too);
    # ARGV[3] '1': the clock is the floor of every token, '0': only where the counter is gone
    # returns {1, fencing token} when granted; {0, holder's PTTL ms, holder's value}
    LUA_ACQUIRE = """
    if not redis.call('set', KEYS[1], ARGV[1], 'nx', 'px', ARGV[2]) then
      return {0, redis.call('pttl', KEYS[1]), redis.call('get', KEYS[1])}
    end
    local last = tonumber(redis.call('get', KEYS[2]) or '0')
    local fence = last + 1
    if ARGV[3] == '1' or last == 0 then
      -- never below the clock in microseconds: where the counter is gone or behind (a
      -- restart, its expiry, a promoted replica that missed writes), the clock is still
      -- above every token given before
      local now = redis.call('time')
      fence = math.max(fence, now[1] * 1000000 + now[2])
    end
    redis.call('set', KEYS[2], string.format('%.0f', fence), 'px', ARGV[2])
    return {1, fence}
    """

    # KEYS[i] locks
    # ARGV[2i-1] token of KEYS[i], ARGV[2i] its ttl ms
    # returns one 1 (TTL replaced, never added to) or 0 (not ours any more) per key;
    # ours: the stored value's text before its first newline equals the token exactly
    LUA_RENEW = """
    local ours = {}
    for i, key in ipairs(KEYS) do
      local value = redis.call('get', key)
      local cut = value and string.find(value, '\\n', 1, true)
      if cut and string.sub(value, 1, cut - 1) == ARGV[2 * i - 1] then
        redis.call('pexpire', key, ARGV[2 * i])
        ours[i] = 1
      else
        ours[i] = 0
      end
    end
    return ours
    """

    # KEYS[1] lock, KEYS[2] signal list
    # ARGV[1] what to compare: 'token' (the text before the value's first newline) or
    # 'owner' (the owner JSON after it); ARGV[2] its expected value, compared exactly;
    # ARGV[3] signal lifetime ms
    # returns 1 when deleted (and one waiter is woken), 0 when not ours
    LUA_RELEASE = """
    local value = redis.call('get', KEYS[1])
    local cut = value and string.find(value, '\\n', 1, true)
    if not cut then
      return 0
    end
    local stored
    if ARGV[1] == 'token' then
      stored = string.sub(value, 1, cut - 1)
    else
      stored = string.sub(value, cut + 1)
    end
    if stored ~= ARGV[2] then
      return 0
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
        self.check_url(url, option="singleton_lock_backend")
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": connect_timeout,
            # One attempt per call: our own deadline logic decides what a failure means,
            # and a hidden retry would stretch the connect-timeout bound.
            "retry": Retry(NoBackoff(), 0),
            **client_options,
        }
        try:
            self._client = redis.Redis.from_pool(self._connection_pool(url, dict(options)))
            # Waiters block a connection each; they get a pool of their own, unbounded,
            # so a crowd of waiters can never starve the releases that would wake them.
            self._waits = redis.Redis.from_pool(
                self._connection_pool(url, {**options, "max_connections": 2**31})
            )
        except ValueError as exc:
            msg = f"bad Redis URL {self.url}: {exc}"
            raise ConfigurationError(msg, option="singleton_lock_backend") from None
        self.db = self._client.connection_pool.connection_kwargs.get("db") or 0
        if isinstance(self.db, bool) or not isinstance(self.db, int) or self.db < 0:
            msg = f"singleton_lock_backend: the database of {self.url} must be 0 or more, got {self.db!r}"
            raise ConfigurationError(msg, option="singleton_lock_backend")
        self._register_scripts()
        self.late_releases = _LateReleases(self, clock)

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        """Refuse, before any connection, a Redis URL whose port or database cannot work.

        redis-py takes ``redis://h/abc`` for database 0 and fails on ``redis://h/-1`` only at
        the first command; a database index above the server's ``databases`` is only known to
        the server (the first command then raises ConfigurationError).

        :raises ConfigurationError: naming ``option``, the password masked.
        """
        if not isinstance(url, str):
            super().check_url(url, option=option)
            return
        parts = urlsplit(url)
        shown = mask_url(url)
        try:
            parts.port  # noqa: B018 - the property validates the port
        except ValueError as exc:
            msg = f"{option}: bad port in {shown!r}: {exc}"
            raise ConfigurationError(msg, option=option) from None
        databases = [value for name, value in parse_qsl(parts.query) if name == "db"]
        if parts.scheme.lower() in ("redis", "rediss") and parts.path.strip("/"):
            databases.append(unquote(parts.path).strip("/"))
        for db in databases:
            if not (db.isascii() and db.isdigit()):
                msg = f"{option}: the database in {shown!r} must be a number (0, 1, 2...), got {db!r}"
                raise ConfigurationError(msg, option=option)

    def _connection_pool(self, url: str, options: dict[str, Any]) -> redis.ConnectionPool:
        """The pool through which every connection to this backend's server is made:
        the seam where the Sentinel backend (backends/sentinel.py) puts a pool whose
        connections go to the master the Sentinels name."""
        return redis.ConnectionPool.from_url(url, **options)

    def _register_scripts(self) -> None:
        self._acquire_script = self._client.register_script(self.LUA_ACQUIRE)
        self._renew_script = self._client.register_script(self.LUA_RENEW)
        self._release_script = self._client.register_script(self.LUA_RELEASE)

    def for_native_thread(self) -> RedisBackend:
        """A copy whose calls go through a connection pool of its own, for the lease
        keeper's OS thread in a gevent worker: a gevent socket works only in the thread
        that created it, so that thread must never take a connection from the pool the
        task greenlets use (nor leave one of its own there). See lease.ForNativeThread."""
        clone = copy.copy(self)
        pool = self._client.connection_pool
        clone._client = redis.Redis(
            connection_pool=type(pool)(connection_class=pool.connection_class, **pool.connection_kwargs)
        )
        clone._waits = clone._client
        clone._register_scripts()
        return clone

    @contextmanager
    def _answering(self, key: str | None = None) -> Iterator[None]:
        """Turn "the server did not answer" into LockBackendUnavailable, URL masked."""
        try:
            yield
        except redis.RedisError as exc:
            error = self._meaning(exc, key)
            if error is None:
                raise
            raise error from None

    def _meaning(self, exc: redis.RedisError, key: str | None) -> LockError | None:
        """What a redis-py error means to a caller: LockBackendUnavailable (the server
        did not answer, refused us, or the pool is exhausted), ConfigurationError (no
        such database), or None (a reply error the caller's command earned)."""
        if isinstance(exc, _POOL_EXHAUSTED):
            msg = f"the connection pool for {self.url} is exhausted ({exc}); raise max_connections"
            return LockBackendUnavailable(msg, url=self.url, key=key)
        if isinstance(exc, redis.TimeoutError):
            msg = f"Redis at {self.url} did not answer within {self.connect_timeout}s: {exc}"
            return LockBackendUnavailable(msg, url=self.url, key=key)
        if isinstance(exc, redis.ConnectionError):
            if isinstance(exc.__context__, ConnectionRefusedError):
                msg = f"Redis at {self.url} refused the connection (is it running?): {exc}"
            else:
                msg = f"cannot reach Redis at {self.url}: {exc}"
            return LockBackendUnavailable(msg, url=self.url, key=key)
        if isinstance(exc, redis.ResponseError):
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                msg = f"Redis at {self.url} refused our credentials: {exc}"
                return LockBackendUnavailable(msg, url=self.url, key=key)
            if "DB index is out of range" in str(exc):
                msg = (
                    f"singleton_lock_backend: Redis at {self.url} has no database {self.db} "
                    f"({exc}); use one below its 'databases' setting"
                )
                return ConfigurationError(msg, option="singleton_lock_backend")
        return None

    def _hashed(self, key: str) -> str:
        return "{" + key + "}"

    # Each operation is a script call built by ``*_call`` and a reply read by ``*_reply``:
    # the hooks below run one call on this server, and the Redlock backend sends the same
    # calls to many servers at once (backends/redlock.py), so the scripts exist only here.

    def acquire_call(
        self, key: str, token: str, ttl: float, owner: Owner, *, clock_floor: bool = True
    ) -> ScriptCall:
        """The script call that tries to take ``key`` (fully prefixed) for ``ttl`` seconds.

        :param clock_floor: no token below the server's clock, even when the counter is
            there (False: only when it is gone; Redlock's masters then count in step).
        """
        return ScriptCall(
            self._acquire_script, [self._hashed(key), self.fence_key(key)],
            [owner.stored_with(token), milliseconds(ttl), int(clock_floor)], key,
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
            args += [token, milliseconds(ttl)]
        return ScriptCall(self._renew_script, [self._hashed(k) for k, _, _ in items], args, None)

    @staticmethod
    def renew_reply(reply: Any) -> list[bool]:
        return [flag == 1 for flag in reply]

    def release_call(self, key: str, field: str, value: str) -> ScriptCall:
        """The script call that deletes ``key`` if its ``field`` ("token" or "owner")
        equals ``value`` exactly, waking one waiter."""
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


    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        call = self.acquire_call(key, token, ttl, owner)
        with self._answering(key):
            try:
                reply = call.script(keys=call.keys, args=call.args)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # The script may have gone out and run (or run later, on a paused server)
                # although we never saw the reply: that lock would stand unheld for a TTL.
                if not isinstance(exc, _POOL_EXHAUSTED) and not isinstance(exc.__context__, _NOT_SENT):
                    self.late_releases.add(key, token, ttl)
                raise
        return self.acquire_reply(reply)

    def _wait_for_release(self, key: str, timeout: float) -> None:
        with self.signal_wait(key, timeout) as wait:
            wait.wait()

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        return self.renew_reply(self.run(self.renew_call(items)))

    def _release(self, key: str, field: str, value: str) -> bool:
        return self.release_reply(self.run(self.release_call(key, field, value)))

    def close(self) -> None:
        self.late_releases.stop()
        self._client.close()
        self._waits.close()

    # -- for operators (celery locks) ------------------------------------------------------

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """SCAN for ``{prefix:*}`` (a fencing counter or a signal list ends in ``:fence`` or
        ``:signal``, a lock in ``}``), then each lock's value, PTTL and counter in one
        MULTI, so the three belong to one holder."""
        start = f"{self.prefix}:"
        with self._answering(key):
            if key is not None:
                names = [self._hashed(self._full_key(key))]
            else:
                pattern = "{" + _glob_escaped(start) + "*}"
                names = sorted({
                    name.decode() if isinstance(name, bytes) else name
                    for name in self._client.scan_iter(match=pattern, count=1000)
                })
            found: list[LockInfo] = []
            for name in names:
                with self._client.pipeline(transaction=True) as pipe:
                    pipe.get(name)
                    pipe.pttl(name)
                    pipe.get(name + ":fence")
                    value, pttl, fence = pipe.execute()
                if value is None or pttl is None or pttl < 0:
                    continue  # released or expired since the scan
                token, owner = split_stored(value)
                fencing_token = None if fence is None else int(fence)
                found.append(LockInfo(
                    key=name[len(start) + 1:-1], owner=owner, token=token,
                    fencing_token=fencing_token, ttl=pttl / 1000,
                    held_since=_granted_at(fencing_token), location=f"{self.url} {name}",
                ))
        return found

    def _ping(self) -> list[NodeStatus]:
        """TIME, twice (the first may connect): the round trip of the second, and the
        server's clock against ours."""
        try:
            with self._answering(None):
                for _ in range(2):
                    sent = time.time()
                    started = time.perf_counter()
                    seconds, micros = self._client.time()
                    round_trip = time.perf_counter() - started
        except LockError as exc:
            return [NodeStatus(self.url, None, error=str(exc))]
        offset = seconds + micros / 1e6 - (sent + round_trip / 2)
        return [NodeStatus(self.url, round_trip, clock_offset=offset)]

    # -- the pieces the Redlock backend is built of (backends/redlock.py) ------------------

    def run(self, call: ScriptCall) -> Any:
        """Run ``call`` on this server; its reply.

        :raises LockBackendUnavailable: the server did not answer within ``connect_timeout``.
        """
        with self._answering(call.key):
            return call.script(keys=call.keys, args=call.args)

    def script(self, lua: str) -> Script:
        """A script of the caller's own, for :class:`ScriptCall` (Redlock's fence raise)."""
        return self._client.register_script(lua)

    def line(self) -> Line:
        """A connection to this server outside the pool, for writing requests to many
        servers before reading any reply; see :class:`Line`."""
        return Line(self)

    def signal_wait(self, key: str, timeout: float) -> SignalWait:
        """Start waiting for the next release announcement of ``key`` (fully prefixed),
        for at most ``timeout`` seconds (``MAX_BLOCK`` at most); see :class:`SignalWait`.

        :raises LockBackendUnavailable: the wait could not be started.
        """
        return SignalWait(self, key, timeout)


class Line:
    """A connection to one Redis server of the caller's own, outside the backend's pool.

    For a caller that writes a request to many servers before reading any reply (the
    Redlock backend): :meth:`send` only writes, :meth:`receive` reads the reply by
    ``connect_timeout`` after that send. One request at a time; not thread-safe.
    Errors come as :class:`LockBackendUnavailable` with this server's message ("refused
    the connection", "did not answer within ..."), the connection then closed.
    """

    __slots__ = ("_connection", "_due", "_node")

    def __init__(self, node: RedisBackend) -> None:
        pool = node._client.connection_pool
        self._node = node
        self._connection = pool.connection_class(**pool.connection_kwargs)
        self._due = 0.0

    def pack(self, call: ScriptCall) -> Any:
        """``call`` as a request for :meth:`send`: the same for every server with the
        same scripts, so a caller packs it once."""
        return self._connection.pack_command(
            "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
        )

    def send(self, request: Any, key: str | None) -> None:
        """Write ``request`` (from :meth:`pack`), connecting first if need be.

        :raises LockBackendUnavailable: it was not sent, so the server cannot apply it.
        """
        try:
            self._connection.send_packed_command(request, check_health=False)
        except redis.RedisError as exc:
            raise self._failed(exc, key) from None
        self._due = time.monotonic() + self._node.connect_timeout

    def receive(self, call: ScriptCall) -> Any:
        """The reply to ``call``, sent by :meth:`send`, read by ``connect_timeout`` after
        the send. A server restarted empty has forgotten the script: it is loaded and
        run again.

        :raises LockBackendUnavailable: no reply; the server may have applied it.
        """
        connection = self._connection
        try:
            try:
                return connection.read_response(timeout=max(self._due - time.monotonic(), 0.001))
            except NoScriptError:
                connection.send_command("SCRIPT", "LOAD", call.script.script)
                connection.read_response()
                connection.send_command(
                    "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
                )
                return connection.read_response()
        except redis.RedisError as exc:
            raise self._failed(exc, call.key) from None

    def close(self) -> None:
        """Close the connection (a later :meth:`send` opens a new one)."""
        self._connection.disconnect()

    def _failed(self, exc: redis.RedisError, key: str | None) -> LockError:
        """The error to raise for ``exc``, the connection closed: any reply we cannot
        use counts as no reply (ConfigurationError aside: no such database)."""
        self.close()
        error = self._node._meaning(exc, key)
        return LockBackendUnavailable(str(exc), url=self._node.url, key=key) if error is None else error


class SignalWait:
    """A BLPOP sent on one server for the next release announcement of one key.

    Made by :meth:`RedisBackend.signal_wait`; :meth:`wait` blocks on it alone,
    :func:`wait_for_first_signal` on many at once. :meth:`close` (or the end of a
    ``with`` block) gives its connection back: an announcement that came is read, so it
    is not lost; a BLPOP still pending is dropped with its connection.

    Redis checks blocking timeouts only about every 100 ms, so a wait is timed here,
    not by the server; the caller tries to acquire after every wait, so a release
    announced just as the wait ends is not lost.

    :ivar timeout: how long the wait lasts, in seconds (``MAX_BLOCK`` at most).
    """

    __slots__ = ("_connection", "_node", "_pending", "_pool", "key", "timeout")

    def __init__(self, node: RedisBackend, key: str, timeout: float) -> None:
        self._node = node
        self.key = key
        self.timeout = min(timeout, MAX_BLOCK)
        # Waiters block a connection each: they come from the unbounded pool of waits.
        self._pool = node._waits.connection_pool
        with node._answering(key):
            self._connection = self._pool.get_connection()
            try:
                self._connection.send_command(  # type: ignore[no-untyped-call]
                    "BLPOP", node.signal_key(key), f"{self.timeout + 1:.3f}"
                )
            except BaseException:
                self._pool.release(self._connection)
                raise
        self._pending = True

    def wait(self) -> bool:
        """Block until the announcement comes (True) or ``timeout`` passes (False).

        :raises LockBackendUnavailable: the server failed while we waited.
        """
        connection = self._connection
        try:
            with self._node._answering(self.key):
                if not connection.can_read(timeout=self.timeout):
                    return False
                self._pending = False
                connection.read_response(timeout=self._node.connect_timeout)
        except BaseException:
            self._pending = False  # nothing left to read: close must not touch the socket
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise
        return True

    def close(self) -> None:
        """Read the announcement if it came, else drop the pending BLPOP; give the
        connection back to the pool. Never raises for the server's sake."""
        connection = self._connection
        try:
            if self._pending:
                self._pending = False
                if connection.can_read(timeout=0):
                    connection.read_response(timeout=self._node.connect_timeout)
                else:
                    connection.disconnect()  # type: ignore[no-untyped-call]
        except redis.RedisError:
            connection.disconnect()  # type: ignore[no-untyped-call]
        finally:
            self._pool.release(connection)

    def __enter__(self) -> SignalWait:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def wait_for_first_signal(waits: Sequence[SignalWait]) -> None:
    """Block until any of ``waits`` has its announcement, or the shortest of their
    timeouts passes. Their announcements are read when they are closed."""
    with selectors.DefaultSelector() as selector:
        for wait in waits:
            sock = wait._connection._sock  # redis-py has no public accessor for it
            if sock is not None:
                selector.register(sock, selectors.EVENT_READ)
        selector.select(min((wait.timeout for wait in waits), default=0))


class _LateReleases:
    """Releases, by token, of acquisitions whose outcome is unknown.

    An acquire whose reply never came (a socket timeout, a dropped connection) may have
    been applied by the server, or be applied later (a paused server runs the script when
    it resumes): that lock would stand unheld for a whole TTL. A thread of its own,
    started on demand and gone when nothing is pending, releases each such token on a
    fresh connection until the server answers, or until the TTL has freed the lock
    anyway. Releasing by token deletes that acquisition only, so a release for an attempt
    the server never applied does nothing.
    """

    def __init__(self, node: RedisBackend, clock: Callable[[], float]) -> None:
        self._node = node
        self._clock = clock
        self._pending: dict[tuple[str, str], float] = {}  # (full key, token) -> give up at
        self._guard = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, key: str, token: str, ttl: float) -> None:
        """Release ``token``'s acquisition of ``key`` (fully prefixed) as soon as possible."""
        with self._guard:
            if self._pid != os.getpid():  # a forked child: the parent's thread is not here
                self._pending, self._thread, self._pid = {}, None, os.getpid()
            self._pending[(key, token)] = self._clock() + ttl
            if self._thread is None and not self._stopped.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="singleton-lock-late-release", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Give up the pending releases (their TTL frees them) and end the thread."""
        self._stopped.set()

    def _run(self) -> None:
        pause = LATE_RELEASE_PAUSE[0]
        while True:
            with self._guard:
                now = self._clock()
                self._pending = {item: end for item, end in self._pending.items() if end > now}
                if not self._pending or self._stopped.is_set():
                    self._thread = None
                    return
                due = list(self._pending)
            for key, token in due:
                try:
                    deleted = self._node.release_reply(
                        self._node.run(self._node.release_call(key, "token", token))
                    )
                except Exception:  # best effort, never a dead thread: the TTL frees it anyway
                    logger.debug("late release of %r failed; trying again", key, exc_info=True)
                    continue
                with self._guard:
                    self._pending.pop((key, token), None)
                if deleted:
                    logger.debug("released %r, taken by an attempt whose reply was lost", key)
            if self._stopped.wait(pause):
                continue
            pause = min(pause * 2, LATE_RELEASE_PAUSE[1])


def _glob_escaped(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _granted_at(fencing_token: int | None) -> float | None:
    """When a lock was granted, read from its fencing token: on one Redis a grant's token
    is the server's clock in microseconds (unless the last token was higher, which only
    a clock stepped back makes happen). None for a token that is not a time."""
    if fencing_token is None or not 10**15 < fencing_token < 10**17:
        return None
    return fencing_token / 1e6


def milliseconds(seconds: float) -> int:
    """``seconds`` as the whole milliseconds of a PX or PEXPIRE argument (1 at least)."""
    return max(1, round(seconds * 1000))
