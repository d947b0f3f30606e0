"""Redis behind Sentinel: ``sentinel://[user:password@]h1:26379,h2:26379,h3:26379/<master>[/db]``.

The Redis backend (backends/redis.py) with one difference: where its connections go.
Every connection is opened to the master the Sentinels name at that moment, so the
scripts, keys, waits and round trips are the Redis backend's own; asking a Sentinel
costs one round trip per new connection, never one per lock. A failover is met in
three ways:

- a thread listens to a Sentinel's ``+switch-master`` announcements: on a switch, every
  connection to the old master is shut down (an idle one fails at its next use and is
  replaced, a waiter blocked in BLPOP there wakes up), so nothing of ours goes on
  writing to the old master, which takes writes until Sentinel demotes it;
- an operation that loses its connection (the master died, or was demoted and answers
  READONLY) asks the Sentinels again and is tried again on the master they name, with
  a fresh token for an acquisition, until it succeeds or ``connect_timeout`` has passed
  since it began: only then is it :class:`LockBackendUnavailable`;
- a waiter whose BLPOP failed tries the lock again at once, on the new master.

The URL's user and password are the data servers' (master and replicas), as in kombu;
the Sentinels' own credentials and TLS go in ``sentinel_kwargs``. Other options go to
every connection to the master (``ssl=True``, ``ssl_ca_certs``...).

``min_replicas=N`` makes an acquisition count only once ``N`` replicas acknowledged it
(``WAIT N``, bounded by ``min_replicas_timeout``), and a renewal count only once they
acknowledged the new TTL; docs/sentinel.md says what this buys and what it costs.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from celery_singleton_lock.backends._hosts import host_list, split_url
from celery_singleton_lock.backends.base import Granted, Refused
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.backends.redis import RedisBackend, ReplyError, ScriptCall
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, LockError

__all__ = ["SentinelAddress", "SentinelBackend", "parse_sentinel_url", "replica_wait", "unacknowledged"]

logger = logging.getLogger("celery_singleton_lock.sentinel")

T = TypeVar("T")

#: The port a Sentinel listens on when the URL names none.
DEFAULT_SENTINEL_PORT = 26379
#: Pauses between the tries of an operation during a failover (doubling), in seconds.
FAILOVER_PAUSE = (0.05, 0.5)
#: Seconds a quiet Sentinel subscription waits before it pings the Sentinel; one that
#: does not answer within ``connect_timeout`` is left for the next Sentinel.
WATCH_PING_INTERVAL = 10.0
#: The channel on which Sentinels announce a new master.
SWITCH_CHANNEL = "+switch-master"


@dataclass(frozen=True)
class SentinelAddress:
    """A ``sentinel://`` URL, parsed.

    :ivar sentinels: ``(host, port)`` of every Sentinel, as written.
    :ivar master_name: the name the Sentinels monitor the master under.
    :ivar db: the database on the master.
    """

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str, *, option: str) -> SentinelAddress:
    """Parse ``sentinel://[user:password@]h1[:port],h2[:port]/<master name>[/db]``.

    A Sentinel without a port listens on 26379; IPv6 addresses are written in brackets.

    :raises ConfigurationError: naming ``option``, the password masked.
    """
    parts, shown = split_url(url, kind="sentinel://", option=option)
    if parts.scheme.lower() != "sentinel":
        msg = f"{option}: {shown!r} is not a sentinel:// URL"
        raise ConfigurationError(msg, option=option)
    if parts.query or parts.fragment:
        msg = (
            f"{option}: {shown!r} has a query or fragment; a sentinel:// URL takes none "
            "(pass options in singleton_lock_backend_options)"
        )
        raise ConfigurationError(msg, option=option)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = host_list(
        hosts, default_port=DEFAULT_SENTINEL_PORT, what="Sentinel", shown=shown, option=option
    )
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    if not segments or not segments[0] or len(segments) > 2 or (len(segments) == 2 and not segments[1]):
        msg = (
            f"{option}: {shown!r} must name the master after the Sentinels, and at most a "
            "database after it: sentinel://h1:26379,h2:26379,h3:26379/mymaster/0"
        )
        raise ConfigurationError(msg, option=option)
    db = segments[1] if len(segments) == 2 else "0"
    if not (db.isascii() and db.isdigit()):
        msg = f"{option}: the database in {shown!r} must be a number (0, 1, 2...), got {db!r}"
        raise ConfigurationError(msg, option=option)
    return SentinelAddress(sentinels, segments[0], int(db), username, password)


class _MasterConnection(SentinelManagedConnection):
    """A connection to the master the Sentinels name, known to its backend's
    :class:`_SwitchWatch`, which interrupts it when the master moves elsewhere."""

    def __init__(self, **kwargs: Any) -> None:
        self.watch: _SwitchWatch = kwargs.pop("switch_watch")
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)  # type: ignore[no-untyped-call]
        self.watch.connections.add(self)

    def interrupt(self) -> None:
        """Wake a thread blocked reading this connection: it reads end of file and fails
        as a lost connection (which it is). Only the socket is shut; the thread that
        owns the connection closes it, so nobody's buffers go away under it."""
        sock = self._sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


#: Every watch of this process, so that a forked child can reset them.
_watches: weakref.WeakSet[_SwitchWatch] = weakref.WeakSet()


def _reset_watches_in_child() -> None:
    for watch in list(_watches):
        watch._after_fork()


os.register_at_fork(after_in_child=_reset_watches_in_child)


class _MasterSSLConnection(_MasterConnection, SentinelManagedSSLConnection):
    """:class:`_MasterConnection` over TLS (``ssl=True``)."""


class _SwitchWatch:
    """A thread of this process that listens to ``+switch-master`` on one Sentinel at a
    time and, when our master moves, interrupts every connection to the old one.

    Started by the first operation of a process (a forked child starts its own), it
    blocks on the subscription; a Sentinel that fails or stays silent through a ping is
    left for the next. After every (re)subscription the Sentinels are asked for the
    master once, so a switch announced while nobody listened is not missed.
    """

    def __init__(self, backend: SentinelBackend, connect_timeout: float) -> None:
        self._backend = weakref.ref(backend)
        self._sentinel = backend.sentinel
        self._master_name = backend.address.master_name
        self._sentinels = list(backend.address.sentinels)
        self._sentinel_options = backend.sentinel_options
        self._connect_timeout = connect_timeout
        self.connections: weakref.WeakSet[_MasterConnection] = weakref.WeakSet()
        self.pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self.master: tuple[str, int] | None = None
        self._guard = threading.Lock()
        self._stopped = threading.Event()
        #: The thread runs in this process (reset in a forked child).
        self.running = False
        self._pubsub: Any = None
        _watches.add(self)

    def _after_fork(self) -> None:
        # The parent's thread is not here, and its guard may have been held by a thread
        # the child does not have.
        self._guard = threading.Lock()
        self._pubsub = None
        self.running = False

    def ensure_running(self) -> None:
        """Start the thread in this process if it is not running yet (callers check
        :attr:`running` first: one attribute read on every operation)."""
        if self._stopped.is_set():
            return
        with self._guard:
            if self.running:
                return
            self.running = True
            self.connections = weakref.WeakSet()  # a forked child's copies are its parent's
            thread = threading.Thread(target=self._run, name="singleton-lock-sentinel-watch", daemon=True)
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        pubsub = self._pubsub
        if pubsub is not None:
            with suppress(Exception):
                pubsub.close()

    def master_moved(self, address: tuple[str, int] | None) -> None:
        """The master is at ``address`` now (None: not known): close idle connections
        to any other address and interrupt the busy ones."""
        self.master = address
        for pool in list(self.pools):
            pool.disconnect(inuse_connections=False)
        for connection in list(self.connections):
            if address is None or (connection.host, connection.port) != address:
                connection.interrupt()

    def _run(self) -> None:
        turn = 0
        while not self._stopped.is_set() and self._backend() is not None:
            host, port = self._sentinels[turn % len(self._sentinels)]
            turn += 1
            try:
                self._listen(host, port)
            except Exception:  # a Sentinel that failed: the next one, after a pause
                logger.debug("Sentinel %s:%s: subscription lost", host, port, exc_info=True)
                if self._stopped.wait(FAILOVER_PAUSE[1]):
                    return

    def _listen(self, host: str, port: int) -> None:
        client = redis.Redis(host=host, port=port, **self._sentinel_options)
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub = pubsub
        try:
            pubsub.subscribe(SWITCH_CHANNEL)
            self._recheck()
            pinged = False
            while not self._stopped.is_set() and self._backend() is not None:
                message = pubsub.get_message(
                    timeout=self._connect_timeout if pinged else WATCH_PING_INTERVAL
                )
                if message is None:
                    if pinged:
                        msg = f"Sentinel {host}:{port} did not answer a ping"
                        raise redis.TimeoutError(msg)
                    pubsub.ping()
                    pinged = True
                    continue
                pinged = False
                if message.get("type") == "message":
                    self._announced(message["data"])
        finally:
            self._pubsub = None
            pubsub.close()
            client.close()

    def _announced(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        fields = text.split()
        if len(fields) == 5 and fields[0] == self._master_name and fields[4].isdigit():
            logger.info(
                "Sentinel: master %r moved from %s:%s to %s:%s", fields[0], *fields[1:]
            )
            self.master_moved((fields[3], int(fields[4])))

    def _recheck(self) -> None:
        try:
            address = self._sentinel.discover_master(self._master_name)  # type: ignore[no-untyped-call]
        except MasterNotFoundError:
            return
        address = (address[0], int(address[1]))
        if self.master is not None and address != self.master:
            self.master_moved(address)
        self.master = address


class _Unacknowledged(LockBackendUnavailable):
    """Fewer replicas than ``min_replicas`` acknowledged a write in time."""


class SentinelBackend(RedisBackend):
    """Locks on the Redis master that a set of Sentinels names; see the module docstring.

    :param min_replicas: an acquisition (and a renewal) counts only once this many
        replicas acknowledged it; 0 (the default) does not wait for them.
    :param min_replicas_timeout: seconds to wait for those acknowledgements (below
        ``connect_timeout``; default 1, or half of it when shorter). An acquisition not
        acknowledged in time is released and tried again on the master the Sentinels
        name, until ``connect_timeout``.
    :param sentinel_kwargs: connection options for the Sentinels themselves
        (``password``, ``ssl``...); their socket timeouts share ``connect_timeout``.
    :param min_other_sentinels: believe a Sentinel only when it sees this many others.
    :param client_options: for the connections to the master (``ssl``, ``username``...).
    """

    schemes = ("sentinel",)  # type: ignore[assignment]  # RedisBackend names three

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        min_replicas: int = 0,
        min_replicas_timeout: float | None = None,
        sentinel_kwargs: dict[str, Any] | None = None,
        min_other_sentinels: int = 0,
        **client_options: Any,
    ) -> None:
        self.address = parse_sentinel_url(url, option="singleton_lock_backend")
        self.min_replicas, self.min_replicas_timeout, self._wait_request = replica_wait(
            min_replicas, min_replicas_timeout, connect_timeout
        )
        _check_count(min_other_sentinels, "min_other_sentinels")
        # Sentinels are asked one after the other: together within connect_timeout.
        share = connect_timeout / len(self.address.sentinels)
        self.sentinel_options: dict[str, Any] = {
            "socket_connect_timeout": share, "socket_timeout": share,
            # One try each: the next Sentinel is the retry, and _through_failover's.
            "retry": Retry(NoBackoff(), 0),
            **(sentinel_kwargs or {}),
        }
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(self.address.sentinels),
            min_other_sentinels=min_other_sentinels,
            sentinel_kwargs=self.sentinel_options,
        )
        self.watch = _SwitchWatch(self, connect_timeout)
        self._stopped = threading.Event()
        # Unknown connection options fail in the Redis backend's constructor.
        super().__init__(url, prefix=prefix, connect_timeout=connect_timeout, clock=clock, **client_options)

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        if not isinstance(url, str):
            msg = f"{option}: a sentinel:// backend takes one URL naming every Sentinel, not a list"
            raise ConfigurationError(msg, option=option)
        parse_sentinel_url(url, option=option)

    def _connection_pool(self, url: str, options: dict[str, Any]) -> redis.ConnectionPool:
        """A pool whose connections go to the master the Sentinels name (see the
        Redis backend's seam of the same name)."""
        pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            self.address.master_name,
            self.sentinel,
            connection_class=_MasterSSLConnection if options.pop("ssl", False) else _MasterConnection,
            switch_watch=self.watch,
            db=self.address.db,
            username=self.address.username,
            password=self.address.password,
            **options,
        )
        self.watch.pools.add(pool)
        return pool

    def _meaning(self, exc: redis.RedisError, key: str | None) -> LockError | None:
        if isinstance(exc, MasterNotFoundError):
            msg = (
                f"no Sentinel of {self.url} names an available master "
                f"{self.address.master_name!r}: {exc}"
            )
            return LockBackendUnavailable(msg, url=self.url, key=key)
        return super()._meaning(exc, key)

    # -- every operation through a failover ----------------------------------------------

    def _through_failover(self, operation: Callable[[], T]) -> T:
        """``operation()``, tried again on the master the Sentinels name after a lost
        connection (or a write the replicas did not acknowledge), until it succeeds or
        ``connect_timeout`` has passed since it began."""
        if not self.watch.running:
            self.watch.ensure_running()
        started = self.clock()
        try:
            return operation()
        except LockBackendUnavailable as error:
            if not _failover_may_explain(error):
                raise
            first = error
        return self._again(operation, started, first)

    def _again(self, operation: Callable[[], T], started: float, error: LockBackendUnavailable) -> T:
        """The tries after the first failed with ``error``: see :meth:`_through_failover`."""
        give_up_at = started + self.connect_timeout
        pause = FAILOVER_PAUSE[0]
        while True:
            if self.clock() + pause >= give_up_at:
                raise error
            logger.debug("no answer from the master (%s); asking the Sentinels again", error)
            self._forget_master()
            if self._stopped.wait(pause):
                raise LockBackendUnavailable(f"{self.url} is closed", url=self.url)
            pause = min(pause * 2, FAILOVER_PAUSE[1])
            try:
                return operation()
            except LockBackendUnavailable as again:
                if not _failover_may_explain(again):
                    raise
                error = again

    def _forget_master(self) -> None:
        """Make the next connection ask the Sentinels, and close connections to a master
        they no longer name."""
        try:
            address = self.sentinel.discover_master(self.address.master_name)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError):
            return
        address = (address[0], int(address[1]))
        if address != self.watch.master:
            self.watch.master_moved(address)

    def _try_acquire(
        self, key: str, token: str, ttl: float, owner: Owner, **marks: bool
    ) -> Granted | Refused:
        return self._failover_acquire(key, token, ttl, owner, 1, marks)

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int, **marks: bool
    ) -> Granted | Refused:
        return self._failover_acquire(key, token, ttl, owner, limit, marks)

    def _failover_acquire(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int, marks: dict[str, bool]
    ) -> Granted | Refused:
        """One attempt at the lock (``limit`` 1) or a slot of the semaphore ``key``,
        through a failover (see :meth:`_through_failover`)."""
        if not self.watch.running:
            self.watch.ensure_running()
        started = self.clock()
        try:
            return self._acknowledged_acquire(key, token, ttl, owner, limit, marks)
        except LockBackendUnavailable as error:
            if not _failover_may_explain(error):
                raise
            first = error

        def attempt() -> Granted | Refused:
            # The first try's outcome is unknown (it is queued for a late release by its
            # token): each next try is a new acquisition with a token of its own.
            this = secrets.token_hex(16)
            result = self._acknowledged_acquire(key, this, ttl, owner, limit, marks)
            if isinstance(result, Granted):
                return replace(result, token=this)
            return result

        return self._again(attempt, started, first)

    def _acknowledged_acquire(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int, marks: dict[str, bool]
    ) -> Granted | Refused:
        if not self.min_replicas:
            if limit == 1:
                return super()._try_acquire(key, token, ttl, owner, **marks)
            return super()._try_acquire_slot(key, token, ttl, owner, limit, **marks)
        if limit == 1:
            call = self.acquire_call(key, token, ttl, owner, **marks)
        else:
            call = self.acquire_slot_call(key, token, ttl, owner, limit, **marks)
        try:
            reply, acknowledged = self._run_and_wait(call)
        except LockBackendUnavailable:
            self.late_releases.add(key, token, ttl, limit)  # it may have been applied
            raise
        result = self.acquire_reply(reply) if limit == 1 else self.acquire_slot_reply(reply)
        if isinstance(result, Granted) and acknowledged < self.min_replicas:
            # Not replicated: a failover now would lose it. It is not ours to use.
            self.late_releases.add(key, token, ttl, limit)
            raise self._unacknowledged(acknowledged, "the lock", key)
        return result

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        def renew() -> list[bool]:
            if not self.min_replicas:
                return super(SentinelBackend, self)._renew(items)
            reply, acknowledged = self._run_and_wait(self.renew_call(items))
            if acknowledged < self.min_replicas:
                # Not counted: a failover now would bring back the TTL before it.
                raise self._unacknowledged(acknowledged, "the renewal", None)
            return self.renew_reply(reply)

        return self._through_failover(renew)

    def _release(self, key: str, field: str, value: str) -> bool:
        if not self.watch.running:
            self.watch.ensure_running()
        started = self.clock()
        try:
            return super()._release(key, field, value)
        except LockBackendUnavailable as error:
            if not _failover_may_explain(error):
                raise
            first = error
        return self._again(lambda: super(SentinelBackend, self)._release(key, field, value), started, first)

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        if limit == 1:  # through _release, and its failover
            return super()._release_by_owner(key, owner_json, limit)
        return self._through_failover(
            lambda: super(SentinelBackend, self)._release_by_owner(key, owner_json, limit)
        )

    def _block(self, key: str, timeout: float) -> bool:
        if not self.watch.running:
            self.watch.ensure_running()
        try:
            return super()._block(key, timeout)
        except LockBackendUnavailable as error:
            if not _failover_may_explain(error):
                raise
            # The master went away under the wait, and a release announced there is gone
            # with it: the lock is tried again at once, on the master named now.
            logger.debug("the wait for %r lost its master (%s); trying the lock again", key, error)
            self._forget_master()
            self._stopped.wait(FAILOVER_PAUSE[0])
            return False

    def _run_and_wait(self, call: ScriptCall) -> tuple[Any, int]:
        """Run ``call`` and ``WAIT`` for the replicas in one round trip, on one lane of the
        Redis backend's hot path (one connection, so WAIT covers this call's writes); the
        reply and the number of replicas that acknowledged.

        :raises LockBackendUnavailable: no usable reply (the call may have been applied).
        """
        wait = self._wait_request
        lane = self._take_lane(call.key)
        try:
            lane.send(call.pack() + wait)
            reply, acknowledged = lane.read(), lane.read()
            if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
                lane.send(call.script.pack_eval(call.keys, call.args) + wait)  # a new server
                reply, acknowledged = lane.read(), lane.read()
        except BaseException as exc:
            lane.close()
            if not isinstance(exc, OSError):
                raise
            self._raise_socket_error(exc, call.key)
        self._give_back(lane)
        for each in (reply, acknowledged):
            if type(each) is ReplyError:
                raise self._reply_error(each, call.key)
        return reply, int(acknowledged)

    def _unacknowledged(self, acknowledged: int, what: str, key: str | None) -> LockBackendUnavailable:
        return unacknowledged(self, acknowledged, what, key)

    def close(self) -> None:
        self._stopped.set()
        self.watch.stop()
        super().close()
        for sentinel in self.sentinel.sentinels:
            sentinel.close()


def replica_wait(
    min_replicas: Any, min_replicas_timeout: Any, connect_timeout: float
) -> tuple[int, float, bytes]:
    """``min_replicas`` and ``min_replicas_timeout`` (None: 1 s, or half of
    ``connect_timeout`` when shorter) checked, and the ``WAIT`` request they make, packed
    once to follow every acknowledged call (Sentinel and Cluster).

    :raises ConfigurationError: naming ``singleton_lock_backend_options``.
    """
    count = _check_count(min_replicas, "min_replicas")
    if min_replicas_timeout is None:
        min_replicas_timeout = min(1.0, connect_timeout / 2)
    if (
        isinstance(min_replicas_timeout, bool)
        or not isinstance(min_replicas_timeout, int | float)
        or not 0 < min_replicas_timeout < connect_timeout
    ):
        msg = (
            "singleton_lock_backend_options: min_replicas_timeout must be a number of "
            f"seconds above 0 and below connect_timeout ({connect_timeout:g}), got "
            f"{min_replicas_timeout!r}"
        )
        raise ConfigurationError(msg, option="singleton_lock_backend_options")
    wait_ms = b"%d" % max(1, round(min_replicas_timeout * 1000))
    replicas = b"%d" % count
    request = b"*3\r\n$4\r\nWAIT\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(replicas), replicas, len(wait_ms), wait_ms,
    )
    return count, float(min_replicas_timeout), request


class _AcknowledgedBy(Protocol):
    url: str
    min_replicas: int
    min_replicas_timeout: float


def unacknowledged(
    backend: _AcknowledgedBy, acknowledged: int, what: str, key: str | None
) -> LockBackendUnavailable:
    """The error of a write that fewer than ``min_replicas`` replicas acknowledged in time:
    it was applied, but does not count."""
    msg = (
        f"{what} was applied by the master of {backend.url}, but only {acknowledged} of "
        f"min_replicas={backend.min_replicas} replicas acknowledged it within "
        f"{backend.min_replicas_timeout:g}s, so it does not count"
    )
    return _Unacknowledged(msg, url=backend.url, key=key)


def _failover_may_explain(error: LockBackendUnavailable) -> bool:
    """Whether a failover may be why ``error`` happened, so that asking the Sentinels
    again may help: a lost or refused connection, READONLY from a demoted master, no
    master named yet, or replicas that did not acknowledge; not refused credentials,
    an exhausted pool, or a master that was reached but did not answer in time (that
    took the whole connect_timeout already)."""
    if isinstance(error, _Unacknowledged):
        return True
    cause = error.__context__
    exhausted = getattr(redis.exceptions, "MaxConnectionsError", ())
    return isinstance(cause, redis.ConnectionError) and not isinstance(cause, exhausted)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        msg = f"singleton_lock_backend_options: {name} must be a whole number, 0 or more, got {value!r}"
        raise ConfigurationError(msg, option="singleton_lock_backend_options")
    return value
