"""PostgreSQL: ``postgresql://user:password@host:5432/dbname?sslmode=...`` (alias ``postgres://``).

A lease table, not advisory locks: an advisory lock belongs to a session, so it breaks
behind PgBouncer's transaction pooling, and a stranded one (a partitioned client, a
recycled pooler connection) stays taken until the server notices the session is gone,
which can take hours. A row of this table is a lease with an expiry on the server's
clock, whatever happens to the connection that wrote it::

    singleton_locks                          (the name is the ``table`` option)
      key         text primary key           the full key (prefix included)
      token       text                       this acquisition's random token; NULL: free
      owner       text                       the owner JSON (host, pid, task id); NULL: free
      fence       bigint                     the last fencing token given for the key
      expires_at  timestamptz                end of the lease; for a free row, when it
                                             became free (old free rows are deleted)
    singleton_locks_fence                    the sequence every fencing token comes from

Every time is the server's (``clock_timestamp()``), so client clocks do not matter. Each
operation is one statement in autocommit, one round trip: an acquire is an upsert that
takes the row only when it is free or expired and returns the new fencing token, or on
refusal the holder's task id and remaining lease; the renewal of every lock of a backend
is one UPDATE over arrays; a release is an UPDATE guarded by the exact token (or owner)
that also sends ``NOTIFY``. The statements are the ``SQL_*`` class constants.

Fencing tokens come from one sequence: ``nextval`` only rises, across a row's deletion and
reuse and across server restarts (a sequence is WAL-logged ahead of use). A failover to an
asynchronous standby that had not received the last grants can repeat tokens, as it loses
those grants themselves; ``docs/postgres.md`` says exactly when.

Waiting: one connection per process (and listening URL) runs ``LISTEN`` for the keys its
waiters want, each key on a channel of its own; a waiter costs the server nothing while
it waits. Waiters queue in ``<table>_wait`` (a ticket each, naming the listening
session), and a release wakes the oldest live one per row it frees, by its ticket in the
notification's payload: one waiter per release, FIFO, not every waiting process (see
``SQL_RELEASE`` for the one race this leaves, and how it is covered). A crashed
holder sends no ``NOTIFY``: its lease ends on the server's clock, and the base class
bounds every wait by the holder's remaining lease. Behind PgBouncer in transaction mode
``LISTEN`` does not work: give ``listen_url`` (a direct connection) or waits become timed
(``poll_interval``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import os
import random
import re
import select
import selectors
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery_singleton_lock import _native
from celery_singleton_lock.backends.base import SLOT_MARK, Granted, LockBackend, LockInfo, NodeStatus, Refused
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, LockKeyError, mask_url
from celery_singleton_lock.lease import HeldLock

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import pq, sql, waiting
    from psycopg.abc import PQGen
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the PostgreSQL backend needs psycopg 3: pip install 'celery-singleton-lock[postgres]'"
    raise ConfigurationError(msg, option="singleton_lock_backend") from exc

__all__ = ["PostgresBackend"]

logger = logging.getLogger("celery_singleton_lock.postgres")

RV = TypeVar("RV")

#: A connection idle in the pool for longer than this is closed instead of reused
#: (servers and poolers drop idle sessions; a fresh one costs one connect).
MAX_IDLE = 300.0
#: A key's channel stays LISTENed this long after its last waiter left: a waiter that
#: tries again and waits again keeps its subscription instead of paying LISTEN again.
#: The listening connection closes once no channel is left.
LISTEN_LINGER = 30.0
#: Pauses between reconnections of the listening connection (doubling).
RELISTEN_PAUSE = (0.1, 2.0)
#: A release of an acquisition whose outcome is unknown is retried after these pauses
#: (doubling) until the server answers it, or the lock's TTL has freed it anyway.
LATE_RELEASE_PAUSE = (0.05, 1.0)
#: A renewal gets this share of the shortest TTL it renews, at most connect_timeout:
#: the keeper retries a failed one, so a hung connection costs a short try, not the lease.
RENEWAL_SHARE = 0.25
MIN_TRY = 0.25
#: At most this many old free rows are deleted by one clean-up statement.
CLEANUP_BATCH = 1000
#: A refusal whose holder the statement's snapshot could not show (a row written by a
#: concurrent transaction after the statement began) is tried again this often.
REFUSAL_RETRIES = 3
#: The waiters' queue is the table ``<table><WAITERS_SUFFIX>``.
WAITERS_SUFFIX = "_wait"
#: A queue entry lasts this long when its wait has no timeout, and is renewed by its
#: waiter after half of it (a waiter that died leaves an entry no release picks anyway:
#: its listening session is gone).
QUEUE_TTL = 600.0
#: PostgreSQL identifiers are at most 63 bytes; the sequence name adds "_fence" (the
#: waiters' table's, "_wait", is shorter).
MAX_TABLE_NAME = 63 - len("_fence")
_SQLSTATE_CONNECTION = ("08", "57P")  # connection exceptions, operator intervention
_IDENTIFIER = re.compile(r"[^\x00.]+")
_NO_DATABASE = re.compile(r'database ".*" does not exist')

#: Our own options; every other keyword goes to libpq as a connection parameter.
_OWN_OPTIONS = (
    "table", "pgbouncer", "listen_url", "poll_interval", "cleanup_after", "max_connections",
)


class _Connection(psycopg.Connection[tuple[Any, ...]]):
    """A psycopg connection whose every wait ends by ``deadline`` (time.monotonic).

    psycopg bounds the connection attempt (at whole seconds, 2 at least) but never a
    statement: against a server that stopped answering, ``execute`` blocks forever. Every
    wait psycopg does on the socket goes through :meth:`wait`, so this is the one place
    where a deadline reaches them all; a statement cut short raises ``_WaitTimeout`` (an
    ``OperationalError``) and the connection is closed, its state unknown.
    """

    deadline: float | None = None
    _rows: psycopg.Cursor[tuple[Any, ...]] | None = None

    def run(self, query: bytes, params: Any) -> list[tuple[Any, ...]]:
        """Execute one statement and return its rows (none for a command), on a cursor
        kept for the connection's life: each statement is one of a handful, and a new
        cursor per call costs more than the rest of our side of a round trip."""
        cursor = self._rows
        if cursor is None:
            cursor = self._rows = self.cursor()
        cursor.execute(query, params)
        result = cursor.pgresult
        return cursor.fetchall() if result is not None and result.status == pq.ExecStatus.TUPLES_OK else []

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        if timeout is None and self.deadline is not None:
            timeout = max(0.0, self.deadline - time.monotonic())
        return super().wait(gen, interval, timeout)


class _Unreachable(Exception):
    """No connection could be had: the server refused or did not answer, or this
    process's connections are all busy. Nothing was sent."""


#: Whether sessions left running a statement whose reply was lost still exist.
SQL_SESSIONS_ALIVE = b"SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%(pids)s)"

#: Run on each new connection that writes leases (not through PgBouncer, where a session
#: setting would leak to other clients): a grant must be on disk before its holder hears
#: of it, or a server crash could forget it while the holder runs on, and another
#: client take it. Only raised, never lowered (remote_apply stays).
SQL_DURABLE = (
    "SELECT set_config('synchronous_commit', 'on', false) "
    "WHERE current_setting('synchronous_commit') IN ('off', 'local')"
)


def _connect(conninfo: str, deadline: float, *, pgbouncer: bool, listening: bool = False) -> _Connection:
    """A new autocommit connection, within ``deadline`` (time.monotonic).

    psycopg's ``connect`` rounds ``connect_timeout`` to whole seconds of at least two, so
    the connection is made the way it makes each attempt, with our own bound. libpq
    itself moves on to the next host of a multi-host URL when one refuses.
    """
    gen = _Connection._connect_gen(conninfo)
    try:
        conn = waiting.wait_conn(gen, interval=0.1, timeout=max(0.0, deadline - time.monotonic()))
    except pg_errors._WaitTimeout:
        raise _Unreachable("no answer to the connection attempt") from None
    except psycopg.Error as exc:
        raise _Unreachable(_first_line(exc)) from None
    conn.autocommit = True
    # PgBouncer in transaction mode hands each transaction to any server connection: a
    # statement prepared on one is missing on the next.
    conn.prepare_threshold = None if pgbouncer or listening else 5
    if not (pgbouncer or listening):
        conn.deadline = deadline
        try:
            conn.execute(SQL_DURABLE)
        except psycopg.Error as exc:
            _close_quietly(conn)
            raise _Unreachable(_first_line(exc)) from None
        conn.deadline = None
    return conn


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _original_poll() -> Callable[[], Any]:
    # gevent removes select.poll; a poll that does not wait never blocks, so the
    # original is safe in a greenlet too.
    monkey = sys.modules.get("gevent.monkey")
    return monkey.get_original("select", "poll") if monkey is not None else select.poll


_poll = _original_poll()


def _has_input(fd: int) -> bool:
    """True when the socket ``fd`` has something to read (or hung up) right now."""
    poller = _poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


# -- connections -------------------------------------------------------------------------


class _Pool:
    """This process's connections to one server: taken for one statement, then given back.

    At most ``size`` at a time; a caller finds an idle one or opens one, and waits (until
    its deadline) only when ``size`` are busy. An idle connection that has input waiting
    was told something while nobody used it: the server ending the session (a restart,
    ``pg_terminate_backend``), so it is closed instead of used, before anything is sent.
    """

    def __init__(
        self, conninfo: str, size: int, *, pgbouncer: bool, guard: threading.Condition | None = None
    ) -> None:
        self._conninfo = conninfo
        self._size = size
        self._pgbouncer = pgbouncer
        self._guard = guard or threading.Condition()
        self._idle: list[tuple[_Connection, float]] = []
        self._busy = 0
        self._pid = os.getpid()
        #: After close(), connections are closed when given back: a lock still tracked
        #: by the lease keeper renews through a closed backend, one connection a time.
        self._closed = False
        _pools.add(self)

    def take(self, deadline: float) -> _Connection:
        while True:
            with self._guard:
                while not self._idle and self._busy >= self._size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        msg = f"all {self._size} connections of this process are busy (max_connections)"
                        raise _Unreachable(msg)
                    self._guard.wait(remaining)
                conn = self._idle.pop()[0] if self._idle else None
                self._busy += 1
            if conn is None:
                try:
                    return _connect(self._conninfo, deadline, pgbouncer=self._pgbouncer)
                except BaseException:
                    self._release_slot()
                    raise
            if _stale(conn):
                self._release_slot()
                _close_quietly(conn)
                continue
            return conn

    def give(self, conn: _Connection, *, reusable: bool = True) -> None:
        conn.deadline = None
        reusable = reusable and not conn.broken and (
            conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
        )
        now = time.monotonic()
        with self._guard:
            if os.getpid() != self._pid:  # taken before a fork: the parent's connection
                return
            self._busy -= 1
            stale = [c for c, since in self._idle if now - since > MAX_IDLE]
            self._idle = [(c, since) for c, since in self._idle if now - since <= MAX_IDLE]
            reusable = reusable and not self._closed
            if reusable:
                self._idle.append((conn, now))
            self._guard.notify()
        for each in stale if reusable else [*stale, conn]:
            _close_quietly(each)

    def _release_slot(self) -> None:
        with self._guard:
            self._busy -= 1
            self._guard.notify()

    def close(self) -> None:
        with self._guard:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            _close_quietly(conn)

    def _forget_after_fork(self) -> None:
        # The child must never talk on its parent's sockets (closing a connection sends
        # the server a goodbye for the parent's session): only its file descriptors go.
        for conn, _ in self._idle:
            _abandon(conn)
        self._idle, self._busy, self._pid = [], 0, os.getpid()
        self._guard = threading.Condition()


def _stale(conn: _Connection) -> bool:
    """True for a pooled connection that must not be used: closed, broken, or told
    something while idle (the server ending the session)."""
    if conn.closed or conn.broken:
        return True
    try:
        return _has_input(conn.pgconn.socket)
    except psycopg.Error:
        return True


def _close_quietly(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def _abandon(conn: psycopg.Connection[Any]) -> None:
    """Close a connection inherited through fork on our side only. psycopg never sends
    libpq's goodbye from a process other than the one that connected."""
    with contextlib.suppress(Exception):
        os.close(conn.pgconn.socket)


_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


# -- waiting -----------------------------------------------------------------------------


@dataclass
class _Channel:
    """One key's channel on the listening connection."""

    #: Rises with every release announced on it, and whenever one may have been missed
    #: (each LISTEN, each reconnection): a waiter waits for it to change.
    generation: int = 0
    listening: bool = False
    waiters: int = 0
    last_waited: float = field(default_factory=time.monotonic)
    #: Queue tickets a release picked (the notification's payload), until their waiter
    #: takes them: each wakes that waiter alone.
    woken: set[int] = field(default_factory=set)


class _Listener:
    """One LISTEN connection per process and URL, shared by every waiter of the process.

    Its thread subscribes to the channels of the keys waited for, and turns each
    notification into a new generation of its channel. A waiter notes the generation
    before its attempt (``generation``) and waits for it to change (``wait``), so a
    release announced between its refused attempt and its wait is not missed.
    """

    def __init__(self, conninfo: str, connect_timeout: float) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._guard = threading.Lock()
        self._changed = threading.Condition(self._guard)
        self._channels: dict[str, _Channel] = {}
        # Generations come from one counter, so a channel dropped and subscribed again
        # never shows a generation that a waiter noted before.
        self._events = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._conn: _Connection | None = None
        self._session: int | None = None

    def _next(self) -> int:
        return next(self._events)

    def generation(self, channel: str) -> int | None:
        """The channel's generation now, if it is subscribed (None: a wait must first
        subscribe, and cannot know what was announced before)."""
        with self._guard:
            state = self._channels.get(channel)
            return state.generation if state is not None and state.listening else None

    def session(self, channel: str) -> int | None:
        """The server session (backend pid) listening to ``channel`` now; None while it
        is not subscribed. A queue entry names it, so a release skips the entries of a
        session that is gone."""
        with self._guard:
            state = self._channels.get(channel)
            return self._session if state is not None and state.listening else None

    def wait(self, channel: str, seen: int | None, timeout: float, ticket: int | None = None) -> bool:
        """Block until ``channel`` has a generation other than ``seen`` (an announcement
        to all, or a subscription just made), a release picked ``ticket``, or ``timeout``
        seconds. True when the wake-up was ``ticket``'s."""
        deadline = time.monotonic() + timeout
        with self._guard:
            state = self._channels.setdefault(channel, _Channel())
            state.waiters += 1
            try:
                if not state.listening:
                    self._start()
                while not (state.listening and (seen is None or state.generation != seen)):
                    if ticket in state.woken:
                        state.woken.discard(ticket)
                        return True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._changed.wait(min(remaining, threading.TIMEOUT_MAX))
                return False
            finally:
                state.waiters -= 1
                state.last_waited = time.monotonic()

    def forget(self, channel: str, ticket: int) -> None:
        """Drop ``ticket``'s wake-up, if one came that its waiter did not wait for."""
        with self._guard:
            state = self._channels.get(channel)
            if state is not None:
                state.woken.discard(ticket)

    def _start(self) -> None:
        # Called with the guard held.
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="celery-singleton-lock-pg-listen", daemon=True
            )
            self._thread.start()
        else:
            self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._wake_w, b"!")

    def _run(self) -> None:
        conn: _Connection | None = None
        fd = -1
        listened: set[str] = set()
        pause = RELISTEN_PAUSE[0]
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while True:
                    wanted, timeout = self._wanted()
                    if wanted is None:
                        return
                    try:
                        if conn is None:
                            conn = self._open()
                            listened = set()
                            fd = conn.pgconn.socket
                            selector.register(fd, selectors.EVENT_READ, conn)
                        self._subscribe(conn, listened, wanted)
                        pause = RELISTEN_PAUSE[0]
                        for ready, _ in selector.select(timeout):
                            if ready.data is None:  # a wake-up call: the wanted set changed
                                with contextlib.suppress(BlockingIOError):
                                    os.read(self._wake_r, 4096)
                            else:
                                conn.pgconn.consume_input()
                                self._drain(conn)
                    except Exception as exc:  # the thread must outlive anything; it reconnects
                        if isinstance(exc, psycopg.Error | _Unreachable):
                            logger.debug("listening connection failed (%s); reconnecting", _first_line(exc))
                        else:
                            logger.exception("listening connection: unexpected error; reconnecting")
                        if conn is not None:
                            with contextlib.suppress(KeyError, ValueError):
                                selector.unregister(fd)
                            _close_quietly(conn)
                        conn = self._conn = None
                        self._lost()
                        selector.select(pause)  # a wake-up call ends the pause early
                        pause = min(pause * 2, RELISTEN_PAUSE[1])
            finally:
                self._conn = None
                if conn is not None:
                    _close_quietly(conn)

    def _open(self) -> _Connection:
        conn = _connect(
            self._conninfo, time.monotonic() + self._connect_timeout, pgbouncer=False, listening=True
        )
        self._conn = conn  # only for a forked child to let go of
        with self._guard:
            self._session = conn.pgconn.backend_pid
        # Notifications that arrive while LISTEN runs come through psycopg's handler.
        conn.add_notify_handler(self._on_notify)
        return conn

    def _subscribe(self, conn: _Connection, listened: set[str], wanted: set[str]) -> None:
        """LISTEN to the channels wanted and not yet listened to, UNLISTEN the others."""
        for name in sorted(wanted - listened):
            conn.deadline = time.monotonic() + self._connect_timeout
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
            listened.add(name)
            self._subscribed(name)
        for name in sorted(listened - wanted):
            conn.deadline = time.monotonic() + self._connect_timeout
            conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(name)))
            listened.discard(name)
        conn.deadline = None
        self._drain(conn)  # what libpq read along with the replies

    def _wanted(self) -> tuple[set[str] | None, float | None]:
        """The channels to subscribe to, and how long to sleep before looking again; None
        when none is left (the thread then ends)."""
        with self._guard:
            now = time.monotonic()
            for name, state in list(self._channels.items()):
                if not state.waiters and now - state.last_waited >= LISTEN_LINGER:
                    del self._channels[name]
            if not self._channels:
                self._thread = None
                return None, None
            lingering = [
                state.last_waited + LISTEN_LINGER - now
                for state in self._channels.values() if not state.waiters
            ]
            return set(self._channels), max(0.0, min(lingering)) if lingering else None

    def _subscribed(self, name: str) -> None:
        with self._guard:
            state = self._channels.get(name)
            if state is not None:
                state.listening = True
                state.generation = self._next()  # what was announced before is unknown to its waiters
                self._changed.notify_all()

    def _lost(self) -> None:
        with self._guard:
            self._session = None
            for state in self._channels.values():
                state.listening = False
            self._changed.notify_all()

    def _drain(self, conn: _Connection) -> None:
        while (notify := conn.pgconn.notifies()) is not None:
            self._announce(notify.relname.decode("ascii", "replace"), notify.extra.decode("ascii", "replace"))

    def _on_notify(self, notify: psycopg.Notify) -> None:
        self._announce(notify.channel, notify.payload)

    def _announce(self, name: str, payload: str) -> None:
        """A release on channel ``name``: for the waiter whose queue ticket is the
        payload, or (no payload) for every waiter of the key."""
        with self._guard:
            state = self._channels.get(name)
            if state is None:
                return
            if payload.isdigit():
                state.woken.add(int(payload))
            else:
                state.generation = self._next()
            self._changed.notify_all()

    def _forget_after_fork(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._conn is not None:
            _abandon(self._conn)


_listeners: dict[str, _Listener] = {}
_listeners_guard = threading.Lock()


def _listener_for(conninfo: str, connect_timeout: float) -> _Listener:
    with _listeners_guard:
        listener = _listeners.get(conninfo)
        if listener is None:
            listener = _listeners[conninfo] = _Listener(conninfo, connect_timeout)
        return listener


def _forget_after_fork() -> None:
    # A forked child makes its own connections and listener; the parent's threads are
    # not in it, and its sockets stay the parent's.
    global _listeners_guard  # noqa: PLW0603 - the fork may have copied it held
    _listeners_guard = threading.Lock()
    for listener in _listeners.values():
        listener._forget_after_fork()
    _listeners.clear()
    for pool in list(_pools):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_forget_after_fork)


# -- the backend -------------------------------------------------------------------------


@dataclass
class _Queued:
    """A wait's entry in its key's queue of waiters (one per waiting thread)."""

    key: str
    ticket: int
    #: The listening session the entry names: a release skips entries of sessions gone.
    session: int
    #: When the entry is renewed (half its time).
    renew_at: float
    #: A release picked it: the next attempt, if refused, renews it first (not woken).
    woken: bool = False


class PostgresBackend(LockBackend):
    """Locks in a table of a PostgreSQL database; see the module docstring.

    :param table: the lease table, ``name`` or ``schema.name`` (created on first use,
        with its sequence ``<name>_fence``).
    :param pgbouncer: the URL leads to PgBouncer in transaction mode: no prepared
        statements, and no LISTEN on it (see ``listen_url``).
    :param listen_url: where the listening connection goes (a direct connection when the
        URL is a pooler's); default: the URL itself, or none with ``pgbouncer``.
    :param poll_interval: with no listening connection, a waiter tries again this often
        (a timed wait, still bounded by the holder's lease).
    :param cleanup_after: free rows unused for this many seconds are deleted (0: never).
    :param max_connections: connections this process opens at most (idle ones are kept).
    :param libpq_options: any other keyword is a libpq connection parameter (``password``,
        ``sslmode``, ``sslrootcert``, ``application_name``...), as in the URL's query.
    """

    schemes = ("postgresql", "postgres")

    # ``acquire``: take the row if free, expired, or ours already (a retry after a lost
    # reply); else report the holder.
    # %(key)s full key, %(token)s, %(owner)s owner JSON, %(ttl)s seconds (float)
    # returns (fence, ...) when granted; (NULL, owner, seconds left, ...) when refused;
    # no row, or a free or expired row, when a concurrent write hid the holder: try again.
    # A holder seen in the statement's snapshot (``live``) is a refusal that writes
    # nothing: no row lock, no transaction id, no WAL (duplicates of a running task are
    # refused by the thousand). Only a row that looked free is upserted; if a concurrent
    # acquirer took it first, ON CONFLICT still locks the row to look at it: that refusal
    # then commits without waiting for the WAL flush (there is nothing worth keeping), or
    # a crowd of waiters woken by one release would queue one flush each on the row lock,
    # ahead of the next release. A grant always waits for the flush.
    SQL_ACQUIRE = """
    WITH live AS MATERIALIZED (
        SELECT owner, expires_at FROM {table}
         WHERE key = %(key)s AND token IS NOT NULL AND token <> %(token)s
           AND expires_at > clock_timestamp()
    ), taken AS (
        INSERT INTO {table} AS held (key, token, owner, expires_at)
        SELECT %(key)s, %(token)s, %(owner)s, clock_timestamp() + %(ttl)s * interval '1 second'
         WHERE NOT EXISTS (SELECT FROM live)
        ON CONFLICT (key) DO UPDATE
            SET token = excluded.token, owner = excluded.owner, fence = nextval({sequence}),
                expires_at = excluded.expires_at
            WHERE held.token IS NULL OR held.expires_at <= clock_timestamp()
               OR held.token = excluded.token
        RETURNING held.fence
    )
    SELECT fence, NULL, NULL, NULL FROM taken
    UNION ALL
    SELECT NULL, owner, extract(epoch FROM expires_at - clock_timestamp())::float8, NULL FROM live
    UNION ALL
    SELECT NULL, owner, extract(epoch FROM expires_at - clock_timestamp())::float8,
           set_config('synchronous_commit', 'off', true)  -- in the select list: this row only
      FROM {table}
     WHERE key = %(key)s AND NOT EXISTS (SELECT FROM taken) AND NOT EXISTS (SELECT FROM live)
    """

    # ``acquire`` of a semaphore slot (limit > 1): the lowest free slot among %(keys)s
    # (text[]: the key itself, slot 0, then key || SLOT_MARK || n), in one statement; a
    # slot holding our own token counts as free and comes first (a retry after a lost
    # reply). %(token)s, %(owner)s owner JSON, %(ttl)s seconds, %(task)s the owner's
    # '"task_id":"..."' as the owner JSON spells it (NULL without a task id): a live slot
    # whose owner has it is the run of which we are a redelivered copy, and no slot is
    # taken (JSON escapes every quote inside a string, so it never matches inside another
    # field, and the closing quote makes it exact).
    # returns (fence, slot, NULL, NULL, NULL) when granted; (NULL, NULL, owner, seconds
    # left, NULL) when refused: that run's, else the slot that expires soonest;
    # (NULL, NULL, NULL, NULL, _) when a concurrent acquirer took the slot picked: try
    # again. Tokens come from the one sequence: above every earlier one of the key, all
    # slots counted. A refusal seen in the snapshot writes nothing; a lost race commits
    # without waiting for the WAL flush, as SQL_ACQUIRE's.
    SQL_ACQUIRE_SLOT = """
    WITH live AS MATERIALIZED (
        SELECT key, token <> %(token)s AS other, owner, expires_at FROM {table}
         WHERE key = ANY(%(keys)s::text[]) AND token IS NOT NULL AND expires_at > clock_timestamp()
    ), pick AS (
        SELECT key, n - 1 AS n FROM unnest(%(keys)s::text[]) WITH ORDINALITY AS slot(key, n)
         WHERE NOT EXISTS (
            SELECT FROM live WHERE other AND (live.key = slot.key OR strpos(owner, %(task)s::text) > 0)
         )
         ORDER BY NOT EXISTS (SELECT FROM live WHERE live.key = slot.key), n
         LIMIT 1
    ), taken AS (
        INSERT INTO {table} AS held (key, token, owner, expires_at)
        SELECT key, %(token)s, %(owner)s, clock_timestamp() + %(ttl)s * interval '1 second' FROM pick
        ON CONFLICT (key) DO UPDATE
            SET token = excluded.token, owner = excluded.owner, fence = nextval({sequence}),
                expires_at = excluded.expires_at
            WHERE held.token IS NULL OR held.expires_at <= clock_timestamp()
               OR held.token = excluded.token
        RETURNING held.fence
    )
    SELECT fence, (SELECT n FROM pick), NULL, NULL, NULL FROM taken
    UNION ALL
    SELECT NULL, NULL, owner, extract(epoch FROM expires_at - clock_timestamp())::float8, NULL
      FROM (
        SELECT owner, expires_at FROM live WHERE other
         ORDER BY strpos(owner, %(task)s::text) > 0 IS TRUE DESC, expires_at LIMIT 1
      ) AS holder
     WHERE NOT EXISTS (SELECT FROM pick)
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, set_config('synchronous_commit', 'off', true)
     WHERE EXISTS (SELECT FROM pick) AND NOT EXISTS (SELECT FROM taken)
    """

    # ``renew``: replace the lease of every (key, token) still held by that exact token.
    # %s keys, %s tokens (text[]), %s ttls (float8[] seconds), in step
    # returns (key, token) for each renewed lease
    SQL_RENEW = """
    UPDATE {table} AS held SET expires_at = clock_timestamp() + mine.ttl * interval '1 second'
      FROM unnest(%s::text[], %s::text[], %s::float8[]) AS mine(key, token, ttl)
     WHERE held.key = mine.key AND held.token = mine.token AND held.expires_at > clock_timestamp()
    RETURNING held.key, held.token
    """

    # ``release``: free the rows of {rows} (the row %(key)s, or a semaphore's slot keys
    # %(keys)s, text[]: comparing one row with an array cost measurably more) whose
    # {column} ("token" or "owner") is exactly %(value)s, and say whether %(base)s (the
    # key) has waiters in the queue that no release picked yet: the client then wakes
    # them (``wake``), a statement paid only when there are waiters (waking them in this
    # statement would cost every release, waiters or not: an UPDATE of no row of the
    # queue, measured at a twentieth of an uncontended cycle; this probe of its index
    # costs almost nothing). With no waiter seen, the release is announced with no
    # payload on the key's channel %(channel)s, to every waiter of the key: an entry
    # made after this statement's snapshot cannot be seen here, and its waiter (whose
    # attempt came before this commit) is woken so. Sent at commit, before the reply.
    # returns (rows freed, waiters queued) when something was released, none otherwise.
    # A release commits without waiting for the WAL flush: one that a server crash
    # forgets leaves the lease to end by its TTL, which is what happens to any release
    # that fails, and the next grant's flush writes it out anyway (the WAL is one stream).
    # A handoff then waits for one flush, the grant's, not two.
    SQL_RELEASE = """
    WITH freed AS (
        UPDATE {table} SET token = NULL, owner = NULL, expires_at = clock_timestamp()
         WHERE {rows} AND {column} = %(value)s AND expires_at > clock_timestamp()
        RETURNING key
    )
    SELECT freed, queued, set_config('synchronous_commit', 'off', true),
           CASE WHEN NOT queued THEN pg_notify(%(channel)s, '') END
      FROM (SELECT count(*) AS freed FROM freed) AS released,
           (SELECT EXISTS (SELECT FROM {waiters} WHERE key = %(base)s AND NOT woken) AS queued) AS queue
     WHERE freed > 0
    """

    # ``wake``: after a release of %(count)s rows of %(key)s that saw waiters, wake one
    # per row: the oldest entries of the key's queue not woken yet whose listening
    # session (pid) still exists, each marked woken and told on %(channel)s with its
    # ticket as the payload; rows left without an entry are announced to every waiter of
    # the key (no payload). SKIP LOCKED: two wakes at once pick two entries, not one
    # twice. Its snapshot comes after the release's commit: every entry made before it
    # is seen, and a waiter that queued later tries again after the release anyway.
    SQL_WAKE = """
    WITH woken AS (
        UPDATE {waiters} AS queued SET woken = true
          FROM (
            SELECT key, ticket FROM {waiters} AS entry
             WHERE key = %(key)s AND NOT woken AND expires_at > clock_timestamp()
               AND EXISTS (SELECT FROM pg_stat_get_activity(entry.pid))
             ORDER BY ticket LIMIT %(count)s
               FOR UPDATE SKIP LOCKED
          ) AS picked
         WHERE queued.key = picked.key AND queued.ticket = picked.ticket
        RETURNING queued.ticket
    )
    SELECT (SELECT count(pg_notify(%(channel)s, ticket::text)) FROM woken),
           CASE WHEN (SELECT count(*) FROM woken) < %(count)s THEN pg_notify(%(channel)s, '') END,
           set_config('synchronous_commit', 'off', true)
    """

    # ``queue``: enter %(key)s's queue of waiters as %(ticket)s (NULL: a new ticket), or
    # stay in it not woken (a waiter that was woken and refused again), listening on the
    # session %(pid)s, until %(ttl)s seconds from now. returns (ticket,).
    # Like a refusal, it commits without waiting for the WAL flush: a crash forgets the
    # queue, and each waiter's wait is bounded by its holder's lease anyway.
    SQL_QUEUE = """
    INSERT INTO {waiters} AS queued (key, ticket, pid, expires_at)
    VALUES (%(key)s, coalesce(%(ticket)s, nextval({sequence})), %(pid)s,
            clock_timestamp() + %(ttl)s * interval '1 second')
    ON CONFLICT (key, ticket) DO UPDATE
        SET pid = excluded.pid, woken = false, expires_at = excluded.expires_at
    RETURNING ticket, set_config('synchronous_commit', 'off', true)
    """

    # ``dequeue``: leave %(key)s's queue (a wait that ended).
    SQL_DEQUEUE = """
    WITH gone AS (DELETE FROM {waiters} WHERE key = %(key)s AND ticket = %(ticket)s RETURNING 1)
    SELECT set_config('synchronous_commit', 'off', true) FROM gone
    """

    # ``cleanup``: delete rows free or expired for %(age)s seconds, a batch at a time,
    # skipping rows somebody is writing (a statement being taken right now is not old).
    SQL_CLEANUP = """
    DELETE FROM {table} WHERE key IN (
        SELECT key FROM {table}
         WHERE expires_at < clock_timestamp() - %(age)s * interval '1 second'
         LIMIT %(batch)s FOR UPDATE SKIP LOCKED
    ) AND expires_at < clock_timestamp() - %(age)s * interval '1 second'
    """

    # ``cleanup`` of the queue: entries whose time is up or whose listening session is
    # gone (a waiter that died, or whose listening connection was replaced).
    SQL_CLEANUP_QUEUE = """
    DELETE FROM {waiters} AS entry
     WHERE expires_at < clock_timestamp() OR NOT EXISTS (SELECT FROM pg_stat_get_activity(entry.pid))
    """

    # ``held`` (celery locks): the live leases under %(start)s (the prefix and ':'), or the
    # ones of %(key)s (its row and its semaphore slots' rows, %(slots)s: the key and
    # SLOT_MARK) when it is not NULL; reads only.
    # returns (key, token, owner, fence, seconds left) per lease, by key
    SQL_HELD = """
    SELECT key, token, owner, fence, extract(epoch FROM expires_at - clock_timestamp())::float8
      FROM {table}
     WHERE left(key, length(%(start)s)) = %(start)s AND token IS NOT NULL
       AND expires_at > clock_timestamp()
       AND (%(key)s::text IS NULL OR key = %(key)s::text
            OR left(key, length(%(slots)s::text)) = %(slots)s::text)
     ORDER BY key
    """

    # ``ping``: the server's clock (Unix time), for its offset from ours.
    SQL_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"

    # The table and its sequence, created on first use (``ddl`` shows them for a DBA).
    SQL_CREATE = """
    CREATE SEQUENCE IF NOT EXISTS {sequence_name};
    CREATE TABLE IF NOT EXISTS {table} (
        key         text PRIMARY KEY,
        token       text,
        owner       text,
        fence       bigint NOT NULL DEFAULT nextval({sequence}),
        expires_at  timestamptz NOT NULL
    );
    ALTER SEQUENCE {sequence_name} OWNED BY {table}.fence;
    CREATE TABLE IF NOT EXISTS {waiters} (
        key         text NOT NULL,
        ticket      bigint NOT NULL,
        pid         integer NOT NULL,
        woken       boolean NOT NULL DEFAULT false,
        expires_at  timestamptz NOT NULL,
        PRIMARY KEY (key, ticket)
    )
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        table: str = "singleton_locks",
        pgbouncer: bool = False,
        listen_url: str | None = None,
        poll_interval: float = 1.0,
        cleanup_after: float = 3600.0,
        max_connections: int = 10,
        **libpq_options: Any,
    ) -> None:
        super().__init__(url, prefix=prefix, connect_timeout=connect_timeout, clock=clock)
        self.check_url(url, option="singleton_lock_backend")
        self.table = _check_table(table)
        self.pgbouncer = bool(pgbouncer)
        self.poll_interval = _positive(poll_interval, "poll_interval")
        self.cleanup_after = _positive(cleanup_after, "cleanup_after", zero=True)
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            msg = (
                "singleton_lock_backend_options: max_connections must be an int >= 1, "
                f"got {max_connections!r}"
            )
            raise ConfigurationError(msg, option="singleton_lock_backend_options")
        libpq_options.setdefault("application_name", "celery-singleton-lock")
        self._conninfo = _conninfo(url, libpq_options, self.url)
        if listen_url is not None:
            self.check_url(listen_url, option="singleton_lock_backend_options")
            self._listen_conninfo: str | None = _conninfo(listen_url, libpq_options, mask_url(listen_url))
        else:
            self._listen_conninfo = None if self.pgbouncer else self._conninfo
        self._pool = _Pool(self._conninfo, max_connections, pgbouncer=self.pgbouncer)
        self._local = threading.local()
        self._sql = self._statements()
        self._next_cleanup = time.monotonic() + random.uniform(0, self.cleanup_after / 4)  # noqa: S311
        self.late_releases = _LateReleases(self)

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        super().check_url(url, option=option)
        if not isinstance(url, str):
            msg = f"{option}: a PostgreSQL backend takes one URL (libpq lists several hosts in it)"
            raise ConfigurationError(msg, option=option)
        try:
            conninfo_to_dict(url)
        except psycopg.Error as exc:
            text = _first_line(exc)
            password = _password_of(url)
            if password:
                text = text.replace(password, "***")
            msg = f"{option}: bad PostgreSQL URL {mask_url(url)!r}: {text}"
            raise ConfigurationError(msg, option=option) from None

    @property
    def ddl(self) -> str:
        """The statements that create the lease table, for a user without CREATE rights."""
        text = self._sql["create"].decode()
        return "\n".join(line[4:] for line in text.strip("\n").splitlines()) + ";"

    def for_native_thread(self) -> PostgresBackend:
        """A copy with connections of its own, for the lease keeper's OS thread in a
        gevent worker (see lease.ForNativeThread): the task greenlets' pool is guarded by
        gevent's locks, which that thread must not wait on."""
        clone = copy.copy(self)
        clone._pool = _Pool(
            self._conninfo, 1, pgbouncer=self.pgbouncer,
            guard=threading.Condition(_native.allocate_lock()),
        )
        clone._local = threading.local()
        return clone

    def _statements(self) -> dict[str, bytes]:
        """The statements with this backend's table in them, rendered once: psycopg would
        compose a ``sql.Composed`` again at every call (a third of a cycle's CPU time)."""
        schema, _, name = self.table.rpartition(".")
        parts = (schema, name) if schema else (name,)
        sequence_parts = (*parts[:-1], f"{name}_fence")
        names: dict[str, Any] = {
            "table": sql.Identifier(*parts),
            "waiters": sql.Identifier(*parts[:-1], f"{name}{WAITERS_SUFFIX}"),
            "sequence_name": sql.Identifier(*sequence_parts),
            # nextval takes the name as text: a regclass literal, quoted as an identifier.
            "sequence": sql.Literal(sql.Identifier(*sequence_parts).as_string(None)),
        }
        out = {
            "acquire": sql.SQL(self.SQL_ACQUIRE).format(**names),
            "acquire_slot": sql.SQL(self.SQL_ACQUIRE_SLOT).format(**names),
            "renew": sql.SQL(self.SQL_RENEW).format(**names),
            "cleanup": sql.SQL(self.SQL_CLEANUP).format(**names),
            "cleanup_queue": sql.SQL(self.SQL_CLEANUP_QUEUE).format(**names),
            "queue": sql.SQL(self.SQL_QUEUE).format(**names),
            "dequeue": sql.SQL(self.SQL_DEQUEUE).format(**names),
            "wake": sql.SQL(self.SQL_WAKE).format(**names),
            "create": sql.SQL(self.SQL_CREATE).format(**names),
            "held": sql.SQL(self.SQL_HELD).format(**names),
            "now": sql.SQL(self.SQL_NOW),
        }
        for column in ("token", "owner"):
            for rows, where in (("", "key = %(key)s"), ("slots_", "key = ANY(%(keys)s::text[])")):
                out[f"release_{rows}{column}"] = sql.SQL(self.SQL_RELEASE).format(
                    column=sql.Identifier(column), rows=sql.SQL(where), **names
                )
        return {name: query.as_bytes(None) for name, query in out.items()}

    # -- the steps ------------------------------------------------------------------------

    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        # Note what the listener has announced for this key so far: a wait that follows
        # a refusal waits for anything after it (see _Listener).
        listener = self._existing_listener()
        self._local.seen = (key, None if listener is None else listener.generation(self._channel(key)))
        # The token names this process: a forked child holding a copy of the HeldLock can
        # neither renew nor release it (_ours), without a table of our tokens to keep.
        token = f"{token}.{os.getpid()}"
        params = {"key": key, "token": token, "owner": owner.as_json(), "ttl": ttl}
        for _ in range(REFUSAL_RETRIES):
            # An attempt whose reply was lost may have been applied: it is released by
            # token once the server answers (a retry with the token is granted it again).
            rows = self._execute(
                self._sql["acquire"], params, key, create=True,
                unsure=lambda sessions: self.late_releases.add(key, token, ttl, sessions),
            )
            if rows and rows[0][0] is not None:
                return Granted(int(rows[0][0]), token=token)
            if rows and rows[0][1] is not None and rows[0][2] > 0:
                return Refused(float(rows[0][2]), _task_id(rows[0][1]))
        return Refused(None)

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused:
        listener = self._existing_listener()
        self._local.seen = (key, None if listener is None else listener.generation(self._channel(key)))
        # The token also carries the limit, for listings (no column of its own: tables
        # made before semaphores serve them unchanged); the pid stays last (_ours).
        token = f"{token}.{limit}.{os.getpid()}"
        task = None if owner.task_id is None else f'"task_id":{json.dumps(owner.task_id)}'
        params = {
            "keys": [self.slot_key(key, slot) for slot in range(limit)], "token": token,
            "owner": owner.as_json(), "ttl": ttl, "task": task,
        }
        # Each lost race is a slot another acquirer took: the next try sees it taken.
        for _ in range(limit + REFUSAL_RETRIES):
            rows = self._execute(
                self._sql["acquire_slot"], params, key, create=True,
                unsure=lambda sessions: self.late_releases.add(key, token, ttl, sessions, limit),
            )
            if rows and rows[0][0] is not None:
                return Granted(int(rows[0][0]), token=token, slot=int(rows[0][1]))
            if rows and rows[0][2] is not None and rows[0][3] > 0:
                return Refused(float(rows[0][3]), _task_id(rows[0][2]))
        return Refused(None)

    def wait(
        self,
        key: str,
        ttl: float,
        *,
        timeout: float | None,
        owner: Owner | None = None,
        refused: Refused | None = None,
        sender: Any = None,
        limit: int = 1,
    ) -> HeldLock | None:
        # The wait's place in the key's queue (see _wait_for_release) is left when it
        # ends, however it ends.
        self._local.queued = None
        self._local.wait_ends = None if timeout is None else time.monotonic() + timeout
        try:
            return super().wait(
                key, ttl, timeout=timeout, owner=owner, refused=refused, sender=sender, limit=limit
            )
        finally:
            self._dequeue()

    def _wait_for_release(self, key: str, timeout: float) -> None:
        """Wait in the key's queue: a release wakes the oldest waiter of the key (one per
        row freed), by its ticket, not every process that waits.

        The first call of a wait (and the first after a release picked this waiter, or
        after the listening connection was replaced) enters the queue, or renews its
        entry, and returns at once: the attempt that follows then comes after the entry,
        so a release either sees the entry or is seen by the attempt. A release whose
        snapshot predates the entry announces itself to every waiter of the key instead,
        and every wait notes what was announced before its attempt (``seen``)."""
        last_key, seen = getattr(self._local, "seen", (None, None))
        self._local.seen = (None, None)
        if last_key != key:
            seen = None
        if self._listen_conninfo is None:
            threading.Event().wait(min(timeout, self.poll_interval))
            return
        listener = _listener_for(self._listen_conninfo, self.connect_timeout)
        channel = self._channel(key)
        session = listener.session(channel)
        if session is None:  # subscribe first: the entry names the listening session
            listener.wait(channel, None, timeout)
            session = listener.session(channel)
            if session is None:
                return
        queued: _Queued | None = getattr(self._local, "queued", None)
        now = time.monotonic()
        if queued is None or queued.key != key or queued.session != session or queued.woken or (
            now >= queued.renew_at
        ):
            self._enqueue(listener, key, session, queued.ticket if queued and queued.key == key else None)
            return
        queued.woken = listener.wait(channel, seen, timeout, queued.ticket)

    def _enqueue(self, listener: _Listener, key: str, session: int, ticket: int | None) -> None:
        wait_ends = getattr(self._local, "wait_ends", None)
        left = QUEUE_TTL if wait_ends is None else max(0.0, wait_ends - time.monotonic())
        entry_ttl = min(QUEUE_TTL, left + MIN_TRY)
        params = {"key": key, "ticket": ticket, "pid": session, "ttl": entry_ttl}
        rows = self._execute(self._sql["queue"], params, key, create=True)
        if rows:
            queued = _Queued(key, int(rows[0][0]), session, time.monotonic() + entry_ttl / 2)
            listener.forget(self._channel(key), queued.ticket)  # a wake-up of before is spent
            self._local.queued = queued

    def _dequeue(self) -> None:
        queued: _Queued | None = getattr(self._local, "queued", None)
        self._local.queued = None
        if queued is None:
            return
        if self._listen_conninfo is not None:
            listener = _listener_for(self._listen_conninfo, self.connect_timeout)
            listener.forget(self._channel(queued.key), queued.ticket)
        try:
            self._execute(self._sql["dequeue"], {"key": queued.key, "ticket": queued.ticket}, queued.key)
        except (LockBackendUnavailable, ConfigurationError) as exc:
            # Releases skip it once its listening session is gone or its time is up.
            logger.debug("leaving the queue of %r failed: %s", queued.key, exc)

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        if not all(_ours(token) for _, token, _ in items):
            mine = [item for item in items if _ours(item[1])]
            outcomes = iter(self._renew(mine) if mine else [])
            return [_ours(token) and next(outcomes) for _, token, _ in items]
        keys = [key for key, _, _ in items]
        tokens = [token for _, token, _ in items]
        ttls = [float(ttl) for _, _, ttl in items]
        budget = min(self.connect_timeout, max(min(ttls) * RENEWAL_SHARE, MIN_TRY))
        rows = self._execute(self._sql["renew"], (keys, tokens, ttls), None, budget=budget)
        renewed = {(row[0], row[1]) for row in rows}
        return [(key, token) in renewed for key, token, _ in items]

    def _release_held(self, held: HeldLock) -> bool:
        return _ours(held.token) and super()._release_held(held)

    def _release(self, key: str, field: str, value: str) -> bool:
        # A slot's release wakes a waiter of its key, in the key's queue and channel.
        return self._release_rows(key.partition(SLOT_MARK)[0], key, field, value)

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        if limit == 1:
            return self._release(key, "owner", owner_json)
        return self._release_slots(key, "owner", owner_json, limit)

    def _release_slots(self, key: str, field: str, value: str, limit: int) -> bool:
        """Release, in one statement, every slot of ``key`` below ``limit`` whose ``field``
        is exactly ``value``."""
        return self._release_rows(key, [self.slot_key(key, slot) for slot in range(limit)], field, value)

    def _release_rows(self, base: str, keys: str | list[str], field: str, value: str) -> bool:
        """Release the row ``keys`` (or each of the rows listed) whose ``field`` is
        ``value``, waking a waiter of ``base`` (the key) per row freed."""
        single = isinstance(keys, str)
        params = {"key" if single else "keys": keys, "value": value, "base": base}
        params["channel"] = self._channel(base)
        column = "token" if field == "token" else "owner"
        statement = self._sql[f"release_{column}" if single else f"release_slots_{column}"]
        # create: a table made before the waiters' queue gets its queue here.
        released = self._execute(statement, params, base, create=True)
        if released and released[0][1]:
            self._wake(base, int(released[0][0]))
        self._maybe_clean_up()
        return bool(released)

    def _wake(self, key: str, count: int) -> None:
        """Wake ``count`` waiters of ``key`` (rows of it were just released)."""
        params = {"key": key, "count": count, "channel": self._channel(key)}
        try:
            self._execute(self._sql["wake"], params, key)
        except (LockBackendUnavailable, ConfigurationError) as exc:
            # The release stands; its waiters try again at their bound (the lease).
            logger.debug("waking a waiter of %r failed: %s", key, exc)

    def close(self) -> None:
        self.late_releases.stop()
        self._pool.close()

    def _sessions_alive(self, sessions: Sequence[int]) -> bool:
        """Whether any of these server sessions (backend pids) still exists."""
        if not sessions:
            return False
        rows = self._execute(SQL_SESSIONS_ALIVE, {"pids": list(sessions)}, None)
        return bool(rows[0][0])

    # -- for operators (celery locks) -----------------------------------------------------

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        start = f"{self.prefix}:"
        full_key = None if key is None else self._full_key(key)
        slots = None if full_key is None else full_key + SLOT_MARK
        params = {"start": start, "key": full_key, "slots": slots}
        rows = self._execute(self._sql["held"], params, key)
        found = []
        for row_key, token, owner, fence, left in rows:
            name, _, slot = row_key[len(start):].partition(SLOT_MARK)
            limit = _limit_of(token)
            found.append(LockInfo(
                key=name, owner=Owner.from_json(owner or ""), token=token,
                fencing_token=int(fence), ttl=float(left),
                slot=int(slot or 0) if limit > 1 else None, limit=limit,
                location=f"{self.url} table {self.table} key {row_key!r}",
            ))
        return found

    def _ping(self) -> list[NodeStatus]:
        """``clock_timestamp()``, twice (the first may connect): the round trip of the
        second, and the server's clock against ours."""
        try:
            for _ in range(2):
                sent = time.time()
                started = time.perf_counter()
                rows = self._execute(self._sql["now"], None, None)
                round_trip = time.perf_counter() - started
        except (LockBackendUnavailable, ConfigurationError) as exc:
            return [NodeStatus(self.url, None, error=str(exc))]
        return [NodeStatus(self.url, round_trip, clock_offset=float(rows[0][0]) - (sent + round_trip / 2))]

    # -- helpers ------------------------------------------------------------------------

    def _channel(self, key: str) -> str:
        # One channel per table and key; a digest fits any key into the 63 bytes of a
        # channel name.
        digest = hashlib.md5(f"{self.table}\0{key}".encode(), usedforsecurity=False).hexdigest()
        return f"csl_{digest}"

    def _existing_listener(self) -> _Listener | None:
        if self._listen_conninfo is None:
            return None
        return _listeners.get(self._listen_conninfo)

    def _maybe_clean_up(self) -> None:
        if not self.cleanup_after or time.monotonic() < self._next_cleanup:
            return
        self._next_cleanup = time.monotonic() + self.cleanup_after / 4 * random.uniform(0.5, 1.5)  # noqa: S311
        try:
            self._execute(self._sql["cleanup"], {"age": self.cleanup_after, "batch": CLEANUP_BATCH}, None)
            self._execute(self._sql["cleanup_queue"], None, None)
        except (LockBackendUnavailable, ConfigurationError) as exc:  # the next one tries again
            logger.debug("clean-up of old free rows failed: %s", exc)

    def _execute(
        self,
        query: bytes,
        params: Any,
        key: str | None,
        *,
        budget: float | None = None,
        unsure: Callable[[Sequence[int]], None] | None = None,
        create: bool = False,
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a pooled connection within ``budget`` seconds (default
        connect_timeout), and return its rows.

        Every statement here may run twice (acquire counts a row holding its own token as
        granted; renewals and releases compare tokens): a connection that breaks is
        replaced and the statement sent again while the budget lasts.

        :param unsure: called when it fails after it may have been applied, with the server
            sessions (backend pids) that were left running it.
        :param create: create the table if it is missing, and run the statement again
            (acquire); otherwise a missing table has no rows (nothing to renew or release).
        :raises LockBackendUnavailable: the server did not answer within the budget.
        """
        deadline = time.monotonic() + (self.connect_timeout if budget is None else budget)
        sent = False
        abandoned: list[int] = []  # server sessions left running the statement
        created = False
        while True:
            try:
                conn = self._pool.take(deadline)
            except _Unreachable as exc:
                if sent and unsure is not None:
                    unsure(abandoned)
                raise self._unavailable(str(exc), key) from None
            conn.deadline = deadline
            # Read now: a connection cut short is closed. Behind a pooler it is not the
            # server's session, and is left out.
            session = 0 if self.pgbouncer else conn.pgconn.backend_pid
            try:
                rows = conn.run(query, params)
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
                self._pool.give(conn)
                continue  # nothing was applied: a concurrent write won; try again
            except pg_errors.UndefinedTable as exc:
                self._pool.give(conn)
                if not create:
                    return []
                if created:
                    raise self._configuration(exc) from None
                self._create_table(deadline, key)
                created = True
                continue
            except psycopg.OperationalError as exc:
                self._pool.give(conn, reusable=False)
                if _is_connection_error(exc):
                    sent = True
                    if session:
                        abandoned.append(session)
                    if time.monotonic() < deadline and not isinstance(exc, pg_errors._WaitTimeout):
                        continue
                    if unsure is not None:
                        unsure(abandoned)
                    raise self._unavailable(_first_line(exc), key) from None
                raise self._refusal(exc, key) from None
            except psycopg.Error as exc:
                self._pool.give(conn)
                raise self._refusal(exc, key) from None
            except BaseException:
                self._pool.give(conn, reusable=False)
                raise
            self._pool.give(conn)
            return rows

    def _create_table(self, deadline: float, key: str | None) -> None:
        """Create the lease table and its sequence (once per backend; concurrent creators
        take turns on a transaction-level advisory lock)."""
        try:
            conn = self._pool.take(deadline)
        except _Unreachable as exc:
            raise self._unavailable(str(exc), key) from None
        conn.deadline = deadline
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"csl-create:{self.table}",))
                conn.execute(self._sql["create"])
        except psycopg.Error as exc:
            self._pool.give(conn, reusable=not _is_connection_error(exc))
            if _is_connection_error(exc):
                raise self._unavailable(_first_line(exc), key) from None
            raise self._configuration(exc) from None
        self._pool.give(conn)
        logger.info("created the lock table %s in %s", self.table, self.url)

    def _unavailable(self, reason: str, key: str | None) -> LockBackendUnavailable | ConfigurationError:
        reason = self._masked(reason)
        if _NO_DATABASE.search(reason):  # the server answered: no outage, a wrong URL
            msg = f"singleton_lock_backend: {reason.rpartition('FATAL:')[2].strip()} ({self.url})"
            return ConfigurationError(msg, option="singleton_lock_backend")
        if "password authentication failed" in reason or "no password supplied" in reason:
            msg = f"PostgreSQL at {self.url} refused our credentials: {reason}"
        elif "Connection refused" in reason:
            msg = f"PostgreSQL at {self.url} refused the connection (is it running?): {reason}"
        elif "certificate verify failed" in reason:
            msg = f"PostgreSQL at {self.url}: its TLS certificate did not verify (sslrootcert?): {reason}"
        elif "FATAL:" in reason:  # it answered, and turned us away (pg_hba.conf, too many clients)
            msg = f"PostgreSQL at {self.url} turned the connection away: {reason}"
        else:
            msg = f"PostgreSQL at {self.url} did not answer within {self.connect_timeout}s: {reason}"
        return LockBackendUnavailable(msg, url=self.url, key=key)

    def _refusal(self, exc: psycopg.Error, key: str | None) -> Exception:
        """The error for the server refusing a statement (not an outage)."""
        reason = self._masked(_first_line(exc))
        if isinstance(exc, pg_errors.InsufficientPrivilege | pg_errors.UndefinedTable):
            return self._configuration(exc)
        if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
            msg = (
                f"PostgreSQL at {self.url} is a read-only standby ({reason}); point "
                "singleton_lock_backend at the primary (target_session_attrs=read-write "
                "picks it among several hosts)"
            )
            return LockBackendUnavailable(msg, url=self.url, key=key)
        if isinstance(exc, pg_errors.ProgramLimitExceeded | pg_errors.DataError):
            msg = f"PostgreSQL refused the key {key!r:.80}: {reason}"
            return LockKeyError(msg, argument="key", key=key)
        if isinstance(exc, pg_errors.InvalidCatalogName | pg_errors.InvalidSchemaName):
            msg = f"singleton_lock_backend: {reason} ({self.url})"
            return ConfigurationError(msg, option="singleton_lock_backend")
        msg = f"PostgreSQL at {self.url} failed the request: {reason}"
        return LockBackendUnavailable(msg, url=self.url, key=key)

    def _configuration(self, exc: psycopg.Error) -> ConfigurationError:
        reason = self._masked(_first_line(exc))
        msg = (
            f"singleton_lock_backend: cannot use the lock table {self.table} in {self.url} "
            f"({reason}). Have its owner create it and let this user use it:\n\n{self.ddl}\n"
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {self.table}, {self.table}{WAITERS_SUFFIX} TO <user>;\n"
            f"GRANT USAGE ON SEQUENCE {self.table}_fence TO <user>;\n"
        )
        return ConfigurationError(msg, option="singleton_lock_backend")

    def _masked(self, text: str) -> str:
        password = _password_of(self._conninfo)
        return text.replace(password, "***") if password else text


class _LateReleases:
    """Releases, by token, of acquisitions whose outcome is unknown.

    An acquire whose reply never came (a timeout, a broken connection) may have been
    applied, or be applied later (a stopped server runs the statement when it resumes):
    that row would stand unheld for a whole TTL. A thread of its own, started on demand,
    releases each such token until the server answers or the TTL has freed it anyway.
    Releasing by token frees that acquisition only; for one never applied it does nothing.

    "Nothing to release" is the answer only once the server sessions that were left
    running the statement have ended: one still waiting (behind a table lock, say) may
    apply it after our release looked. Whether they live is asked before each release,
    so a session that applies the statement and ends between the two is still seen.
    """

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        #: (full key, token) -> (give up at, the server sessions that may still apply it,
        #: the semaphore's limit)
        self._pending: dict[tuple[str, str], tuple[float, tuple[int, ...], int]] = {}
        self._guard = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, key: str, token: str, ttl: float, sessions: Sequence[int] = (), limit: int = 1) -> None:
        """Release ``token``'s acquisition of ``key`` (of any of its ``limit`` slots)."""
        with self._guard:
            if self._pid != os.getpid():  # a forked child: the parent's thread is not here
                self._pending, self._thread, self._pid = {}, None, os.getpid()
            self._pending[(key, token)] = (time.monotonic() + ttl, tuple(sessions), limit)
            if self._thread is None and not self._stopped.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="celery-singleton-lock-pg-late-release", daemon=True
                )
                self._thread.start()

    def pending(self) -> set[tuple[str, str]]:
        with self._guard:
            return set(self._pending)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        pause = LATE_RELEASE_PAUSE[0]
        while True:
            with self._guard:
                now = time.monotonic()
                self._pending = {item: due for item, due in self._pending.items() if due[0] > now}
                if not self._pending or self._stopped.is_set():
                    self._thread = None
                    return
                due = [(key, token, *rest[1:]) for (key, token), rest in self._pending.items()]
            for key, token, sessions, limit in due:
                try:
                    running = self._backend._sessions_alive(sessions)
                    deleted = self._backend._release_slots(key, "token", token, limit) if limit > 1 else (
                        self._backend._release(key, "token", token)
                    )
                except Exception:  # best effort, never a dead thread: the TTL frees it anyway
                    logger.debug("late release of %r failed; trying again", key, exc_info=True)
                    continue
                if running and not deleted:
                    continue  # the statement may yet be applied: release again later
                with self._guard:
                    self._pending.pop((key, token), None)
                if deleted:
                    logger.debug("released %r, taken by an attempt whose reply was lost", key)
            if not self._stopped.wait(pause):
                pause = min(pause * 2, LATE_RELEASE_PAUSE[1])


# -- configuration -----------------------------------------------------------------------


def _check_table(table: object) -> str:
    option = "singleton_lock_backend_options"
    parts = table.split(".") if isinstance(table, str) else []
    if not (1 <= len(parts) <= 2 and all(_IDENTIFIER.fullmatch(p) for p in parts)):
        msg = f"{option}: table must be 'name' or 'schema.name' (no dots or NUL in names), got {table!r}"
        raise ConfigurationError(msg, option=option)
    if any(len(p.encode()) > 63 for p in parts) or len(parts[-1].encode()) > MAX_TABLE_NAME:
        msg = f"{option}: table names are at most {MAX_TABLE_NAME} bytes here, got {table!r}"
        raise ConfigurationError(msg, option=option)
    return str(table)


def _positive(value: object, name: str, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        0 <= value < float("inf") if zero else 0 < value < float("inf")
    ):
        bound = ">= 0" if zero else "> 0"
        msg = f"singleton_lock_backend_options: {name} must be a number of seconds {bound}, got {value!r}"
        raise ConfigurationError(msg, option="singleton_lock_backend_options")
    return float(value)


def _conninfo(url: str, options: dict[str, Any], shown: str) -> str:
    """The libpq connection string for ``url`` and the libpq options given beside it.

    libpq gives up on a silent server only after its TCP retries (minutes); keepalives
    make a listening connection to a vanished server fail within a minute instead.
    """
    defaults = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
    params = {**defaults, **options}
    try:
        given = conninfo_to_dict(url)
        return make_conninfo(url, **{k: v for k, v in params.items() if k not in given or k in options})
    except psycopg.Error as exc:
        option = "singleton_lock_backend_options"
        msg = (
            f"{option}: {_first_line(exc)} for {shown} (the PostgreSQL backend takes "
            f"{', '.join(_OWN_OPTIONS)} and libpq connection parameters)"
        )
        raise ConfigurationError(msg, option=option) from None


def _password_of(conninfo: str) -> str:
    try:
        return str(conninfo_to_dict(conninfo).get("password") or "")
    except psycopg.Error:
        return ""


def _is_connection_error(exc: psycopg.Error) -> bool:
    """True for errors of the connection itself (broken, timed out, terminated), as
    opposed to the server refusing one statement."""
    if isinstance(exc, pg_errors._WaitTimeout):
        return True
    state = exc.sqlstate
    return state is None or state.startswith(_SQLSTATE_CONNECTION)


def _ours(token: str) -> bool:
    """True for a token this process drew (see _try_acquire)."""
    return token.rpartition(".")[2] == str(os.getpid())


def _limit_of(token: str) -> int:
    """The semaphore limit a slot's token carries (``<random>.<limit>.<pid>``); 1 for an
    exclusive lock's (``<random>.<pid>``)."""
    parts = token.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 1


def _task_id(owner_json: str) -> str | None:
    try:
        task_id = json.loads(owner_json).get("task_id")
    except (ValueError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None

