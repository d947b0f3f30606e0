"""Redis Cluster: ``rediscluster://[user:password@]h1:7000,h2:7001,h3:7002[/0][?options]``,
and ``redisclusters://`` for TLS (as ``rediss://`` is to ``redis://``).

The Redis backend (backends/redis.py) with one difference: where each request goes. The
hash tag in our key names (``{prefix:key}``, and ``{prefix:key}:signal``, and any key of
a semaphore's slots) keeps every key of one lock in one cluster slot, so every script
call, as the Redis backend packs it, is sent to the master that owns the slot of its
first key (CRC16 of the hash tag, from a slot table read with ``CLUSTER SLOTS``), on a
lane (connection) of that master's own. The hot path stays one pre-packed EVALSHA per
acquire or release, one round trip; routing costs a CRC16 and a list index.

Where the cluster disagrees with our table:

- ``MOVED`` (the slot has a new owner): the table is patched and read again, and the
  call is sent to the new owner;
- ``ASK`` (the slot is being migrated and the key is already on the target): the call
  is sent once to the target after ``ASKING``;
- ``TRYAGAIN`` (a call of two keys while they are split by a migration: a release, its
  lock and signal list) and ``CLUSTERDOWN``: tried again after short pauses, until
  ``connect_timeout`` has passed since the call began;
- ``NOSCRIPT`` (a master that has not seen the script yet): sent again as EVAL.

Renewal: one request per master per interval, sent to every master before any reply is
read (one round trip in all, not one per master in turn): a script that takes the keys as
arguments (``allow-cross-slot-keys``, Redis 7.0 or later), since the locks one master
holds are in many slots. A lock that script does not find where the table says (it moved,
or is being migrated) is renewed again on its own, routed through MOVED/ASK.

Waiting: the waiter's BLPOP goes to the master that owns the slot. When the slot moves
away, that master ends the BLPOP with MOVED: the waiter re-reads the table and tries the
lock again on its new owner (the waiter's mark moved with the lock), then blocks there.

Replication is asynchronous: see docs/cluster.md for what a failover can do to a lock.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from binascii import crc_hqx
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, NoReturn

import redis
from redis.crc import key_slot

from celery_singleton_lock.backends._hosts import host_list, split_url
from celery_singleton_lock.backends.base import Granted, LockInfo, NodeStatus, Refused
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.backends.redis import (
    MAX_IDLE_LANES,
    Lane,
    RedisBackend,
    ReplyError,
    Script,
    ScriptCall,
    _generation,
    milliseconds,
)
from celery_singleton_lock.backends.sentinel import replica_wait, unacknowledged
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, LockError, mask_url

__all__ = ["ClusterAddress", "ClusterBackend", "parse_cluster_url"]

#: The port a node listens on when the URL names none.
DEFAULT_PORT = 6379
#: Slots of a Redis Cluster.
SLOTS = 16384
#: MOVED and ASK redirections one call follows at most (a slot moved twice in a row is
#: rare; more means the nodes disagree, and the call fails instead of looping).
MAX_REDIRECTS = 5
#: Pauses between the tries of a call refused with TRYAGAIN or CLUSTERDOWN (doubling).
RETRY_PAUSE = (0.01, 0.2)
#: After a MOVED, the whole slot table is read again at most this often (seconds); the
#: one slot named by the MOVED is patched at once in any case.
REFRESH_INTERVAL = 0.5

_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_CLUSTER_SLOTS = ("CLUSTER", "SLOTS")


@dataclass(frozen=True)
class ClusterAddress:
    """A ``rediscluster://`` URL, parsed.

    :ivar nodes: ``(host, port)`` of every startup node, as written.
    :ivar tls: ``redisclusters://``: every connection is TLS.
    :ivar userinfo: the URL's ``user:password`` as written (percent-encoded), or "".
    :ivar query: the URL's options as written, passed to every node's connections.
    """

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    userinfo: str
    query: str

    def node_url(self, host: str, port: int) -> str:
        """The ``redis://`` (or ``rediss://``) URL of one node, with our credentials and options."""
        scheme = "rediss" if self.tls else "redis"
        auth = f"{self.userinfo}@" if self.userinfo else ""
        shown = f"[{host}]" if ":" in host else host
        query = f"?{self.query}" if self.query else ""
        return f"{scheme}://{auth}{shown}:{port}/0{query}"


def parse_cluster_url(url: str, *, option: str) -> ClusterAddress:
    """Parse ``rediscluster://[user:password@]h1[:port],h2[:port][/0][?options]``.

    A node without a port listens on 6379; IPv6 addresses are written in brackets. A
    cluster has one database, 0.

    :raises ConfigurationError: naming ``option``, the password masked.
    """
    parts, shown = split_url(url, kind="rediscluster://", option=option)
    scheme = parts.scheme.lower()
    if scheme not in ClusterBackend.schemes:
        msg = f"{option}: {shown!r} is not a rediscluster:// or redisclusters:// URL"
        raise ConfigurationError(msg, option=option)
    if parts.path.strip("/") not in ("", "0"):
        msg = f"{option}: {shown!r} names a database; a Redis Cluster has only database 0"
        raise ConfigurationError(msg, option=option)
    if parts.fragment:
        msg = f"{option}: {shown!r} has a fragment; a rediscluster:// URL takes none"
        raise ConfigurationError(msg, option=option)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = host_list(hosts, default_port=DEFAULT_PORT, what="node", shown=shown, option=option)
    return ClusterAddress(nodes, scheme == "redisclusters", userinfo, parts.query)


class _Node:
    """One master of the cluster: its address, and the pool whose class and options
    every connection to it is made with (our lanes; redis-py's for operators' calls)."""

    __slots__ = ("address", "client", "pool", "url")

    def __init__(self, address: tuple[str, int], url: str, options: dict[str, Any]) -> None:
        self.address = address
        self.url = mask_url(url)
        self.pool: redis.ConnectionPool = redis.ConnectionPool.from_url(url, **options)
        self.client = redis.Redis.from_pool(self.pool)

    def connect(self, timeout: float | None = None) -> Any:
        """A new, connected redis-py connection to this node (``timeout``: for both
        connecting and each reply, instead of ``connect_timeout``)."""
        kwargs = dict(self.pool.connection_kwargs)
        if timeout is not None:
            kwargs["socket_connect_timeout"] = kwargs["socket_timeout"] = timeout
        connection = self.pool.connection_class(**kwargs)
        connection.connect()
        return connection

    @property
    def label(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _NodeLane(Lane):
    """A lane to one master, which it goes back to."""

    __slots__ = ("node",)

    def __init__(self, connection: Any, node: _Node) -> None:
        super().__init__(connection)
        self.node = node


class _Redirected(LockBackendUnavailable):
    """A cluster's redirection or refusal of a call that was not run: MOVED, ASK,
    TRYAGAIN or CLUSTERDOWN.

    :ivar kind: the first word of the reply.
    :ivar slot: MOVED and ASK: the slot.
    :ivar address: MOVED and ASK: where it is served now.
    """

    def __init__(
        self, msg: str, *, url: str, key: str | None, kind: str, slot: int = -1,
        address: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(msg, url=url, key=key)
        self.kind = kind
        self.slot = slot
        self.address = address


class _NodeRefused(LockBackendUnavailable):
    """A master refused the connection: nothing was sent, so the call may go to the
    master the cluster names once it has failed that one over."""


class _Retries:
    """The pauses between the tries of one call that the cluster turned away for a while
    (TRYAGAIN, CLUSTERDOWN, a master that refuses connections), all within
    ``connect_timeout`` from the first."""

    __slots__ = ("_backend", "_pause", "_started")

    def __init__(self, backend: ClusterBackend) -> None:
        self._backend = backend
        self._started: float | None = None
        self._pause = RETRY_PAUSE[0]

    def pause(self, error: Exception) -> None:
        """Wait before the next try. :raises: ``error`` once the time is up."""
        backend = self._backend
        now = backend.clock()
        self._started = now if self._started is None else self._started
        if now + self._pause - self._started > backend.connect_timeout:
            raise error
        if backend._stopped.wait(self._pause):
            raise LockBackendUnavailable(f"{backend.url} is closed", url=backend.url) from None
        self._pause = min(self._pause * 2, RETRY_PAUSE[1])


def _redirection(reply: ReplyError) -> tuple[str, int, tuple[str, int] | None] | None:
    """(kind, slot, address) of a MOVED or ASK reply; (kind, -1, None) for TRYAGAIN and
    CLUSTERDOWN; None for any other error."""
    text = str(reply)
    kind, _, rest = text.partition(" ")
    if kind in ("MOVED", "ASK"):
        slot, _, where = rest.partition(" ")
        host, _, port = where.rpartition(":")
        return kind, int(slot), (host.strip("[]"), int(port))
    if kind in ("TRYAGAIN", "CLUSTERDOWN"):
        return kind, -1, None
    return None


class ClusterBackend(RedisBackend):
    """Locks on a Redis Cluster; see the module docstring.

    :param min_replicas: an acquisition (and a renewal) counts only once this many
        replicas of the slot's master acknowledged it (``WAIT``, on the connection of
        the call); 0 (the default) does not wait for them. An acquisition not acknowledged
        in time is released and fails with LockBackendUnavailable.
    :param min_replicas_timeout: seconds to wait for those acknowledgements (below
        ``connect_timeout``; default 1, or half of it when shorter).
    :param client_options: for every connection to every node (``ssl_ca_certs``,
        ``username``/``password``...); URL query parameters work too.
    """

    schemes = ("rediscluster", "redisclusters")  # type: ignore[assignment]  # RedisBackend names three

    # ARGV[3i-2] a lock's key, ARGV[3i-1] its token, ARGV[3i] its ttl ms: undeclared keys,
    # since one master's locks are in many slots (a declared key must share one slot)
    # returns per lock 1 (TTL replaced), 0 (not ours, or not here any more) or 2 (this
    # node does not serve its slot now: moved, or being migrated)
    LUA_RENEW_HERE = """#!lua flags=allow-cross-slot-keys
    local ours = {}
    for i = 1, #ARGV, 3 do
      local value = redis.pcall('get', ARGV[i])
      local token = ARGV[i + 1]
      if type(value) == 'table' then
        ours[#ours + 1] = 2
      elseif value and string.sub(value, 1, #token + 1) == token .. ':' then
        redis.call('pexpire', ARGV[i], ARGV[i + 2])
        ours[#ours + 1] = 1
      else
        ours[#ours + 1] = 0
      end
    end
    return ours
    """

    _renew_here_script = Script(LUA_RENEW_HERE)

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        min_replicas: int = 0,
        min_replicas_timeout: float | None = None,
        **client_options: Any,
    ) -> None:
        self.address = parse_cluster_url(url, option="singleton_lock_backend")
        self.min_replicas, self.min_replicas_timeout, self._wait_request = replica_wait(
            min_replicas, min_replicas_timeout, connect_timeout
        )
        self._node_options: dict[str, Any] = {}
        self._nodes: dict[tuple[str, int], _Node] = {}
        #: slot -> the master serving it; None until the table is read
        self._slots: list[_Node | None] = [None] * SLOTS
        self._refreshed_at = -REFRESH_INTERVAL
        #: A connection to a master failed: read the table again before the next call.
        self._stale = False
        self._failed: set[tuple[str, int]] = set()
        self._topology_guard = threading.Lock()
        self._idle: dict[_Node, list[Lane]] = {}
        self._idle_generation = _generation[0]
        #: A node that answered ASK for the next lane this thread takes (a waiter's BLPOP).
        self._asked = threading.local()
        self._stopped = threading.Event()
        # Unknown connection options fail in the Redis backend's constructor.
        super().__init__(url, prefix=prefix, connect_timeout=connect_timeout, clock=clock, **client_options)

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        if not isinstance(url, str):
            msg = f"{option}: a rediscluster:// backend takes one URL naming its startup nodes, not a list"
            raise ConfigurationError(msg, option=option)
        parse_cluster_url(url, option=option)

    def _connection_pool(self, url: str, options: dict[str, Any]) -> redis.ConnectionPool:
        """The first startup node's pool (the Redis backend's seam): the options of
        every node's connections are learnt here."""
        self._node_options = options
        return self._node_at(self.address.nodes[0]).pool

    def _node_at(self, address: tuple[str, int]) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            url = self.address.node_url(*address)
            node = self._nodes.setdefault(address, _Node(address, url, dict(self._node_options)))
        return node

    def for_native_thread(self) -> ClusterBackend:
        clone = super().for_native_thread()
        assert isinstance(clone, ClusterBackend)
        clone._idle = {}
        return clone

    # -- the slot table ---------------------------------------------------------------------

    def _node_of(self, key: str | None) -> _Node:
        """The master serving ``key`` (fully prefixed; None: any master); the slot table
        is read first if it does not know.

        :raises LockBackendUnavailable: no node answered, or none serves that slot.
        """
        node = self._lookup(key)
        if node is None:
            self._refresh(key)
            node = self._lookup(key)
            if node is None:
                msg = f"no master of Redis Cluster {self.url} serves the slot of {key!r}"
                raise LockBackendUnavailable(msg, url=self.url, key=key)
        return node

    def _lookup(self, key: str | None) -> _Node | None:
        if key is None:
            return next((n for n in self._slots if n is not None), None)
        return self._slots[self._slot_of(key)]

    def _slot_of(self, key: str) -> int:
        """The slot of ``key``'s (fully prefixed) lock and of every other key of it."""
        if key and "}" not in key:
            # The hash tag of "{<key>}" is the whole key: CRC16 of it, without the search.
            return crc_hqx(key.encode(), 0) & (SLOTS - 1)
        return key_slot(self._hashed(key).encode())

    def _refresh(self, key: str | None = None) -> None:
        """Read the slot table (``CLUSTER SLOTS``) from the first node that answers:
        known masters first, then the URL's; all of them within ``connect_timeout``.

        :raises LockBackendUnavailable: no node answered.
        """
        with self._topology_guard:
            known = {n.address for n in self._slots if n is not None}
            candidates = [*sorted(known), *(a for a in self.address.nodes if a not in known)]
            # A node that failed us is asked last: it is likely dead, maybe silent.
            candidates.sort(key=lambda address: address in self._failed)
            share = self.connect_timeout / len(candidates)
            failures = []
            for address in candidates:
                node = self._node_at(address)
                try:
                    connection = node.connect(share)
                    try:
                        connection.send_command(*_CLUSTER_SLOTS)
                        ranges = connection.read_response()
                    finally:
                        connection.disconnect()
                except redis.ResponseError as exc:
                    if "cluster support disabled" in str(exc):
                        msg = (
                            f"singleton_lock_backend: {node.label} of {self.url} is not a "
                            "cluster node (use redis:// for one server)"
                        )
                        raise ConfigurationError(msg, option="singleton_lock_backend") from None
                    failures.append(f"{node.label}: {exc}")
                    continue
                except (redis.RedisError, OSError) as exc:
                    failures.append(f"{node.label}: {_why(exc, share)}")
                    continue
                self._slots = self._table(ranges, address)
                self._refreshed_at = self.clock()
                self._stale = False
                self._failed.clear()
                return
        msg = f"no node of Redis Cluster {self.url} answered CLUSTER SLOTS: {'; '.join(failures)}"
        raise LockBackendUnavailable(msg, url=self.url, key=key)

    def _table(self, ranges: Any, asked: tuple[str, int]) -> list[_Node | None]:
        table: list[_Node | None] = [None] * SLOTS
        for start, end, master, *_ in ranges:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            # An empty or "?" endpoint: the node answering is the one we asked.
            node = self._node_at((host, int(master[1])) if host not in ("", "?") else asked)
            table[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
        return table

    def _moved(self, slot: int, address: tuple[str, int]) -> None:
        """A MOVED reply: patch that slot now, and read the whole table again (at most
        every ``REFRESH_INTERVAL``: a reshard moves many slots one after another)."""
        slots = self._slots
        slots[slot] = self._node_at(address)
        if self.clock() - self._refreshed_at >= REFRESH_INTERVAL:
            with suppress(LockBackendUnavailable):  # the patched slot serves meanwhile
                self._refresh()

    def _node_failed(self, node: _Node) -> None:
        """A connection to ``node`` failed: its idle lanes are closed (if it died, all of
        them are dead), and the table is read again before the next call (if it was
        failed over, the cluster names its replica)."""
        self._failed.add(node.address)
        self._stale = True
        for lane in self._idle.pop(node, []):
            lane.close()

    def _refresh_stale(self) -> None:
        """Read the table again after a failed connection, at most every ``REFRESH_INTERVAL``
        (until the cluster has failed the master over, it names the dead one)."""
        if self.clock() - self._refreshed_at >= REFRESH_INTERVAL:
            with suppress(LockBackendUnavailable):
                self._refresh()

    def _masters(self) -> list[_Node]:
        """Every master, from a slot table read now. :raises LockBackendUnavailable:"""
        self._refresh()
        return sorted({n for n in self._slots if n is not None}, key=lambda n: n.address)

    # -- lanes, per master -----------------------------------------------------------------

    def _take_lane(self, key: str | None) -> Lane:
        asked: _Node | None = getattr(self._asked, "node", None)
        if asked is None:
            return self._lane_on(self._node_of(key), key)
        self._asked.node = None
        lane = self._lane_on(asked, key)
        try:
            lane.send(_ASKING)
            lane.read()
        except OSError as exc:
            lane.close()
            self._raise_socket_error(exc, key)
        return lane

    def _lane_on(self, node: _Node, key: str | None) -> Lane:
        """An idle lane to ``node``, or a new one. :raises LockBackendUnavailable:"""
        if self._idle_generation != _generation[0]:  # a forked child: not the parent's
            self._idle, self._idle_generation = {}, _generation[0]
        lanes = self._idle.get(node)
        while lanes:
            try:
                lane = lanes.pop()
            except IndexError:  # another thread took the last one
                break
            if time.monotonic() - lane.used_at < 1.0 or not lane.readable(0):
                return lane
            lane.close()  # the server closed it while it was idle
        try:
            return _NodeLane(node.connect(), node)
        except redis.RedisError as exc:
            error = self._meaning(exc, key)
            if error is None:
                raise
            if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                self._node_failed(node)
            if isinstance(exc.__context__, ConnectionRefusedError):
                raise _NodeRefused(str(error), url=self.url, key=key) from None
            raise error from None

    def _give_back(self, lane: Lane) -> None:
        lanes = self._idle.setdefault(lane.node, [])  # type: ignore[attr-defined]  # a _NodeLane
        if len(lanes) < MAX_IDLE_LANES and self._idle_generation == _generation[0]:
            lane.used_at = time.monotonic()
            lanes.append(lane)
        else:
            lane.close()

    # -- calls, routed -----------------------------------------------------------------------

    def _request(
        self,
        request: bytes,
        key: str | None,
        call: Callable[[], ScriptCall],
        unanswered: Callable[[], None] | None = None,
    ) -> Any:
        """The Redis backend's one round trip, sent to the master serving ``key``'s slot,
        following MOVED and ASK and waiting out TRYAGAIN (see the module docstring)."""
        node = self._slots[self._slot_of(key)] if key is not None and not self._stale else None
        if node is None:
            return self._exchange(request, key, call, unanswered)[0]
        # The hot path: the slot's master is known, and answers.
        try:
            lane = self._lane_on(node, key)
        except _NodeRefused:  # nothing was sent: the way that rides through failovers
            return self._exchange(request, key, call, unanswered)[0]
        try:
            lane.send(request)
            reply = lane.read()
        except BaseException as exc:
            self._lane_failed(lane, node, exc, key, unanswered)
        self._give_back(lane)
        if type(reply) is not ReplyError:
            return reply
        if _redirection(reply) is None and not str(reply).startswith("NOSCRIPT"):
            raise self._reply_error(reply, key)
        # Nothing was run (a redirection, or a master new to the script): the way that
        # follows redirections sends it again.
        return self._exchange(request, key, call, unanswered)[0]

    def _lane_failed(
        self,
        lane: Lane,
        node: _Node,
        exc: BaseException,
        key: str | None,
        unanswered: Callable[[], None] | None,
    ) -> NoReturn:
        """A call on ``lane`` (to ``node``) raised ``exc``: the lane is closed. A socket
        error marks the master failed, tells ``unanswered`` (the call may have run) and
        becomes LockBackendUnavailable; anything else goes on up as it was."""
        lane.close()
        if not isinstance(exc, OSError):
            raise exc
        self._node_failed(node)
        if unanswered is not None:
            unanswered()
        self._raise_socket_error(exc, key)

    def _exchange(
        self,
        request: bytes,
        key: str | None,
        call: Callable[[], ScriptCall],
        unanswered: Callable[[], None] | None = None,
        *,
        acknowledged: bool = False,
    ) -> tuple[Any, int]:
        """:meth:`_request`, and with ``acknowledged`` a ``WAIT`` for ``min_replicas``
        behind the call in the same round trip; the reply and how many replicas
        acknowledged (0 without ``acknowledged``)."""
        asking: _Node | None = None
        redirects = 0
        retries = _Retries(self)
        tail = self._wait_request if acknowledged else b""
        while True:
            if self._stale:
                self._refresh_stale()
            node = asking or self._node_of(key)
            try:
                lane = self._lane_on(node, key)
            except _NodeRefused as refused:
                # Nothing was sent: once the cluster has failed that master over, the
                # table names its replica. Tried again until connect_timeout.
                retries.pause(refused)
                asking = None
                continue
            head = _ASKING if asking is not None else b""
            try:
                reply, replicas = self._round_trip(lane, head + request + tail, head, tail, call)
            except BaseException as exc:
                self._lane_failed(lane, node, exc, key, unanswered)
            self._give_back(lane)
            if type(reply) is not ReplyError:
                if type(replicas) is ReplyError:
                    raise self._reply_error(replicas, key)
                return reply, int(replicas)
            redirection = _redirection(reply)
            if redirection is None:
                raise self._reply_error(reply, key)
            kind, slot, address = redirection
            asking = None
            if address is not None:  # MOVED or ASK: the call was not run; it goes there
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise self._reply_error(reply, key)
                if kind == "MOVED":
                    self._moved(slot, address)
                else:
                    asking = self._node_at(address)
                continue
            # TRYAGAIN (a migration splits the call's keys) or CLUSTERDOWN: not run; soon.
            retries.pause(self._reply_error(reply, key))

    @staticmethod
    def _round_trip(
        lane: Lane, request: bytes, head: bytes, tail: bytes, call: Callable[[], ScriptCall]
    ) -> tuple[Any, Any]:
        """Send ``request`` (``head``: ASKING, then the call, then ``tail``: a WAIT) and
        read its replies: the call's, and the WAIT's (0 without one). A master that has
        not run the script yet gets it again as EVAL."""

        def send(packed: bytes) -> tuple[Any, Any]:
            lane.send(packed)
            if head:
                lane.read()  # ASKING's OK
            reply = lane.read()
            return reply, lane.read() if tail else 0

        reply, replicas = send(request)
        if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
            again = call()
            reply, replicas = send(head + again.script.pack_eval(again.keys, again.args) + tail)
        return reply, replicas

    def _try_acquire(
        self, key: str, token: str, ttl: float, owner: Owner, *, waiting: bool = False,
        woken: bool = False,
    ) -> Granted | Refused:
        if not self.min_replicas:
            return super()._try_acquire(key, token, ttl, owner, waiting=waiting, woken=woken)
        call = self.acquire_call(key, token, ttl, owner, waiting=waiting, woken=woken)
        reply, replicas = self._exchange(
            call.pack(), key, lambda: call, lambda: self.late_releases.add(key, token, ttl),
            acknowledged=True,
        )
        result = self.acquire_reply(reply)
        if isinstance(result, Granted) and replicas < self.min_replicas:
            # Not replicated: a failover now would lose it. It is not ours to use.
            self.late_releases.add(key, token, ttl)
            raise unacknowledged(self, replicas, "the lock", key)
        return result

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int, *, waiting: bool = False,
        woken: bool = False,
    ) -> Granted | Refused:
        if not self.min_replicas:
            return super()._try_acquire_slot(key, token, ttl, owner, limit, waiting=waiting, woken=woken)
        call = self.acquire_slot_call(key, token, ttl, owner, limit, waiting=waiting, woken=woken)
        reply, replicas = self._exchange(
            call.pack(), key, lambda: call, lambda: self.late_releases.add(key, token, ttl, limit),
            acknowledged=True,
        )
        result = self.acquire_slot_reply(reply)
        if isinstance(result, Granted) and replicas < self.min_replicas:
            self.late_releases.add(key, token, ttl, limit)  # as _try_acquire's
            raise unacknowledged(self, replicas, "the semaphore slot", key)
        return result

    def _reply_error(self, reply: ReplyError, key: str | None) -> Exception:
        redirection = _redirection(reply)
        if redirection is None:
            return super()._reply_error(reply, key)
        kind, slot, address = redirection
        msg = f"Redis Cluster {self.url} did not run a call of {key!r}: {reply}"
        return _Redirected(msg, url=self.url, key=key, kind=kind, slot=slot, address=address)

    def _block(self, key: str, timeout: float) -> bool:
        for _ in range(MAX_REDIRECTS):
            try:
                return super()._block(key, timeout)
            except _Redirected as redirected:
                if redirected.kind == "ASK" and redirected.address is not None:
                    # The slot is being migrated, the signal list is not here: block on
                    # the target, which serves it after ASKING.
                    self._asked.node = self._node_at(redirected.address)
                    continue
                if redirected.kind == "MOVED" and redirected.address is not None:
                    # The slot moved under the wait: the lock is tried again at once, on
                    # its new owner, and the wait goes there.
                    self._moved(redirected.slot, redirected.address)
                else:
                    self._stopped.wait(RETRY_PAUSE[0])
                return False
            except LockBackendUnavailable as error:
                if not isinstance(error.__context__, redis.ConnectionError):
                    raise
                # The master went away under the wait (a release announced there may be
                # gone with it): the lock is tried again, on the master named next.
                self._node_failed(self._node_of(key))
                self._stopped.wait(RETRY_PAUSE[0])
                return False
        return False

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        """One request per master, all sent before any reply is read; a lock not found
        where the table said is renewed again on its own, routed."""
        if self._stale:
            self._refresh_stale()
        groups: dict[_Node, list[int]] = {}
        for index, (key, _, _) in enumerate(items):
            groups.setdefault(self._node_of(key), []).append(index)
        ours = [False] * len(items)
        for index in self._renew_on_masters(items, groups, ours):
            key, token, ttl = items[index]
            call = ScriptCall(self._renew_script, [self._hashed(key)], [token, milliseconds(ttl)], key)
            reply, replicas = self._exchange(
                call.pack(), key, functools.partial(_same, call), acknowledged=bool(self.min_replicas)
            )
            if replicas < self.min_replicas:
                raise unacknowledged(self, replicas, "the renewal", key)
            ours[index] = reply == [1]
        return ours

    def _renew_on_masters(
        self, items: Sequence[tuple[str, str, float]], groups: dict[_Node, list[int]], ours: list[bool]
    ) -> list[int]:
        """Renew each master's ``groups`` of ``items`` in one script call on each, all sent
        before any reply is read; set ``ours`` where renewed; the indexes of the items
        not found where the table said."""
        tail = self._wait_request if self.min_replicas else b""
        again: list[int] = []
        sent: list[tuple[Lane, list[int], ScriptCall]] = []
        current: _Node | None = None  # the master being written to or read from
        try:
            for node, indexes in groups.items():
                current = node
                args: list[Any] = []
                for index in indexes:
                    key, token, ttl = items[index]
                    args += [self._hashed(key), token, milliseconds(ttl)]
                call = ScriptCall(self._renew_here_script, [], args, None)
                lane = self._lane_on(node, None)
                sent.append((lane, indexes, call))
                lane.send(call.pack() + tail)
            due = time.monotonic() + self.connect_timeout
            while sent:
                lane, indexes, call = sent[0]
                current = lane.node  # type: ignore[attr-defined]  # a _NodeLane
                reply = lane.read_within(due - time.monotonic())
                replicas = lane.read_within(due - time.monotonic()) if tail else 0
                if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
                    lane.send(call.script.pack_eval(call.keys, call.args) + tail)
                    reply = lane.read_within(self.connect_timeout)
                    replicas = lane.read_within(self.connect_timeout) if tail else 0
                sent.pop(0)
                self._give_back(lane)
                for each in (reply, replicas):
                    if type(each) is ReplyError:
                        raise self._reply_error(each, None)
                if replicas < self.min_replicas:
                    # Not counted: a failover now would bring back the TTL before it.
                    raise unacknowledged(self, replicas, "the renewal", None)
                for index, flag in zip(indexes, reply, strict=True):
                    if flag == 1:
                        ours[index] = True
                    else:
                        again.append(index)
        except LockError:  # a LockBackendUnavailable is an OSError too: not the socket's
            raise
        except OSError as exc:
            if current is not None:
                self._node_failed(current)
            self._raise_socket_error(exc, None)
        finally:
            for lane, _, _ in sent:
                lane.close()
        return again

    def close(self) -> None:
        self._stopped.set()
        idle, self._idle = self._idle, {}
        if self._idle_generation == _generation[0]:
            for lanes in idle.values():
                for lane in lanes:
                    lane.close()
        for node in list(self._nodes.values()):
            node.client.close()
        super().close()

    # -- for operators (celery locks) --------------------------------------------------------

    def _on(self, node: _Node) -> RedisBackend:
        """This backend as the Redis backend's operators' calls see one server: ``node``."""
        view = copy.copy(self)
        view._client = node.client
        view.url = node.url
        return view

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """The Redis backend's listing, on the master serving ``key``, or on every master."""
        if key is not None:
            return list(RedisBackend._held(self._on(self._node_of(self._full_key(key))), key))
        found: list[LockInfo] = []
        for node in self._masters():
            found += RedisBackend._held(self._on(node), None)
        return found

    def _ping(self) -> list[NodeStatus]:
        """Every master (from a slot table read now): its round trip and clock offset."""
        try:
            masters = self._masters()
        except LockError as exc:
            return [NodeStatus(self.url, None, error=str(exc))]
        statuses: list[NodeStatus] = []
        for node in masters:
            statuses += RedisBackend._ping(self._on(node))
        return statuses


def _same(call: ScriptCall) -> ScriptCall:
    """``call`` itself: with functools.partial, the lazy call of a call already made."""
    return call


def _why(exc: BaseException, timeout: float) -> str:
    """Why a node did not answer, in a few words."""
    if isinstance(exc, redis.TimeoutError | TimeoutError):
        return f"did not answer within {timeout:.3g}s"
    if isinstance(exc.__context__, ConnectionRefusedError) or isinstance(exc, ConnectionRefusedError):
        return f"refused the connection ({exc})"
    return str(exc)
