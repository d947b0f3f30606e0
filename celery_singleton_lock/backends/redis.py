"""One Redis server: ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs.

Keys (the hash tag keeps a lock, its slots and its signal list in one cluster slot)::

    {prefix:key}          "<token>:<fencing token>\n<owner JSON: host, pid, task_id>",
                          then one space once a waiter was refused; its TTL is the lease
    {prefix:key}<SLOT_MARK>n  slot n > 0 of a semaphore (slot 0 is {prefix:key}):
                          "<token>:<fencing token>:<limit>\n<owner JSON>", as a lock's
    {prefix:key}:signal   release announcements; waiters block on it with BLPOP
    {prefix:key}:fence    Redlock only: the last count, one lock TTL after a grant

Every operation is one round trip and one script call: acquire, release and the renewal
of any number of locks. An uncontended acquire+release is 6 server commands (EVALSHA,
SET, TIME; EVALSHA, GET, DEL); a release pushes an announcement (LPUSH, PEXPIRE) only when
a waiter marked the lock, so nothing is written for waiters that do not exist.

The hot path: each request goes out pre-packed on a connection of the backend's own
(:class:`Lane`, one per concurrent caller, kept in a free list) and its reply is read by a
small reader of the few reply shapes our scripts return. redis-py only opens those
connections (TLS, AUTH, SELECT, client name): :meth:`RedisBackend.open_connection` is the
one place that decides where a connection goes, the seam for Sentinel and Cluster.

Fencing tokens: the server's clock in microseconds (TIME) read in the same script that
grants the lock. Two grants of one key are at least a client round trip apart (the
release of the first is sent after its reply arrived, or it expired a TTL later), so
tokens strictly increase, and nothing has to be stored for that: no counter to lose, so
a restart without persistence, an eviction or a promoted replica that missed writes
cannot make them repeat. What can break it, exactly: the server's clock stepped back by
more than the time between two grants of a key, or a failover onto a server whose clock
is behind the old server's by more than that.

Waiting and fairness: a waiter refused by the holder marks the lock (the trailing space),
then blocks with BLPOP; the holder's release sees the mark and pushes one announcement,
which Redis hands to the longest-blocked waiter (first come, first served). A waiter that
was woken takes the lock marked (others may still wait). The releasing process does not
take the lock straight back: when its release woke a waiter, its next blocking acquire of
that key queues behind the waiters first (``POLITE_WAIT`` at most) instead of racing the
one it woke. Non-blocking attempts are never queued: one may still take a free lock first.

Semaphores (``limit`` N > 1): one script call (``LUA_ACQUIRE_SLOT``) reads the N slot
records with MGET and takes the lowest free one, refuses a task id that holds a slot
already (a redelivered copy), or reports the soonest expiry; a waiter marks every slot
held, and a release of a marked slot pushes one announcement on the key's one signal
list (kept to N entries), so one waiter is woken per freed slot. Tokens stay the server's
clock, strictly increasing across all slots with nothing stored: see the script's
comment. An uncontended slot is 1 round trip each way, as a lock is; slot 0's release is
the lock's. ``limit=1`` runs the exclusive scripts, unchanged.

Footprint: a lock leaves nothing behind once released (a signal list lives at most
``SIGNAL_LIFETIME_MS``, and only where a waiter was); see benchmarks scenario (m).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from hashlib import sha1
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

from celery_singleton_lock.backends.base import (
    SLOT_MARK,
    Granted,
    LockBackend,
    LockInfo,
    NodeStatus,
    Refused,
)
from celery_singleton_lock.backends.owner import Owner, split_stored, stored_task_id
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, LockError, mask_url
from celery_singleton_lock.lease import clock_drift

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the Redis backend needs redis-py: pip install 'celery-singleton-lock[redis]'"
    raise ConfigurationError(msg, option="singleton_lock_backend") from exc

try:  # the optional C reply parser: pip install 'celery-singleton-lock[hiredis]'
    import hiredis
except ImportError:  # pragma: no cover - depends on the environment
    hiredis = None

__all__ = [
    "Lane", "Line", "RedisBackend", "Script", "ScriptCall", "SignalWait", "milliseconds",
    "wait_for_first_signal",
]

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
#: After a release that woke a waiter, this process's next blocking acquire of that key
#: (within ``POLITE_WINDOW`` seconds) first waits in line this long at most, so the woken
#: waiter gets the lock; if it never takes it (it died, or gave up), we try after that.
POLITE_WAIT = 0.1
POLITE_WINDOW = 1.0
#: Idle connections kept per backend; more concurrent callers open and close their own.
MAX_IDLE_LANES = 64
#: A connection idle this long is checked (one poll, no round trip) before it is used:
#: the server may have closed it (a restart, its ``timeout`` setting).
CHECK_IDLE_AFTER = 1.0

_GRANTED_MARK = b" "
_SLOT_MARK = SLOT_MARK.encode()


class Script:
    """A Lua script: its text, SHA1 and the pre-packed start of its EVALSHA requests."""

    __slots__ = ("_heads", "sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = sha1(text.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA1
        self._heads: dict[tuple[int, int], bytes] = {}

    def head(self, keys: int, args: int) -> bytes:
        """``*N $7 EVALSHA $40 <sha> $k <keys>`` for that many keys and arguments."""
        found = self._heads.get((keys, args))
        if found is None:
            count = b"%d" % keys
            found = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%s\r\n" % (
                3 + keys + args, self.sha.encode(), len(count), count,
            )
            self._heads[(keys, args)] = found
        return found

    def pack(self, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
        """The EVALSHA request with ``keys`` and ``args`` (str, bytes or int)."""
        parts = [self.head(len(keys), len(args))]
        for value in (*keys, *args):
            data = _as_bytes(value)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def pack_eval(self, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
        """The same call as EVAL with the script's text (which also caches it)."""
        return _pack_command(["EVAL", self.text, len(keys), *keys, *args])


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    return str(value).encode()


def _pack_command(words: Iterable[Any]) -> bytes:
    parts = []
    for word in words:
        data = _as_bytes(word)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"*%d\r\n" % len(parts) + b"".join(parts)


@dataclass(frozen=True)
class ScriptCall:
    """One call of one of :class:`RedisBackend`'s scripts, not sent yet.

    :ivar key: the lock concerned, for error messages (None for a batch).
    """

    script: Script
    keys: list[str]
    args: list[Any]
    key: str | None

    def pack(self) -> bytes:
        return self.script.pack(self.keys, self.args)


class ReplyError(Exception):
    """An error reply (``-ERR ...``) from the server, as its text."""


class _Incomplete(Exception):
    """The buffer does not hold a whole reply yet."""


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2/RESP3 reply at ``pos``: (value, position after it). Errors are returned
    as :class:`ReplyError`; raises :class:`_Incomplete` if the buffer ends first."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 58:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 36 or kind == 61:  # '$' bulk string, '=' verbatim (RESP3)  # noqa: PLR1714
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[end + 2 : stop], stop + 2
    if kind in (42, 126, 62):  # '*' array, '~' set, '>' push (RESP3)
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 43:  # '+' status
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # '-' error
        return ReplyError(buf[pos + 1 : end].decode(errors="replace")), end + 2
    if kind == 95:  # '_' null (RESP3)
        return None, end + 2
    if kind == 35:  # '#' boolean (RESP3)
        return buf[pos + 1 : end] == b"t", end + 2
    if kind == 44:  # ',' double (RESP3)
        return float(buf[pos + 1 : end]), end + 2
    msg = f"unexpected reply from Redis: {buf[pos : pos + 40]!r}"
    raise ReplyError(msg)


class _LaneClosedError(OSError):
    """The server closed the connection (EOF)."""


# A forked child must never use its parent's sockets: every lane list is tied to the
# generation of the process that filled it (bumped in each child, no syscall per call).
_generation = [0]


def _bump_generation() -> None:
    _generation[0] += 1


os.register_at_fork(after_in_child=_bump_generation)


class Lane:
    """A connection to one Redis server of the caller's own, outside redis-py's pool.

    Requests go out pre-packed (:meth:`Script.pack`) with one ``sendall``; a reply is
    read by :func:`_parse` (or hiredis's reader when installed). One request at a time;
    a lane is used by one caller at once (a backend keeps idle ones in a free list).
    Errors are the socket's own (``OSError``, ``TimeoutError``); the caller closes the
    lane after any of them, since a reply may still be on its way.
    """

    __slots__ = ("_buffer", "_connection", "_reader", "sock", "used_at")

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.sock: socket.socket = connection._sock  # redis-py has no public accessor for it
        self._buffer = b""
        self._reader = None if hiredis is None else hiredis.Reader(replyError=ReplyError)
        self.used_at = time.monotonic()

    def send(self, request: bytes) -> None:
        self.sock.sendall(request)

    def read(self) -> Any:
        """One reply, waiting at most the socket's timeout for each piece of it."""
        reader = self._reader
        if reader is not None:
            reply = reader.gets()
            while reply is False:
                chunk = self.sock.recv(16384)
                if not chunk:
                    raise _LaneClosedError("Connection closed by server")
                reader.feed(chunk)
                reply = reader.gets()
            return reply
        buf = self._buffer
        while True:
            if buf:
                try:
                    reply, pos = _parse(buf, 0)
                except _Incomplete:
                    pass
                else:
                    self._buffer = buf[pos:]
                    return reply
            chunk = self.sock.recv(16384)
            if not chunk:
                raise _LaneClosedError("Connection closed by server")
            buf = buf + chunk if buf else chunk
            self._buffer = buf

    def has_data(self) -> bool:
        """Bytes of a reply already read into this process (no need to wait for them)."""
        if self._reader is not None:
            return bool(self._reader.has_data())
        return bool(self._buffer) or (hasattr(self.sock, "pending") and self.sock.pending() > 0)

    def readable(self, timeout: float) -> bool:
        """True once a reply (or EOF) can be read, within ``timeout`` seconds."""
        if self.has_data():
            return True
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            return bool(selector.select(timeout))

    def read_within(self, timeout: float) -> Any:
        """:meth:`read` with every piece due within ``timeout`` seconds."""
        sock = self.sock
        before = sock.gettimeout()
        sock.settimeout(max(timeout, 0.001))
        try:
            return self.read()
        finally:
            sock.settimeout(before)

    def close(self) -> None:
        self._connection.disconnect()


class RedisBackend(LockBackend):
    """Locks on one Redis server; see the module docstring for the keys it uses.

    :param client_options: passed to :meth:`redis.Redis.from_url` (TLS files,
        ``username``/``password``, ``ssl_cert_reqs``...); URL query parameters work too.
    """

    schemes = ("redis", "rediss", "unix")

    # KEYS[1] lock
    # ARGV[1] token; ARGV[2] a newline and the owner JSON (and a space: a woken waiter's
    # grant); ARGV[3] ttl ms; ARGV[4] '1': the caller waits if refused, so mark the lock
    # stores "<token>:<fencing token>\n<owner JSON>"
    # returns the fencing token (the server's clock in microseconds) when granted;
    # {holder's PTTL ms, holder's value} when refused
    LUA_ACQUIRE = """
    local now = redis.call('time')
    local fence = now[1] * 1000000 + now[2]
    local value = ARGV[1] .. string.format(':%.0f', fence) .. ARGV[2]
    if redis.call('set', KEYS[1], value, 'nx', 'px', ARGV[3]) then
      return fence
    end
    value = redis.call('get', KEYS[1])
    if ARGV[4] == '1' and value and string.byte(value, -1) ~= 32 then
      redis.call('append', KEYS[1], ' ')
    end
    return {redis.call('pttl', KEYS[1]), value}
    """

    # As LUA_ACQUIRE, for Redlock's masters, which must count in step: KEYS[2] is the
    # fencing counter, which lives one lock TTL after each grant; the token is the last
    # one plus 1, from the clock in microseconds only where the counter is gone.
    LUA_ACQUIRE_COUNTED = """
    local fence = tonumber(redis.call('get', KEYS[2]) or '0') + 1
    if fence == 1 then
      local now = redis.call('time')
      fence = now[1] * 1000000 + now[2]
    end
    local text = string.format('%.0f', fence)
    if redis.call('set', KEYS[1], ARGV[1] .. ':' .. text .. ARGV[2], 'nx', 'px', ARGV[3]) then
      redis.call('set', KEYS[2], text, 'px', ARGV[3])
      return fence
    end
    local value = redis.call('get', KEYS[1])
    if ARGV[4] == '1' and value and string.byte(value, -1) ~= 32 then
      redis.call('append', KEYS[1], ' ')
    end
    return {redis.call('pttl', KEYS[1]), value}
    """

    # KEYS[i] lock (a semaphore's: each of its slot records)
    # marks each (one space) for a waiter, if it is held and not marked yet
    # returns 1 when any is held, 0 when all are free
    LUA_MARK = """
    local held = 0
    for _, key in ipairs(KEYS) do
      local value = redis.call('get', key)
      if value then
        held = 1
        if string.byte(value, -1) ~= 32 then
          redis.call('append', key, ' ')
        end
      end
    end
    return held
    """

    # KEYS[i] locks
    # ARGV[2i-1] token of KEYS[i], ARGV[2i] its ttl ms
    # returns one 1 (TTL replaced, never added to) or 0 (not ours any more) per key;
    # ours: the stored value starts with the token and a colon (then the fencing token)
    LUA_RENEW = """
    local ours = {}
    for i, key in ipairs(KEYS) do
      local value = redis.call('get', key)
      local token = ARGV[2 * i - 1]
      if value and string.sub(value, 1, #token + 1) == token .. ':' then
        redis.call('pexpire', key, ARGV[2 * i])
        ours[i] = 1
      else
        ours[i] = 0
      end
    end
    return ours
    """

    # KEYS[1] lock, KEYS[2] signal list
    # ARGV[1] what to compare: 'token' (the text before the value's first colon) or
    # 'owner' (the owner JSON after its newline, without a waiter's mark); ARGV[2] its expected
    # value, compared exactly; ARGV[3] signal lifetime ms
    # returns 0 when not ours; 1 when deleted; 2 when deleted and a waiter was woken
    LUA_RELEASE = """
    local value = redis.call('get', KEYS[1])
    if not value then
      return 0
    end
    local marked = string.byte(value, -1) == 32
    if marked then
      value = string.sub(value, 1, -2)
    end
    if ARGV[1] == 'token' then
      if string.sub(value, 1, #ARGV[2] + 1) ~= ARGV[2] .. ':' then
        return 0
      end
    else
      local cut = string.find(value, '\\n', 1, true)
      if not cut or string.sub(value, cut + 1) ~= ARGV[2] then
        return 0
      end
    end
    redis.call('del', KEYS[1])
    if not marked then
      return 1
    end
    -- One announcement per slot that can be free at once (a semaphore's value names
    -- its limit after the fencing token; an exclusive lock's does not: 1).
    local limit = tonumber(string.match(value, '^[^:]*:%d+:(%d+)')) or 1
    if redis.call('lpush', KEYS[2], 1) > limit then
      redis.call('ltrim', KEYS[2], 0, limit - 1)
    end
    redis.call('pexpire', KEYS[2], ARGV[3])
    return 2
    """

    # KEYS[1..n] the slot records of one semaphore (KEYS[1]: the exclusive lock's own,
    # slot 0), KEYS[n+1] Redlock only: the key's fencing counter
    # ARGV[1] token; ARGV[2] ':<limit>', a newline and the owner JSON (and a space: a woken
    # waiter's grant); ARGV[3] ttl ms; ARGV[4] '1': the caller waits if refused, so mark
    # every slot held (refused for its task id: the slot that task holds, whose release
    # is what it waits for); ARGV[5] '"task_id":<the owner's task id as JSON>' ('' for none): a
    # slot held under it refuses us; ARGV[6] n, the limit; ARGV[7] '1': count tokens in
    # KEYS[n+1] (Redlock's masters count in step), else the server's clock
    # stores "<token>:<fencing token>:<limit>\n<owner JSON>" in the lowest free slot
    # returns "<fencing token><slot, 3 digits>" when granted (one bulk string: cheaper to
    # read than an array); {PTTL ms, value} of the slot that our task id holds, else of
    # the slot that expires first, when refused
    #
    # The clock's tokens: the microsecond before the server's clock, so a later grant of
    # any slot of the key (an exclusive one too, which reads only the clock) comes out
    # higher even within this microsecond; and above every token of a slot still held (one
    # of them may have been granted in this same microsecond; a grant released since is a
    # client round trip old). Only that second rule can put a token at or past the clock:
    # then the script returns once the clock has passed it, a microsecond or so (where a
    # clock would not move inside a script, after 100 reads of it).
    LUA_ACQUIRE_SLOT = """
    local n = tonumber(ARGV[6])
    local free, floor, soonest, soonest_value = nil, 0, nil, nil
    local values = redis.call('mget', unpack(KEYS, 1, n))
    for i = 1, n do
      local value = values[i]
      if value then
        if ARGV[5] ~= '' and string.find(value, ARGV[5], 1, true) then
          if ARGV[4] == '1' and string.byte(value, -1) ~= 32 then
            redis.call('append', KEYS[i], ' ')
          end
          return {redis.call('pttl', KEYS[i]), value}
        end
        local fence = tonumber(string.match(value, '^[^:]*:(%d+)')) or 0
        if fence > floor then
          floor = fence
        end
        local pttl = redis.call('pttl', KEYS[i])
        if not soonest or pttl < soonest then
          soonest, soonest_value = pttl, value
        end
      elseif not free then
        free = i
      end
    end
    if not free then
      if ARGV[4] == '1' then
        for i = 1, n do
          if values[i] and string.byte(values[i], -1) ~= 32 then
            redis.call('append', KEYS[i], ' ')
          end
        end
      end
      return {soonest, soonest_value}
    end
    local fence
    if ARGV[7] == '1' then
      fence = tonumber(redis.call('get', KEYS[n + 1]) or '0') + 1
      if fence == 1 then
        local now = redis.call('time')
        fence = now[1] * 1000000 + now[2]
      end
      redis.call('set', KEYS[n + 1], string.format('%.0f', fence), 'px', ARGV[3])
    else
      local now = redis.call('time')
      now = now[1] * 1000000 + now[2]
      fence = math.max(now - 1, floor + 1)
      local spins = 0
      while fence >= now and spins < 100 do
        now = redis.call('time')
        now = now[1] * 1000000 + now[2]
        spins = spins + 1
      end
    end
    local text = string.format('%.0f', fence)
    redis.call('set', KEYS[free], ARGV[1] .. ':' .. text .. ARGV[2], 'px', ARGV[3])
    local slot = free - 1
    return text .. (slot < 10 and '00' or (slot < 100 and '0' or '')) .. slot
    """

    # KEYS[1..n] the slot records of one semaphore, KEYS[n+1] its signal list
    # ARGV as LUA_RELEASE's: the slot whose field matches (at most one) is released
    # returns 0 when none was ours; 1 when deleted; 2 when deleted and a waiter was woken
    LUA_RELEASE_SLOTS = """
    local signal = KEYS[#KEYS]
    for i = 1, #KEYS - 1 do
      local value = redis.call('get', KEYS[i])
      if value then
        local marked = string.byte(value, -1) == 32
        if marked then
          value = string.sub(value, 1, -2)
        end
        local ours
        if ARGV[1] == 'token' then
          ours = string.sub(value, 1, #ARGV[2] + 1) == ARGV[2] .. ':'
        else
          local cut = string.find(value, '\\n', 1, true)
          ours = cut and string.sub(value, cut + 1) == ARGV[2]
        end
        if ours then
          redis.call('del', KEYS[i])
          if not marked then
            return 1
          end
          local limit = tonumber(string.match(value, '^[^:]*:%d+:(%d+)')) or 1
          if redis.call('lpush', signal, 1) > limit then
            redis.call('ltrim', signal, 0, limit - 1)
          end
          redis.call('pexpire', signal, ARGV[3])
          return 2
        end
      end
    end
    return 0
    """

    _acquire_script = Script(LUA_ACQUIRE)
    _acquire_counted_script = Script(LUA_ACQUIRE_COUNTED)
    _renew_script = Script(LUA_RENEW)
    _mark_script = Script(LUA_MARK)
    _release_script = Script(LUA_RELEASE)
    _acquire_slot_script = Script(LUA_ACQUIRE_SLOT)
    _release_slots_script = Script(LUA_RELEASE_SLOTS)

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
        if "{" in prefix or "}" in prefix:
            # The hash tag of every key is "{prefix:key}", and a slot record is told from
            # a lock by its leading brace.
            msg = f"prefix: a Redis key prefix cannot hold braces, got {prefix!r}"
            raise ConfigurationError(msg, option="singleton_lock_prefix")
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
        except ValueError as exc:
            msg = f"bad Redis URL {self.url}: {exc}"
            raise ConfigurationError(msg, option="singleton_lock_backend") from None
        pool = self._client.connection_pool
        try:  # a connection object, never connected: unknown options fail now, not at the first lock
            pool.connection_class(**pool.connection_kwargs)
        except TypeError as exc:
            msg = f"singleton_lock_backend_options: not an option of a Redis connection: {exc}"
            raise ConfigurationError(msg, option="singleton_lock_backend_options") from None
        self.db = pool.connection_kwargs.get("db") or 0
        if isinstance(self.db, bool) or not isinstance(self.db, int) or self.db < 0:
            msg = f"singleton_lock_backend: the database of {self.url} must be 0 or more, got {self.db!r}"
            raise ConfigurationError(msg, option="singleton_lock_backend")
        self._lanes: list[Lane] = []
        self._lanes_generation = _generation[0]
        #: key -> when a release of ours woke a waiter (see POLITE_WAIT)
        self._handed_over: dict[str, float] = {}
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
        """The pool whose connection class and options every connection to this
        backend's server is made with (:meth:`open_connection`): the seam where the
        Sentinel backend (backends/sentinel.py) puts a pool whose connections go to the
        master the Sentinels name."""
        return redis.ConnectionPool.from_url(url, **options)

    def for_native_thread(self) -> RedisBackend:
        """A copy whose calls go through connections of its own, for the lease keeper's
        OS thread in a gevent worker: a gevent socket works only in the thread that
        created it, so that thread must never use a connection the task greenlets use
        (nor leave one of its own to them). See lease.ForNativeThread."""
        clone = copy.copy(self)
        clone._lanes = []
        clone._handed_over = {}
        return clone

    # -- connections --------------------------------------------------------------------

    def open_connection(self) -> Any:
        """A new, connected redis-py connection to the server that takes writes.

        The one place that opens a connection (TLS, AUTH, SELECT, the client name, from
        the URL and ``client_options``), with the class and options of
        :meth:`_connection_pool`'s pool: Sentinel and Cluster support plug in there, and
        every request of this backend then goes where it says.

        :raises redis.RedisError: it could not be opened.
        """
        pool = self._client.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
        connection.connect()
        return connection

    def _take_lane(self, key: str | None) -> Lane:
        """An idle lane, or a new one. :raises LockBackendUnavailable: nothing was sent."""
        if self._lanes_generation != _generation[0]:  # a forked child: not the parent's
            self._lanes, self._lanes_generation = [], _generation[0]
        lanes = self._lanes
        while lanes:
            try:
                lane = lanes.pop()
            except IndexError:  # another thread took the last one
                break
            if time.monotonic() - lane.used_at < CHECK_IDLE_AFTER or not lane.readable(0):
                return lane
            lane.close()  # the server closed it while it was idle (or sent junk)
        try:
            return Lane(self.open_connection())
        except redis.RedisError as exc:
            error = self._meaning(exc, key)
            if error is None:
                raise
            raise error from None

    def _give_back(self, lane: Lane) -> None:
        if len(self._lanes) < MAX_IDLE_LANES and self._lanes_generation == _generation[0]:
            lane.used_at = time.monotonic()
            self._lanes.append(lane)
        else:
            lane.close()

    def _request(
        self,
        request: bytes,
        key: str | None,
        call: Callable[[], ScriptCall],
        unanswered: Callable[[], None] | None = None,
    ) -> Any:
        """Send ``request`` and read its reply: one round trip.

        :param call: the :class:`ScriptCall` that ``request`` packs, made only when a
            server restarted empty has forgotten the script: it is sent again as EVAL.
        :param unanswered: called when the request may have gone out but no reply came.
        :raises LockBackendUnavailable: no usable reply.
        """
        lane = self._take_lane(key)
        try:
            lane.send(request)
            reply = lane.read()
            if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
                again = call()
                lane.send(again.script.pack_eval(again.keys, again.args))
                reply = lane.read()
        except BaseException as exc:
            lane.close()
            if not isinstance(exc, OSError):
                raise
            if unanswered is not None:
                unanswered()
            self._raise_socket_error(exc, key)
        self._give_back(lane)
        if type(reply) is ReplyError:
            raise self._reply_error(reply, key)
        return reply

    def _raise_socket_error(self, exc: OSError, key: str | None) -> NoReturn:
        """Raise the LockBackendUnavailable for a failed socket operation, redis-py's
        error for it as its context (as redis-py's own calls have it: the Sentinel
        backend reads it to tell a lost connection from a server that did not answer)."""
        if isinstance(exc, TimeoutError):
            cause: redis.RedisError = redis.TimeoutError(f"Timeout talking to {self.url}")
        else:
            cause = redis.ConnectionError(f"Error while talking to {self.url}: {exc or type(exc).__name__}")
        try:
            raise cause
        except redis.RedisError:
            error = self._meaning(cause, key)
            if error is None:  # pragma: no cover - a lost connection always has a meaning
                raise
            raise error from None

    def _reply_error(self, reply: ReplyError, key: str | None) -> Exception:
        text = str(reply)
        if text.startswith("READONLY"):
            # A replica, or a master demoted under us: this server takes no writes.
            cause = redis.ConnectionError(f"{self.url} is a read-only replica now: {text}")
            msg = f"cannot write to Redis at {self.url}: {text}"
            error = LockBackendUnavailable(msg, url=self.url, key=key)
            error.__context__ = cause
            return error
        meaning = self._meaning(redis.ResponseError(text), key)
        return redis.ResponseError(text) if meaning is None else meaning

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
        """The Redis key of ``key`` (fully prefixed, or a slot record's key from
        :meth:`slot_key`, which is one already)."""
        return key if key[0] == "{" else "{" + key + "}"

    def slot_key(self, key: str, slot: int | None) -> str:
        """Slot ``slot`` of the semaphore ``key`` (fully prefixed): ``{prefix:key}`` and
        the slot's number after ``SLOT_MARK``, outside the braces, so every slot record
        has the lock's hash tag (one cluster slot, as the signal list); slot 0 is the
        exclusive lock's own record."""
        if not slot:
            return key
        return "{" + key + "}" + SLOT_MARK + str(slot)

    def slot_keys(self, key: str, limit: int) -> list[str]:
        """The Redis keys of the ``limit`` slot records of ``key`` (fully prefixed)."""
        lock = "{" + key + "}"
        return [lock, *(lock + SLOT_MARK + str(slot) for slot in range(1, limit))]

    @staticmethod
    def lock_of(key: str) -> str:
        """The lock (fully prefixed) that ``key`` is a slot record of; ``key`` itself
        when it is a lock."""
        if key[0] != "{":
            return key
        return key[1 : key.rindex("}" + SLOT_MARK)]

    # Each operation is a script call built by ``*_call`` and a reply read by ``*_reply``:
    # the hooks below run one call on this server, and the Redlock backend sends the same
    # calls to many servers at once (backends/redlock.py), so the scripts exist only here.

    def acquire_call(
        self,
        key: str,
        token: str,
        ttl: float,
        owner: Owner,
        *,
        counted: bool = False,
        waiting: bool = False,
        woken: bool = False,
    ) -> ScriptCall:
        """The script call that tries to take ``key`` (fully prefixed) for ``ttl`` seconds.

        :param counted: count tokens in a counter key (Redlock's masters count in step).
        :param waiting: the caller waits if refused: mark the lock, so its release wakes one.
        :param woken: the caller was woken while others may wait: its lock is marked.
        """
        rest = _owner_part(owner)
        if woken:
            rest += " "
        lock = "{" + key + "}"
        args = [token, rest, milliseconds(ttl), "1" if waiting else "0"]
        if counted:
            return ScriptCall(self._acquire_counted_script, [lock, lock + ":fence"], args, key)
        return ScriptCall(self._acquire_script, [lock], args, key)

    @staticmethod
    def acquire_reply(reply: Any) -> Granted | Refused:
        if type(reply) is int:
            return Granted(reply)
        return Refused(max(int(reply[0]), 1) / 1000, stored_task_id(reply[1]))

    def acquire_slot_call(
        self,
        key: str,
        token: str,
        ttl: float,
        owner: Owner,
        limit: int,
        *,
        counted: bool = False,
        waiting: bool = False,
        woken: bool = False,
    ) -> ScriptCall:
        """The script call that tries to take the lowest free of ``limit`` slots of the
        semaphore ``key`` (fully prefixed); the keywords as :meth:`acquire_call`'s."""
        rest = f":{limit}{_owner_part(owner)}"
        if woken:
            rest += " "
        task = _slot_parts(owner, limit)[1].decode()
        keys = self.slot_keys(key, limit)
        if counted:
            keys.append("{" + key + "}:fence")
        args = [token, rest, milliseconds(ttl), "1" if waiting else "0", task, limit, "1" if counted else "0"]
        return ScriptCall(self._acquire_slot_script, keys, args, key)

    @staticmethod
    def acquire_slot_reply(reply: Any) -> Granted | Refused:
        if type(reply) is bytes:
            fence, slot = divmod(int(reply), 1000)
            return Granted(fence, slot=slot)
        return Refused(max(int(reply[0]), 1) / 1000, stored_task_id(reply[1]))

    @staticmethod
    def holder_token(reply: Any) -> bytes | None:
        """The holder's token in a refused acquire's reply (None when granted or gone)."""
        if type(reply) is int or not reply[1]:
            return None
        return bytes(reply[1].split(b"\n", 1)[0].split(b":", 1)[0])

    def mark_call(self, key: str, limit: int = 1) -> ScriptCall:
        """The script call that marks ``key`` (fully prefixed; each of its ``limit``
        slots) for a waiter, where held, so that its release wakes one (Redlock's
        waiters, when the master they marked failed and they move to another)."""
        return ScriptCall(self._mark_script, self.slot_keys(key, limit), [], key)

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
        equals ``value`` exactly, waking one waiter if one marked it."""
        return ScriptCall(
            self._release_script, [self._hashed(key), self.signal_key(key)],
            [field, value, SIGNAL_LIFETIME_MS], key,
        )

    def release_slots_call(self, key: str, limit: int, field: str, value: str) -> ScriptCall:
        """The script call that releases the slot of the semaphore ``key`` (fully
        prefixed) whose ``field`` equals ``value``, among its ``limit`` slots."""
        return ScriptCall(
            self._release_slots_script, [*self.slot_keys(key, limit), self.signal_key(key)],
            [field, value, SIGNAL_LIFETIME_MS], key,
        )

    @staticmethod
    def release_reply(reply: Any) -> bool:
        return reply in (1, 2)

    def fence_key(self, key: str) -> str:
        """The fencing counter of ``key`` (fully prefixed) on a Redlock master."""
        return self._hashed(key) + ":fence"

    def signal_key(self, key: str) -> str:
        """The list a release of ``key`` (fully prefixed, or any slot record of it) pushes
        one announcement onto: one per lock, whatever the slot."""
        return "{" + self.lock_of(key) + "}:signal"

    # -- the hooks ----------------------------------------------------------------------

    def _try_acquire(
        self, key: str, token: str, ttl: float, owner: Owner, *, waiting: bool = False,
        woken: bool = False,
    ) -> Granted | Refused:
        """One attempt (see :meth:`acquire_call` for ``waiting`` and ``woken``)."""
        # acquire_call's request, packed here in one step: this is the hot path.
        lock = ("{" + key + "}").encode()
        rest = (_owner_part(owner) + " " if woken else _owner_part(owner)).encode()
        ttl_ms = b"%d" % milliseconds(ttl)
        request = b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$1\r\n%s\r\n" % (
            _ACQUIRE_HEAD, len(lock), lock, len(token), token.encode(), len(rest), rest,
            len(ttl_ms), ttl_ms, b"1" if waiting else b"0",
        )
        # An attempt whose reply never came may have run (or run later, on a paused
        # server): that lock would stand unheld for a TTL, so it is released by token.
        reply = self._request(
            request, key,
            lambda: self.acquire_call(key, token, ttl, owner, waiting=waiting, woken=woken),
            lambda: self.late_releases.add(key, token, ttl),
        )
        if type(reply) is int:
            return Granted(reply)
        return self.acquire_reply(reply)

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int, *, waiting: bool = False,
        woken: bool = False,
    ) -> Granted | Refused:
        """One attempt at the lowest free of ``limit`` slots, in one script call (see
        ``LUA_ACQUIRE_SLOT``); the keywords as :meth:`_try_acquire`'s."""
        # acquire_slot_call's request, packed here in one step (as _try_acquire's).
        parts = [_slot_request_head(key, limit)]
        rest, task = _slot_parts(owner, limit)
        if woken:
            rest += b" "
        ttl_ms = b"%d" % milliseconds(ttl)
        count = b"%d" % limit
        parts.append(_SLOT_ARGS % (
            len(token), token.encode(), len(rest), rest, len(ttl_ms), ttl_ms,
            b"1" if waiting else b"0", len(task), task, len(count), count,
        ))
        reply = self._request(
            b"".join(parts), key,
            lambda: self.acquire_slot_call(key, token, ttl, owner, limit, waiting=waiting, woken=woken),
            lambda: self.late_releases.add(key, token, ttl, limit),
        )
        if type(reply) is bytes:
            fence, slot = divmod(int(reply), 1000)
            return Granted(fence, slot=slot)
        return self.acquire_slot_reply(reply)

    def _wait_turn(
        self,
        key: str,
        token: str,
        ttl: float,
        owner: Owner,
        deadline: float | None,
        refused: Refused | None = None,
        limit: int = 1,
    ) -> Granted | None:
        handed_over = self._handed_over.pop(key, None)
        polite = handed_over is not None and self.clock() - handed_over < POLITE_WINDOW
        if limit == 1:
            def attempt(woken: bool) -> Granted | Refused:
                return self._try_acquire(key, token, ttl, owner, waiting=True, woken=woken)
        else:
            def attempt(woken: bool) -> Granted | Refused:
                return self._try_acquire_slot(key, token, ttl, owner, limit, waiting=True, woken=woken)
        return wait_in_line(
            attempt,
            lambda timeout: self._block(key, timeout),
            clock=self.clock, ttl=ttl, deadline=deadline, polite=polite,
            unknown_bound=self.connect_timeout,
        )

    def _block(self, key: str, timeout: float) -> bool:
        with self.signal_wait(key, timeout) as wait:
            return wait.wait()

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        return self.renew_reply(self.run(self.renew_call(items)))

    def _release(self, key: str, field: str, value: str) -> bool:
        if key[0] == "{":  # a slot record of a semaphore
            reply = self.run(self.release_call(key, field, value))
            if reply == 2 and field == "token":
                self.note_handover(self.lock_of(key))
            return self.release_reply(reply)
        # release_call's request, packed here in one step: this is the hot path.
        lock = ("{" + key + "}").encode()
        expected = value.encode()
        request = b"%s$%d\r\n%s\r\n$%d\r\n%s:signal\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
            _RELEASE_HEAD, len(lock), lock, len(lock) + 7, lock, len(field), field.encode(),
            len(expected), expected, _SIGNAL_LIFETIME_ARG,
        )
        reply = self._request(request, key, lambda: self.release_call(key, field, value))
        if reply == 2 and field == "token":
            self.note_handover(key)
        return self.release_reply(reply)

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        if limit == 1:
            return self._release(key, "owner", owner_json)
        return self.release_reply(self.run(self.release_slots_call(key, limit, "owner", owner_json)))

    def note_handover(self, key: str) -> None:
        """A release of ours of ``key`` woke a waiter: our next blocking acquire of it
        queues behind the waiters instead of racing the one it woke."""
        handed = self._handed_over
        if len(handed) > 1024:  # keys never acquired again: forget them
            handed.clear()
        handed[key] = self.clock()

    def close(self) -> None:
        self.late_releases.stop()
        lanes, self._lanes = self._lanes, []
        if self._lanes_generation == _generation[0]:
            for lane in lanes:
                lane.close()
        self._client.close()

    # -- for operators (celery locks) ------------------------------------------------------

    @contextmanager
    def _answering(self, key: str | None = None) -> Iterator[None]:
        """Turn "the server did not answer" into LockBackendUnavailable, URL masked (for
        the operators' calls, which go through redis-py)."""
        try:
            yield
        except redis.RedisError as exc:
            error = self._meaning(exc, key)
            if error is None:
                raise
            raise error from None

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """SCAN for ``{prefix:*}`` (a signal list or a Redlock counter ends in ``:signal`` or
        ``:fence``, a lock in ``}``, a semaphore's slot record in ``}`` ``SLOT_MARK`` and its
        number), then each record's value and PTTL in one MULTI, so both belong to one
        holder. The fencing token (and a semaphore's limit) is in the value, after the token."""
        start = f"{self.prefix}:"
        with self._answering(key):
            if key is not None:
                lock = self._hashed(self._full_key(key))
                pattern = _glob_escaped(lock) + SLOT_MARK + "*"
                slots = {_text(n) for n in self._client.scan_iter(match=pattern, count=1000)}
                names = [lock, *sorted(slots)]
            else:
                every = "{" + _glob_escaped(start) + "*}"
                patterns = [every, every + SLOT_MARK + "*"]
                names = sorted({
                    _text(name) for pattern in patterns
                    for name in self._client.scan_iter(match=pattern, count=1000)
                })
            found: list[LockInfo] = []
            for name in names:
                with self._client.pipeline(transaction=True) as pipe:
                    pipe.get(name)
                    pipe.pttl(name)
                    value, pttl = pipe.execute()
                if value is None or pttl is None or pttl < 0:
                    continue  # released or expired since the scan
                tokens, owner = split_stored(value)
                token, _, numbers = tokens.partition(":")
                fence, _, limit_text = numbers.partition(":")
                fencing_token = int(fence) if fence.isdigit() else None
                lock_name, mark, slot_text = name.rpartition("}" + SLOT_MARK)
                if not mark:
                    lock_name = name[:-1]
                limit = int(limit_text.rstrip()) if limit_text.rstrip().isdigit() else 1
                slot = int(slot_text) if mark and slot_text.isdigit() else (0 if limit > 1 else None)
                found.append(LockInfo(
                    key=lock_name[len(start) + 1:], owner=owner, token=token,
                    fencing_token=fencing_token, ttl=pttl / 1000,
                    held_since=_granted_at(fencing_token), slot=slot, limit=limit,
                    location=f"{self.url} {name}",
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
        return self._request(call.pack(), call.key, lambda: call)

    @staticmethod
    def script(lua: str) -> Script:
        """A script of the caller's own, for :class:`ScriptCall` (Redlock's fence raise)."""
        return Script(lua)

    def line(self) -> Line:
        """A connection to this server of the caller's own, for writing requests to many
        servers before reading any reply; see :class:`Line`."""
        return Line(self)

    def signal_wait(self, key: str, timeout: float) -> SignalWait:
        """Start waiting for the next release announcement of ``key`` (fully prefixed),
        for at most ``timeout`` seconds (``MAX_BLOCK`` at most); see :class:`SignalWait`.

        :raises LockBackendUnavailable: the wait could not be started.
        """
        return SignalWait(self, key, timeout)


#: Owner -> its JSON: a worker's few owners are serialised once, not on every acquire.
_OWNER_JSON: dict[Owner, str] = {}


def _owner_part(owner: Owner) -> str:
    """A newline and the owner's JSON (what follows the tokens in a stored value), from a
    cache of owners' JSON."""
    text = _OWNER_JSON.get(owner)
    if text is None:
        if len(_OWNER_JSON) >= 256:  # every task id is a new owner: keep the cache small
            _OWNER_JSON.clear()
        text = _OWNER_JSON[owner] = "\n" + owner.as_json()
    return text


#: (key, limit) -> the start of a slot acquire's request, up to its last key: a semaphore's
#: key is used again and again (its N keys are the costly part to pack).
_SLOT_HEADS: dict[tuple[str, int], bytes] = {}


def _slot_request_head(key: str, limit: int) -> bytes:
    """EVALSHA of ``LUA_ACQUIRE_SLOT`` and the keys of the ``limit`` slots of ``key``."""
    head = _SLOT_HEADS.get((key, limit))
    if head is None:
        if len(_SLOT_HEADS) >= 1024:
            _SLOT_HEADS.clear()
        lock = ("{" + key + "}").encode()
        size = len(lock)
        parts = [RedisBackend._acquire_slot_script.head(limit, 7), b"$%d\r\n%s\r\n" % (size, lock)]
        for slot in range(1, limit):
            digits = b"%d" % slot
            record = b"%s%s%s" % (lock, _SLOT_MARK, digits)
            parts.append(b"$%d\r\n%s\r\n" % (len(record), record))
        head = _SLOT_HEADS[(key, limit)] = b"".join(parts)
    return head


#: (owner, limit) -> what a slot acquire stores after its fencing token (':<limit>', a
#: newline and the owner JSON), and what it looks for in the stored owners: the owner's
#: task id as its JSON has it ('"task_id":"..."'; b"": no task id).
_SLOT_PARTS: dict[tuple[Owner, int], tuple[bytes, bytes]] = {}


def _slot_parts(owner: Owner, limit: int) -> tuple[bytes, bytes]:
    parts = _SLOT_PARTS.get((owner, limit))
    if parts is None:
        if len(_SLOT_PARTS) >= 256:  # every task id is a new owner: keep the cache small
            _SLOT_PARTS.clear()
        task = b"" if owner.task_id is None else b'"task_id":' + json.dumps(owner.task_id).encode()
        parts = _SLOT_PARTS[(owner, limit)] = (f":{limit}{_owner_part(owner)}".encode(), task)
    return parts


# The fixed start of the hot path's two requests, packed once.
_ACQUIRE_HEAD = RedisBackend._acquire_script.head(1, 4)
_RELEASE_HEAD = RedisBackend._release_script.head(2, 3)
#: The arguments of a slot acquire after its keys (the last one: '0', not counted).
_SLOT_ARGS = b"$%d\r\n%s\r\n" * 3 + b"$1\r\n%s\r\n" + b"$%d\r\n%s\r\n" * 2 + b"$1\r\n0\r\n"
_SIGNAL_LIFETIME_ARG = b"$%d\r\n%d\r\n" % (len(str(SIGNAL_LIFETIME_MS)), SIGNAL_LIFETIME_MS)


def wait_in_line(
    attempt: Callable[[bool], Granted | Refused],
    block: Callable[[float], bool],
    *,
    clock: Callable[[], float],
    ttl: float,
    deadline: float | None,
    polite: bool,
    unknown_bound: float,
) -> Granted | None:
    """The wait of a lock on Redis: try (marking the lock, so its release wakes us), block
    on the release announcement bounded by the holder's remaining lease, try again.

    :param attempt: one try; its argument says that a release woke us (the lock it grants
        is marked: others may still wait).
    :param block: BLPOP for at most that many seconds; True when an announcement came.
    :param polite: a release of ours just woke a waiter: queue behind it first.
    :returns: the grant (its validity from its own attempt), or None once ``deadline``
        (on ``clock``) has passed.
    """
    woken = False
    if polite:
        bound = POLITE_WAIT if deadline is None else min(POLITE_WAIT, deadline - clock())
        if bound > 0:
            woken = block(bound)
    while True:
        sent_at = clock()
        result = attempt(woken)
        if isinstance(result, Granted):
            return replace(result, valid_until=sent_at + ttl - clock_drift(ttl))
        remaining = None if deadline is None else deadline - clock()
        if remaining is not None and remaining <= 0:
            return None
        bounds = [b for b in (remaining, result.holder_ttl) if b is not None]
        # An unknown holder TTL can only come from a master that could not tell; then
        # re-check every connect_timeout at most.
        woken = block(min(bounds) if bounds else unknown_bound)


class Line:
    """A lane to one Redis server for a caller that writes a request to many servers
    before reading any reply (the Redlock backend): :meth:`send` only writes,
    :meth:`receive` reads the reply by ``connect_timeout`` after that send. One request
    at a time; not thread-safe. Errors come as :class:`LockBackendUnavailable` with this
    server's message ("refused the connection", "did not answer within ..."), the
    connection then closed (the next send opens a new one).
    """

    __slots__ = ("_due", "_lane", "_node")

    def __init__(self, node: RedisBackend) -> None:
        self._node = node
        self._lane: Lane | None = None
        self._due = 0.0

    @staticmethod
    def pack(call: ScriptCall) -> bytes:
        """``call`` as a request for :meth:`send`: the same for every server with the
        same scripts, so a caller packs it once."""
        return call.pack()

    @property
    def connected(self) -> bool:
        """Whether a :meth:`send` would go out at once, without connecting first."""
        return self._lane is not None

    def connect(self, key: str | None) -> Lane:
        """Connect now, if not connected (a caller connects many lines at once).

        :raises LockBackendUnavailable: the server could not be reached.
        """
        if self._lane is None:
            self._lane = self._node._take_lane(key)
        return self._lane

    def send(self, request: bytes, key: str | None) -> None:
        """Write ``request`` (from :meth:`pack`), connecting first if need be.

        :raises LockBackendUnavailable: it was not sent, so the server cannot apply it.
        """
        lane = self.connect(key)
        try:
            lane.send(request)
        except OSError as exc:
            self.close()
            self._node._raise_socket_error(exc, key)
        self._due = time.monotonic() + self._node.connect_timeout

    def receive(self, call: ScriptCall) -> Any:
        """The reply to ``call``, sent by :meth:`send`, read by ``connect_timeout`` after
        the send. A server restarted empty has forgotten the script: it is run as EVAL.

        :raises LockBackendUnavailable: no reply; the server may have applied it.
        """
        lane = self._lane
        if lane is None:
            msg = f"nothing was sent to {self._node.url}"
            raise LockBackendUnavailable(msg, url=self._node.url, key=call.key)
        try:
            reply = lane.read_within(self._due - time.monotonic())
            if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
                lane.send(call.script.pack_eval(call.keys, call.args))
                reply = lane.read_within(self._node.connect_timeout)
        except OSError as exc:
            self.close()
            self._node._raise_socket_error(exc, call.key)
        if type(reply) is ReplyError:
            error = self._node._reply_error(reply, call.key)
            if isinstance(error, LockError):
                raise error
            raise LockBackendUnavailable(str(reply), url=self._node.url, key=call.key)
        return reply

    def close(self) -> None:
        """Close the connection (a later :meth:`send` opens a new one)."""
        if self._lane is not None:
            self._lane.close()
            self._lane = None


class SignalWait:
    """A BLPOP sent on one server for the next release announcement of one key.

    Made by :meth:`RedisBackend.signal_wait`; :meth:`wait` blocks on it alone,
    :func:`wait_for_first_signal` on many at once. :meth:`close` (or the end of a
    ``with`` block) gives its lane back: an announcement that came is read, so it
    is not lost; a BLPOP still pending is dropped with its connection.

    Redis checks blocking timeouts only about every 100 ms, so a wait is timed here,
    not by the server; the caller tries to acquire after every wait, so a release
    announced just as the wait ends is not lost.

    :ivar timeout: how long the wait lasts, in seconds (``MAX_BLOCK`` at most).
    """

    __slots__ = ("_lane", "_node", "_pending", "key", "timeout")

    def __init__(self, node: RedisBackend, key: str, timeout: float) -> None:
        self._node = node
        self.key = key
        self.timeout = min(timeout, MAX_BLOCK)
        # Each waiter blocks a lane of its own, never one a release needs.
        self._lane: Lane | None = node._take_lane(key)
        request = _pack_command(["BLPOP", node.signal_key(key), f"{self.timeout + 1:.3f}"])
        try:
            self._lane.send(request)
        except OSError as exc:
            self._lane.close()
            self._lane = None
            node._raise_socket_error(exc, key)
        self._pending = True

    @property
    def sock(self) -> socket.socket | None:
        return None if self._lane is None else self._lane.sock

    def has_data(self) -> bool:
        return self._lane is not None and self._lane.has_data()

    def wait(self) -> bool:
        """Block until the announcement comes (True) or ``timeout`` passes (False).

        :raises LockBackendUnavailable: the server failed while we waited.
        """
        lane = self._lane
        if lane is None:
            return False
        try:
            try:
                reply = lane.read_within(self.timeout)  # one poll and one read when it comes
            except TimeoutError:
                if lane.has_data():  # a reply began to arrive just now: it is read whole
                    reply = lane.read_within(self._node.connect_timeout)
                else:
                    return False
            self._pending = False
        except OSError as exc:
            self._drop()
            self._node._raise_socket_error(exc, self.key)
        except BaseException:
            self._drop()
            raise
        if type(reply) is ReplyError:
            self._drop()
            raise self._node._reply_error(reply, self.key)
        return reply is not None

    def _drop(self) -> None:
        self._pending = False
        if self._lane is not None:
            self._lane.close()
            self._lane = None

    def close(self) -> None:
        """Read the announcement if it came, else drop the pending BLPOP; give the
        lane back. Never raises for the server's sake."""
        lane = self._lane
        if lane is None:
            return
        if self._pending:
            try:
                if lane.readable(0):
                    self._pending = False
                    lane.read_within(self._node.connect_timeout)
            except OSError:
                pass
        if self._pending:
            self._drop()
            return
        self._lane = None
        self._node._give_back(lane)

    def __enter__(self) -> SignalWait:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def wait_for_first_signal(waits: Sequence[SignalWait]) -> bool:
    """Block until any of ``waits`` has its announcement (True), or the shortest of their
    timeouts passes (False). Their announcements are read when they are closed."""
    if any(wait.has_data() for wait in waits):
        return True
    with selectors.DefaultSelector() as selector:
        for wait in waits:
            sock = wait.sock
            if sock is not None:
                selector.register(sock, selectors.EVENT_READ)
        if not selector.get_map():
            return False
        return bool(selector.select(min((wait.timeout for wait in waits), default=0)))


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
        #: (full key, token, limit: the slots it may hold) -> when to give up
        self._pending: dict[tuple[str, str, int], float] = {}
        self._guard = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, key: str, token: str, ttl: float, limit: int = 1) -> None:
        """Release ``token``'s acquisition of ``key`` (fully prefixed; any of its ``limit``
        slots, for a semaphore) as soon as possible."""
        with self._guard:
            if self._pid != os.getpid():  # a forked child: the parent's thread is not here
                self._pending, self._thread, self._pid = {}, None, os.getpid()
            self._pending[(key, token, limit)] = self._clock() + ttl
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
            for key, token, limit in due:
                node = self._node
                call = (
                    node.release_call(key, "token", token) if limit == 1
                    else node.release_slots_call(key, limit, "token", token)
                )
                try:
                    deleted = node.release_reply(node.run(call))
                except Exception:  # best effort, never a dead thread: the TTL frees it anyway
                    logger.debug("late release of %r failed; trying again", key, exc_info=True)
                    continue
                with self._guard:
                    self._pending.pop((key, token, limit), None)
                if deleted:
                    logger.debug("released %r, taken by an attempt whose reply was lost", key)
            if self._stopped.wait(pause):
                continue
            pause = min(pause * 2, LATE_RELEASE_PAUSE[1])


def _text(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _glob_escaped(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _granted_at(fencing_token: int | None) -> float | None:
    """When a lock was granted, read from its fencing token: on one Redis a grant's token
    is the server's clock in microseconds. None for a token that is not a time (Redlock's
    count on)."""
    if fencing_token is None or not 10**15 < fencing_token < 10**17:
        return None
    return fencing_token / 1e6


def milliseconds(seconds: float) -> int:
    """``seconds`` as the whole milliseconds of a PX or PEXPIRE argument (1 at least)."""
    return max(1, round(seconds * 1000))
