"""ZooKeeper: ``zookeeper://h1:2181,h2:2181,h3:2181/optional/chroot`` (alias ``zk://``).

ZooKeeper is a consensus store: a granted lock survives the loss of a minority of the
ensemble. Each lock is a container node; every acquisition, holder or waiter, is one
ephemeral sequential node in it::

    <chroot>/<prefix>/<key, escaped>                 container (the server removes it empty)
        <token, 32 hex>-<sequence, 10 digits>        ephemeral, one per holder or waiter,
                                                     data "<token>\\n<owner JSON>"

The lowest sequence holds the lock; the others wait in FIFO order, each watching only the
node just before its own, so a release wakes exactly one waiter. The holder's creation
zxid (``czxid``) is its fencing token: zxids order every write of the ensemble, across
leader changes (the epoch is their high half), so a later node of the same key has a
larger one. A node is named by its own token, so only its creator can name it.

**Sessions are the lease.** An ephemeral node lives as long as the session that made it;
a session ends when the server hears nothing of it for the session timeout. A process
keeps one kazoo client (one session) per distinct TTL, whose timeout is the TTL itself
(at least ``MIN_SESSION`` and at most ``MAX_SESSION``), so a SIGKILLed holder's lock is
freed one TTL after the last sign of life, by the server. Within a live process each lock
also keeps the lease of a TTL store: a lock the lease keeper stops renewing (a handle
dropped or untracked, a task past its hard time limit) is deleted by the backend's own
thread one TTL after its last renewal. ``docs/zookeeper.md`` states the bounds and what a
suspended connection means for ``ensure_held()``.

Round trips: an attempt sends the create and the read of the line together (one round
trip); a refused attempt deletes its node in a second one. A renewal is one round trip
per session for all its locks (a ``sync`` and an ``exists`` per lock, pipelined).
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import functools
import hashlib
import importlib
import logging
import math
import os
import queue
import random
import re
import select
import socket
import sys
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from celery_singleton_lock import _native
from celery_singleton_lock._per_process import PerProcess
from celery_singleton_lock.backends._queue import holds, tells_when_held
from celery_singleton_lock.backends.base import MIN_TTL, Granted, LockBackend, LockInfo, Refused
from celery_singleton_lock.backends.owner import Owner, split_stored, stored_task_id
from celery_singleton_lock.errors import (
    ConfigurationError,
    LockBackendUnavailable,
    LockError,
    mask_url,
)
from celery_singleton_lock.lease import HeldLock, LeaseKeeper, clock_drift

try:
    from kazoo.client import KazooClient
    from kazoo.exceptions import (
        AuthFailedError,
        KazooException,
        NoAuthError,
        NodeExistsError,
        NoNodeError,
        SessionExpiredError,
    )
    from kazoo.handlers import utils as kazoo_utils
    from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
    from kazoo.protocol.serialization import Connect, Create2
    from kazoo.protocol.states import KazooState, KeeperState
    from kazoo.retry import KazooRetry
    from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the ZooKeeper backend needs kazoo: pip install 'celery-singleton-lock[zookeeper]'"
    raise ConfigurationError(msg, option="singleton_lock_backend") from exc

__all__ = ["ZooKeeperBackend"]

logger = logging.getLogger("celery_singleton_lock.zookeeper")

DEFAULT_PORT = 2181
#: The shortest session we ask for. kazoo pings an idle connection after up to 0.4 s
#: (its jitter), so a shorter session would expire between two pings; a lock with a
#: shorter TTL shares this session (it is still deleted at its TTL while we live).
MIN_SESSION = 1.0
#: The longest session we ask for. kazoo also waits this long for a silent server while
#: it reconnects, so a longer one would stall a fail-over; locks with a longer TTL are kept
#: by proving the session every third of its timeout instead (see _Janitor).
MAX_SESSION = 600.0
#: The session of a process that only releases on behalf of others (release_owned).
OWNER_SESSION = 30.0
#: A renewal gets this share of the lock's TTL, and never more than connect_timeout: the
#: lease keeper renews after a third of the TTL and retries on failure.
RENEWAL_SHARE = 0.25
MIN_TRY = 0.25
#: ZooKeeper's opcode and flag for a container node (3.5.3+), which kazoo does not offer.
_CREATE_CONTAINER = 19
_CONTAINER_FLAG = 4
_EPHEMERAL_SEQUENTIAL = 3
#: A node of ours: "<token>-<sequence>"; a semaphore's: "<token>-<limit>-<task>-<sequence>"
#: (task: 16 hex digits of the task id's SHA-256, or nothing), so the line's names alone
#: tell who holds a slot (see _queue.py).
_NODE = re.compile(r"([0-9a-f]{32})(?:-(\d{1,4})-([0-9a-f]{16})?)?-(\d{10})")
_TRUE = ("1", "true", "yes", "on")
_CLIENT_OPTIONS = (
    "user", "password", "use_ssl", "ca", "certfile", "keyfile", "keyfile_password",
    "verify_certs", "check_hostname",
)


# -- kazoo on threads of the operating system, also under gevent -------------------------
#
# In a gevent worker (``celery worker -P gevent``) the process is monkey-patched: kazoo's
# threading handler would run its connection in a greenlet, which does not run while a task
# body computes without yielding, so pings stop and the session (the lease) expires under
# the body (measured: a 2 s lock taken by another client 2.5 s into a 6 s busy loop). And
# the lease keeper, an OS thread (see _native.py), cannot wait on gevent primitives of the
# hub's thread. So in a patched process kazoo gets a handler made of the originals: OS
# threads, locks, sockets, poll. Greenlets then wait on its replies cooperatively
# (:class:`_Signal`), never blocking the hub.


def _original(module: str, name: str) -> Any:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


class _NativeCondition:
    """A condition variable of OS locks (``threading.Condition`` takes gevent's when
    patched)."""

    def __init__(self) -> None:
        self._lock = _native.allocate_lock()
        self._waiters: collections.deque[Any] = collections.deque()

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        waiter = _native.allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        try:
            woken = bool(waiter.acquire(True, -1 if timeout is None else max(timeout, 0.0)))
        finally:
            self._lock.acquire()
        if not woken:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return woken

    def notify_all(self) -> None:
        while self._waiters:
            self._waiters.popleft().release()


class _NativeEvent:
    def __init__(self) -> None:
        self._condition = _NativeCondition()
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._condition:
            self._flag = True
            self._condition.notify_all()

    def clear(self) -> None:
        with self._condition:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._condition:
            if not self._flag:
                self._condition.wait(timeout)
            return self._flag


class _NativeQueue:
    """The part of ``queue.Queue`` that kazoo's handler uses, on OS locks."""

    def __init__(self) -> None:
        self._condition = _NativeCondition()
        self._items: collections.deque[Any] = collections.deque()

    def put(self, item: Any) -> None:
        with self._condition:
            self._items.append(item)
            self._condition.notify_all()

    def get(self) -> Any:
        with self._condition:
            while not self._items:
                self._condition.wait()
            return self._items.popleft()

    def task_done(self) -> None:
        pass


class _NativeWorker:
    """A daemon OS thread that kazoo can join."""

    def __init__(self, target: Callable[..., object], args: Any, kwargs: Any) -> None:
        self._done = _NativeEvent()

        def run() -> None:
            try:
                target(*args, **kwargs)
            finally:
                self._done.set()

        _native.NativeThread(run)

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)


def _native_create_connection(address: tuple[str, int], timeout: float | None = None) -> socket.socket:
    """``socket.create_connection`` on the original socket class and resolver (the
    original function would look up gevent's through its module)."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, peer in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = _original("socket", "socket")(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(peer)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock  # type: ignore[no-any-return]
    raise error or OSError(f"cannot resolve {host!r}")


def _native_socket_module() -> types.SimpleNamespace:
    """What kazoo's socket helpers use of the socket module, unpatched."""
    names = (
        "IPPROTO_TCP", "TCP_NODELAY", "SOCK_STREAM", "AF_INET", "SOCK_CLOEXEC", "error", "getdefaulttimeout",
    )
    module = types.SimpleNamespace(**{n: getattr(socket, n) for n in names if hasattr(socket, n)})
    module.socket = _original("socket", "socket")
    module.socketpair = _original("socket", "socketpair")
    module.create_connection = _native_create_connection
    return module


class _NativeHandler(SequentialThreadingHandler):  # type: ignore[misc]  # kazoo is untyped
    """kazoo's threading handler on the originals of a gevent-patched process."""

    name = "celery_singleton_lock_native_handler"
    timeout_exception = KazooTimeoutError
    queue_impl = _NativeQueue
    queue_empty = queue.Empty

    def __init__(self) -> None:
        super().__init__()
        self._state_change = _native.allocate_lock()
        self._sockets = _native_socket_module()
        self._poll = _original("select", "poll")

    @staticmethod
    def sleep_func(seconds: float) -> None:
        _original("time", "sleep")(seconds)

    def select(
        self, rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None = None
    ) -> Any:
        poller = self._poll()
        objects: dict[int, list[Any]] = {}
        for each, mask in [(r, select.POLLIN) for r in rlist] + [(w, select.POLLOUT) for w in wlist]:
            fd = kazoo_utils.fileobj_to_fd(each)
            objects.setdefault(fd, []).append((each, mask))
            poller.register(fd, sum({m for _, m in objects[fd]}))
        ready_r, ready_w = [], []
        for fd, events in poller.poll(None if timeout is None else timeout * 1000):
            for each, mask in objects[fd]:
                if mask == select.POLLIN and events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    ready_r.append(each)
                elif mask == select.POLLOUT and events & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                    ready_w.append(each)
        return ready_r, ready_w, []

    def socket(self) -> Any:
        return kazoo_utils.create_tcp_socket(self._sockets)

    def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        return kazoo_utils.create_tcp_connection(self._sockets, *args, **kwargs)

    def create_socket_pair(self) -> Any:
        return kazoo_utils.create_socket_pair(self._sockets)

    def event_object(self) -> _NativeEvent:
        return _NativeEvent()

    def lock_object(self) -> Any:
        return _native.allocate_lock()

    def async_result(self) -> Any:
        return kazoo_utils.AsyncResult(self, _NativeCondition, KazooTimeoutError)

    def spawn(self, func: Callable[..., object], *args: Any, **kwargs: Any) -> _NativeWorker:
        return _NativeWorker(func, args, kwargs)


def _handler_for_process() -> Any:
    """kazoo's threading handler, or in a gevent-patched process the native one."""
    return _NativeHandler() if _native.patched() else SequentialThreadingHandler()


def _cooperative() -> bool:
    """True in a thread whose gevent hub must keep running while we wait (a greenlet of
    a gevent worker); False in an OS thread of ours or without gevent."""
    if not _native.patched():
        return False
    hub = importlib.import_module("gevent.hub")
    return hub._get_hub() is not None  # gevent's get_hub_if_exists


class _Signal:
    """A wake-up that any thread may set and its creator waits on: an OS lock, or in a
    greenlet a gevent event set on its hub (an OS wait would stop every greenlet)."""

    def __init__(self) -> None:
        self._post = _native.poster() if _cooperative() else None
        if self._post is None:
            self._wakeup = _native.Wakeup()
        else:
            self._event = importlib.import_module("gevent.event").Event()

    def set(self) -> None:
        if self._post is None:
            self._wakeup.set()
        else:
            self._post(self._event.set)

    def wait(self, timeout: float | None) -> bool:
        if self._post is None:
            return self._wakeup.wait(timeout)
        return bool(self._event.wait(timeout))


def _wait(result: Any, timeout: float) -> bool:
    """Wait for a kazoo async result at most ``timeout`` seconds; True once it is ready."""
    if result.ready():
        return True
    if not _cooperative():
        return bool(result.wait(timeout))
    signal = _Signal()
    result.rawlink(lambda _: signal.set())
    return signal.wait(timeout) or bool(result.ready())


class _CreateContainer(Create2):  # type: ignore[misc]  # kazoo is untyped
    """A create2 request whose node is a container (kazoo has no call for it)."""

    type = _CREATE_CONTAINER


class _Dropped(LockBackendUnavailable):
    """The connection failed while a request was out: its outcome is unknown."""


@dataclass
class _Node:
    """A lock node of ours that this process holds."""

    path: str
    session: _Session
    session_id: int
    ttl: float
    #: When the backend deletes it unless renewed (monotonic): its TTL past the last
    #: renewal, as a TTL store would expire it.
    expires_at: float


@dataclass
class _Cleanup:
    """A node of ours that must go once the session answers again: ``path`` when we know
    it, else every node of ``directory`` named by ``token`` (a create whose reply was lost)."""

    session: _Session
    directory: str
    token: str
    path: str | None = None


class _Session:
    """One kazoo client of this process, so one ZooKeeper session, for locks of one TTL.

    It records what the server negotiated (the session timeout), the session id, the last
    connection error (for messages), and when the session was last proved alive.
    """

    def __init__(self, backend: ZooKeeperBackend, timeout: float) -> None:
        self.requested = timeout
        self.negotiated: float | None = None
        self.session_id: int | None = None
        self.last_error = "no server accepted a session yet"
        self.auth_failed = False
        self.warned = False
        #: Sessions this client had that the server ended (their nodes are gone).
        self.expired_ids: set[int] = set()
        #: A monotonic time before which the server cannot have expired the session.
        self.proven_until = -math.inf
        self.last_proof = -math.inf
        self._backend = backend
        self._guard = _native.allocate_lock()
        options = backend._client_options
        handler = _handler_for_process()
        self.client = KazooClient(
            hosts=backend._hosts,
            timeout=timeout,
            handler=handler,
            auth_data=options["auth_data"],
            default_acl=options["acl"],
            # A server that comes back is reconnected to within half a second, never
            # after kazoo's default back-off of up to a minute.
            connection_retry=KazooRetry(
                max_tries=-1, delay=0.05, backoff=1.5, max_delay=0.5, max_jitter=0.2,
                sleep_func=handler.sleep_func,
            ),
            use_ssl=options["use_ssl"],
            ca=options["ca"],
            certfile=options["certfile"],
            keyfile=options["keyfile"],
            keyfile_password=options["keyfile_password"],
            verify_certs=options["verify_certs"],
            check_hostname=options["check_hostname"],
        )
        self._watch_connection()
        self.client.add_listener(self._on_state)
        self.client.start_async()

    def _watch_connection(self) -> None:
        """Learn the negotiated session timeout and the errors of connection attempts,
        which kazoo keeps to itself."""
        connection = self.client._connection
        invoke, connect = connection._invoke, connection._connect

        def recording_invoke(timeout: float, request: Any, xid: int | None = None) -> Any:
            result = invoke(timeout, request, xid)
            if isinstance(request, Connect) and result[0].time_out > 0:
                self.negotiated = result[0].time_out / 1000
                self.session_id = result[0].session_id
            return result

        def recording_connect(host: str, hostip: str, port: int) -> Any:
            try:
                return connect(host, hostip, port)
            except Exception as exc:
                self.last_error = f"{host}:{port}: {exc}"
                raise

        connection._invoke = recording_invoke
        connection._connect = recording_connect
        if isinstance(self.client.handler, _NativeHandler):
            connection._expand_client_hosts = self._expand_hosts

    def _expand_hosts(self) -> list[tuple[str, str, int]]:
        """kazoo's host list, resolved by the C resolver (kazoo asks the socket module's
        getaddrinfo, which is gevent's in a patched process)."""
        found: list[tuple[str, str, int]] = []
        for host, port in self.client.hosts:
            with contextlib.suppress(OSError):
                for info in _socket.getaddrinfo(host.strip(), port, 0, 0, _socket.IPPROTO_TCP):
                    found.append((host.strip(), str(info[4][0]), int(info[4][1])))
        if self.client.randomize_hosts:
            random.shuffle(found)
        return found

    def _on_state(self, state: str) -> None:
        # Called on kazoo's connection thread: it must not block.
        if state == KazooState.LOST:
            if self.client.client_state == KeeperState.AUTH_FAILED:
                self.auth_failed = True
                self.last_error = "the server refused our credentials (AUTH_FAILED)"
            if self.session_id is not None:
                with self._guard:
                    self.expired_ids.add(self.session_id)
                self.session_id = None
        self._backend._janitor_wakeup()

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    def wait_connected(self, deadline: float, clock: Callable[[], float]) -> bool:
        """True once connected; False when ``deadline`` (on ``clock``) passes first."""
        if self.client.connected:
            return True
        remaining = deadline - clock()
        if remaining <= 0 or self.auth_failed:
            return False
        if not _cooperative():
            # kazoo's own event, set while the connection is up (any number of waiters).
            return bool(self.client._live.wait(remaining))
        signal = _Signal()

        def connected(state: str) -> bool:
            if state == KazooState.CONNECTED:
                signal.set()
                return True  # kazoo removes a listener that returns True
            return False

        self.client.add_listener(connected)
        try:
            if not self.client.connected:
                signal.wait(remaining)
        finally:
            self.client.remove_listener(connected)
        return bool(self.client.connected)

    def proved(self, sent_at: float) -> None:
        """A reply to a request sent at ``sent_at`` came back: the server had not expired
        the session then, and cannot before one negotiated timeout later."""
        timeout = self.negotiated or self.requested
        with self._guard:
            if sent_at > self.last_proof:
                self.last_proof = sent_at
                self.proven_until = sent_at + timeout - clock_drift(timeout)

    def close(self, timeout: float) -> None:
        """End the session (its nodes go at once), waiting at most ``timeout`` seconds:
        kazoo's stop waits for its connection thread, which a silent server may hold."""
        client = self.client

        def stop() -> None:
            with contextlib.suppress(Exception):
                client.stop()
                client.close()

        _native.NativeThread(stop)
        waited = 0.0
        while client.connected and waited < timeout:
            time.sleep(0.01)
            waited += 0.01


@dataclass
class _ProcessState:
    """What one process knows: its sessions, its held nodes, nodes left to clean up."""

    pid: int = field(default_factory=os.getpid)
    guard: Any = field(default_factory=_native.allocate_lock)
    sessions: dict[int, _Session] = field(default_factory=dict)
    held: dict[tuple[str, str], _Node] = field(default_factory=dict)
    cleanups: list[_Cleanup] = field(default_factory=list)
    janitor: _Janitor | None = None


class ZooKeeperBackend(LockBackend):
    """Locks on a ZooKeeper ensemble; see the module docstring for the layout.

    :param user: digest user (or in the URL: ``zookeeper://user:password@host``); with a
        user, nodes are created with an ACL that gives that user alone every right.
    :param password: digest password.
    :param use_ssl: TLS to the servers; ``ca``, ``certfile``, ``keyfile``,
        ``keyfile_password``, ``verify_certs`` and ``check_hostname`` as kazoo takes them.
        Also accepted as URL query parameters (``?use_ssl=true&ca=/etc/zk/ca.pem``).
    """

    schemes = ("zookeeper", "zk")
    lease_ttl_is_settable = False  # a node lives by its session, whose timeout is fixed

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        super().check_url(url, option=option)
        if not isinstance(url, str):
            msg = f"{option}: a ZooKeeper URL is one string (zookeeper://h1:2181,h2:2181/chroot)"
            raise ConfigurationError(msg, option=option)
        _parse_url(url, mask_url(url), option=option)

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
        hosts, chroot, options = _parse_url(url, self.url)
        options.update(client_options)
        unknown = sorted(set(options) - set(_CLIENT_OPTIONS))
        if unknown:
            msg = f"unknown ZooKeeper option(s) {', '.join(unknown)}; known: {', '.join(_CLIENT_OPTIONS)}"
            raise ConfigurationError(msg, option="singleton_lock_backend_options")
        self._hosts = hosts
        self._root = f"{chroot}/{_name(prefix)}"
        user, password = options.get("user"), options.get("password")
        credentials = None if user is None else f"{user}:{password or ''}"
        self._client_options: dict[str, Any] = {
            "auth_data": None if credentials is None else [("digest", credentials)],
            "acl": OPEN_ACL_UNSAFE if user is None else [make_digest_acl(user, password or "", all=True)],
            "use_ssl": _flag(options.get("use_ssl", False)),
            "ca": options.get("ca"),
            "certfile": options.get("certfile"),
            "keyfile": options.get("keyfile"),
            "keyfile_password": options.get("keyfile_password"),
            "verify_certs": _flag(options.get("verify_certs", True)),
            "check_hostname": _flag(options.get("check_hostname", False)),
        }
        # Per process: a forked child makes its own sessions, and never renews or releases
        # the nodes of its parent's (a kazoo client made before a fork hangs in the child).
        self._state: PerProcess[_ProcessState] = PerProcess(_ProcessState, _native.allocate_lock)
        #: Watch events that woke a waiter in this process (tests count them).
        self.wakeups = 0

    # -- keys ------------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        # The lock's container node. Escaping '/' keeps "a" from containing "a/b"'s nodes.
        return f"{self._root}/{_name(key)}"

    # -- one attempt -----------------------------------------------------------------------

    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        deadline = self.clock() + self.connect_timeout
        session = self._session(ttl, key, deadline)
        sent_at = self.clock()
        path, stat, children = self._join_line(session, key, token, owner, deadline, sent_at)
        line = _line(children)
        if line and line[0] == _basename(path):
            self._hold_node(session, key, token, path, stat.ephemeralOwner, ttl, sent_at)
            return Granted(stat.czxid)
        # Not first: our node must go (an orphan would hold the line for the session's
        # life, kazoo PR #760). The holder's data names its task.
        holder = session.client.get_async(f"{key}/{line[0]}") if line else None
        self._delete_or_defer(session, key, token, path, deadline)
        task_id = None
        if holder is not None:
            with contextlib.suppress(LockError, KazooException):
                task_id = stored_task_id(self._result(session, holder, deadline, key)[0])
        return Refused(holder_ttl=None, holder_task_id=task_id)

    def _join_line(
        self,
        session: _Session,
        key: str,
        token: str,
        owner: Owner,
        deadline: float,
        sent_at: float,
        limit: int = 1,
    ) -> tuple[str, Any, list[str]]:
        """Create our node in ``key``'s line and read the line, in one round trip.

        :returns: our node's path, its stat and the line's node names.
        """
        value = owner.stored_with(token).encode()
        acl = self._client_options["acl"]
        name = f"{token}-" if limit == 1 else f"{token}-{limit}-{_task_digest(owner.task_id)}-"
        for _ in range(4):  # the line's container, then the prefix, may have to be made first
            create = self._send(session, Create2(f"{key}/{name}", value, acl, _EPHEMERAL_SEQUENTIAL))
            children = session.client.get_children_async(key)
            # One session's replies come in order: once the read is answered, so is the
            # create (one wake-up for both).
            _wait(children, max(0.0, deadline - self.clock()))
            try:
                path, stat = self._result(session, create, deadline, key)
            except NoNodeError:
                self._make_line(session, key, deadline)
                continue
            except SessionExpiredError:
                # Nothing was created; kazoo opens a new session: try in that one.
                if not session.wait_connected(deadline, self.clock):
                    raise self._unavailable(key, "the session expired") from None
                continue
            except (LockError, KazooException):
                self._abandon_create(session, key, token, create)
                raise
            session.proved(sent_at)
            try:
                return path, stat, self._result(session, children, deadline, key)
            except BaseException:
                self._delete_or_defer(session, key, token, path, deadline)
                raise
        msg = f"ZooKeeper at {self.url} kept removing the line of {key!r} while we joined it"
        raise LockBackendUnavailable(msg, url=self.url, key=key)

    def _make_line(self, session: _Session, key: str, deadline: float) -> None:
        """Create the container node of ``key`` (and the prefix node above it)."""
        acl = self._client_options["acl"]
        try:
            container = self._send(session, _CreateContainer(key, b"", acl, _CONTAINER_FLAG))
            self._result(session, container, deadline, key)
        except NodeExistsError:
            return
        except NoNodeError:
            with contextlib.suppress(NodeExistsError):
                self._result(session, session.client.ensure_path_async(self._root, acl), deadline, key)

    def _abandon_create(self, session: _Session, directory: str, token: str, create: Any) -> None:
        """A create we stopped waiting for may still be applied (kazoo sends a request
        queued while disconnected once it reconnects): its node must not stay."""

        def settled(result: Any) -> None:
            if result.successful():
                path = result.value[0]
                session.client.delete_async(path)  # a late reply: remove the node at once
            elif not isinstance(result.exception, (NoNodeError, SessionExpiredError, NoAuthError)):
                # Lost on the way back: it may exist. Look once the session answers again.
                self._defer(_Cleanup(session, directory, token))

        create.rawlink(settled)

    def _delete_or_defer(self, session: _Session, key: str, token: str, path: str, deadline: float) -> None:
        """Delete a node of ours now, or once the session answers again."""
        try:
            self._result(session, session.client.delete_async(path), deadline, key)
        except NoNodeError:
            pass
        except (LockError, KazooException):
            self._defer(_Cleanup(session, key, token, path))

    # -- waiting in line -------------------------------------------------------------------

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
        """Queue a node of our own in ``key``'s line and block until every earlier node is
        gone (FIFO); for a semaphore, until it holds a slot (``_wait_for_room``).

        Only the node just before ours is watched, so a release wakes one waiter. A
        connection lost while we wait costs nothing while it comes back within
        connect_timeout (the session and our place live on); on timeout or error our node
        is removed.
        """
        start = self.clock() + self.connect_timeout
        session = self._session(ttl, key, start)
        data = owner.stored_with(token).encode()
        while True:
            sent_at = self.clock()
            path, stat, children = self._join_line(session, key, token, owner, start, sent_at, limit)
            try:
                # (slot, fencing token, when it was proved), False or None, as _wait_for_room
                outcome: tuple[int | None, int, float] | Literal[False] | None
                if limit > 1:
                    outcome = self._wait_for_room(
                        session, key, path, stat.czxid, data, children, sent_at, deadline
                    )
                else:
                    found_at = self._wait_in_line(session, key, path, children, sent_at, deadline)
                    if found_at is None or found_at is False:
                        outcome = found_at
                    else:
                        outcome = (None, stat.czxid, found_at)  # an exclusive lock: no slot
            except BaseException:
                self._delete_or_defer(session, key, token, path, self.clock() + self.connect_timeout)
                raise
            if outcome is None:  # timed out
                self._delete_or_defer(session, key, token, path, self.clock() + self.connect_timeout)
                return None
            if outcome is not False:
                slot, fencing_token, proved_at = outcome
                self._hold_node(session, key, token, path, stat.ephemeralOwner, ttl, proved_at)
                return Granted(fencing_token, valid_until=proved_at + ttl - clock_drift(ttl), slot=slot)
            # Our node vanished (the session expired while we waited, or an operator
            # deleted it): queue again, at the back.
            start = self.clock() + self.connect_timeout

    def _wait_in_line(
        self,
        session: _Session,
        key: str,
        path: str,
        children: list[str],
        read_at: float,
        deadline: float | None,
    ) -> float | Literal[False] | None:
        """When the read that found us first was sent (monotonic); False if our node
        vanished; None when ``deadline`` passed."""
        ours = _basename(path)
        while True:
            line = _line(children)
            if ours not in line:
                return False
            place = line.index(ours)
            if place == 0:
                return read_at
            woken = _Signal()

            def watch(event: Any, woken: _Signal = woken) -> None:
                woken.set()

            budget = self.clock() + self.connect_timeout
            predecessor = f"{key}/{line[place - 1]}"
            exists, _ = self._read(
                session, functools.partial(session.client.exists_async, predecessor, watch=watch), budget, key
            )
            if exists:
                remaining = None if deadline is None else deadline - self.clock()
                if remaining is not None and remaining <= 0:
                    return None
                if not woken.wait(remaining):
                    return None
                self.wakeups += 1
            # Re-read the line: the node before us may have been a waiter that gave up, and
            # ours must still exist (a wake-up alone proves nothing).
            budget = self.clock() + self.connect_timeout
            children, read_at = self._read(
                session, lambda: session.client.get_children_async(key), budget, key
            )
            session.proved(read_at)

    # -- semaphores (limit > 1) ------------------------------------------------------------
    #
    # One line per key, whatever the limit: a node holds a slot once fewer nodes than its
    # own limit (in its name) are ahead of it and none ahead is of its task (_queue.py).
    # Unlike kazoo's Semaphore, nothing stores the limit for the key, so a deploy that
    # changes it needs no cleanup.

    def slot_key(self, key: str, slot: int | None) -> str:
        # Every slot is a node of the key's line, which this process knows by its token.
        return key

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused:
        """As an exclusive attempt: the create and the read of the line in one round
        trip, a refused node deleted in a second; the line's names decide."""
        deadline = self.clock() + self.connect_timeout
        session = self._session(ttl, key, deadline)
        sent_at = self.clock()
        path, stat, children = self._join_line(session, key, token, owner, deadline, sent_at, limit)
        line = _queued(children)
        index = _index_of(line, _basename(path))
        ahead = line if index is None else line[:index]
        if index is not None and holds(ahead, line[index]):
            self._hold_node(session, key, token, path, stat.ephemeralOwner, ttl, sent_at)
            return Granted(stat.czxid, slot=index)
        twin = bool(owner.task_id) and any(e.task == _task_digest(owner.task_id) for e in ahead)
        holder = None if twin or not ahead else session.client.get_async(f"{key}/{ahead[0].name}")
        self._delete_or_defer(session, key, token, path, deadline)
        task_id = owner.task_id if twin else None
        if holder is not None:
            with contextlib.suppress(LockError, KazooException):
                task_id = stored_task_id(self._result(session, holder, deadline, key)[0])
        return Refused(holder_ttl=None, holder_task_id=task_id)

    def _wait_for_room(
        self,
        session: _Session,
        key: str,
        path: str,
        created: int,
        data: bytes,
        children: list[str],
        read_at: float,
        deadline: float | None,
    ) -> tuple[int, int, float] | Literal[False] | None:
        """(slot, fencing token, when it was proved) once our node holds a slot; False
        if it vanished; None when ``deadline`` passed.

        One wake-up per freed slot: only the first waiter watches the nodes ahead of it
        (an exists watch each, sent together), counting their deletions without a read;
        a waiter behind another that is kept only by its place watches just that node,
        whose data is written again once it holds its slot (or which is deleted), and
        then moves up to watch the nodes ahead.
        """
        ours = _basename(path)
        waited = False
        while True:
            line = _queued(children)
            index = _index_of(line, ours)
            if index is None:
                return False
            ahead, entry = line[:index], line[index]
            if not holds(ahead, entry):
                waited = True
                chained = tells_when_held(ahead, entry)
                watched = ahead[-1:] if chained else ahead
                left = self._watch_nodes(session, key, watched, deadline, ahead, entry)
                if left is None:
                    return None
                if not chained:  # enough of those ahead left: we hold
                    children = [node.name for node in [*left, entry]]
                    continue
                budget = self.clock() + self.connect_timeout
                children, read_at = self._read(
                    session, lambda: session.client.get_children_async(key), budget, key
                )
                session.proved(read_at)
                continue
            if not waited:  # held from the read that queued us: our create is the grant
                return index, created, read_at
            # Held after waiting: write our data again. Its zxid is the fencing token
            # (above every token granted before, however the line moved), the write wakes
            # the waiter behind us, and it proves our node is still there.
            budget = self.clock() + self.connect_timeout
            sent_at = self.clock()
            try:
                stat = self._result(session, session.client.set_async(path, data), budget, key)
            except NoNodeError:
                return False
            session.proved(sent_at)
            return index, stat.mzxid, sent_at

    def _watch_nodes(
        self,
        session: _Session,
        key: str,
        watched: Sequence[_InLine],
        deadline: float | None,
        ahead: Sequence[_InLine],
        entry: _InLine,
    ) -> list[_InLine] | None:
        """Watch ``watched``, the last node of ``ahead`` (a waiter): until it is deleted or
        written again (the line must then be re-read); or all of ``ahead``: until enough
        of them are deleted for ``entry`` to hold. The nodes of ``ahead`` left; None on
        timeout."""
        events: collections.deque[Any] = collections.deque()
        woken = _Signal()

        def watch(event: Any) -> None:
            events.append(event)
            woken.set()

        every = len(watched) == len(ahead)
        left = list(ahead)
        budget = self.clock() + self.connect_timeout
        checks = [
            (node, session.client.exists_async(f"{key}/{node.name}", watch=watch)) for node in watched
        ]
        gone = {node.name for node, check in checks if self._result(session, check, budget, key) is None}
        if gone and not every:
            return left
        left = [node for node in left if node.name not in gone]  # gone before we looked
        while True:
            batch = _drain(events)
            deleted = {_basename(event.path) for event in batch if event.type == "DELETED"}
            written = {_basename(event.path) for event in batch} - deleted
            if not every:
                if batch:
                    self.wakeups += 1
                    return left
            else:
                kept = [node for node in left if node.name not in deleted]
                if len(kept) < len(left):
                    self.wakeups += 1
                left = kept
                if holds(left, entry):
                    return left
                for name in written & {node.name for node in left}:
                    # A waiter ahead (of another limit) wrote itself again: watch on.
                    session.client.exists_async(f"{key}/{name}", watch=watch)
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and remaining <= 0:
                return None
            if not woken.wait(remaining):
                return None

    # -- renewal and release ---------------------------------------------------------------

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        """One round trip per session: a ``sync`` (so the answers are the leader's, not
        a lagging follower's) and an ``exists`` for each lock, pipelined. A lock is still
        ours while its node exists and belongs to the session that made it.

        Bounded by a share of the shortest TTL, not connect_timeout, so a renewal that
        meets a fail-over is retried by the lease keeper while the lease is still proved.
        """
        state = self._state.get()
        with state.guard:
            nodes = [state.held.get((key, token)) for key, token, _ in items]
        budget = min(self.connect_timeout, max(min(ttl for _, _, ttl in items) * RENEWAL_SHARE, MIN_TRY))
        deadline = self.clock() + budget
        by_session: dict[int, list[int]] = {}
        for index, node in enumerate(nodes):
            if node is not None:
                by_session.setdefault(id(node.session), []).append(index)
        found = [False] * len(items)
        sent: list[tuple[_Session, float, list[tuple[int, Any]]]] = []
        for indexes in by_session.values():
            session = nodes[indexes[0]].session  # type: ignore[union-attr]
            key = items[indexes[0]][0]
            if not session.wait_connected(deadline, self.clock):
                raise self._unavailable(key, f"not connected ({session.last_error})")
            sent_at = self.clock()
            session.client.sync_async(self._root)
            checks = [(i, session.client.exists_async(nodes[i].path)) for i in indexes]  # type: ignore[union-attr]
            sent.append((session, sent_at, checks))
        for session, sent_at, checks in sent:
            for index, check in checks:
                node = nodes[index]
                assert node is not None
                try:
                    stat = self._result(session, check, deadline, items[index][0])
                except SessionExpiredError:
                    stat = None
                found[index] = stat is not None and stat.ephemeralOwner == node.session_id
                if found[index]:
                    node.expires_at = sent_at + node.ttl
            session.proved(sent_at)
        return found

    def keep_until(self, held: HeldLock, deadline: float) -> bool:
        """Keep ``held`` taken until ``deadline`` (``throttle``): one renewal proves the
        node ours, then the janitor deletes it at the deadline (as it deletes a node whose
        renewal stopped), with no renewal and no thread of its own meanwhile. A node
        lives by its session, so should this process die first, the key is freed with
        it, early (a TTL node would outlive it, but needs the server's
        ``extendedTypesEnabled`` and counts from the node's last change, not a deadline).

        :returns: False when the lock was no longer ours.
        """
        remaining = deadline - self.clock()
        if remaining < MIN_TTL or held.taken_by != os.getpid() or held.released:
            return self.release(held)
        LeaseKeeper.for_process().untrack(held)
        ours = self.renew([held])[0]
        key = self._full_key(held.key)
        state = self._state.get()
        with state.guard:
            node = state.held.get((key, held.token))
            if node is not None:
                node.expires_at = deadline
            janitor = state.janitor
        held._mark_released()  # the janitor ends it: a later release() has nothing to do
        if not ours or node is None:
            with state.guard:
                state.held.pop((key, held.token), None)
            return False
        if janitor is not None:
            janitor.due(deadline)
        return True

    def _release(self, key: str, field: str, value: str) -> bool:
        state = self._state.get()
        deadline = self.clock() + self.connect_timeout
        if field == "token":
            # Only a node this process made and still holds: a forked child, a forged or
            # foreign token names nothing here.
            with state.guard:
                node = state.held.pop((key, value), None)
            if node is None:
                return False
            while True:
                try:
                    self._result(node.session, node.session.client.delete_async(node.path), deadline, key)
                except (NoNodeError, SessionExpiredError):  # gone, or gone with its session
                    return False
                except _Dropped:
                    # Sent, then the connection failed (it had, say, outlived a pause): a
                    # delete may be sent again, and once kazoo reconnects the server says
                    # whether the node or its session is still there.
                    if self.clock() < deadline:
                        continue
                    self._defer(_Cleanup(node.session, key, value, node.path))
                    raise
                except LockError:
                    self._defer(_Cleanup(node.session, key, value, node.path))
                    raise
                return True
        # By owner (the worker's main process, once a pool process is dead): remove the
        # nodes whose stored owner is exactly that one, holder or queued; True if one was
        # a holder (of the lock, or of a slot). Any session may delete any node (ACLs
        # allowing).
        with state.guard:
            sessions = list(state.sessions.values())
        # Any session of ours will do (none of them owns those nodes); a process that
        # holds no locks (the worker's main process) gets one that pings seldom.
        session = self._session(sessions[0].requested if sessions else OWNER_SESSION, key, deadline)
        try:
            line = _line(self._result(session, session.client.get_children_async(key), deadline, key))
        except NoNodeError:
            return False
        reads = [(name, session.client.get_async(f"{key}/{name}")) for name in line]
        holding = _holders(_queued(line))
        wanted = value.encode()
        released = False
        for place, (name, read) in enumerate(reads):
            try:
                data, stat = self._result(session, read, deadline, key)
            except NoNodeError:
                continue
            _, newline, stored = data.partition(b"\n")
            if not newline or stored != wanted:
                continue
            try:
                delete = session.client.delete_async(f"{key}/{name}", stat.version)
                self._result(session, delete, deadline, key)
            except NoNodeError:
                continue
            with state.guard:
                state.held.pop((key, data.split(b"\n", 1)[0].decode()), None)
            released = released or holding[place]
        return released

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        # One read of the line finds the owner's node, whatever its slot.
        return self._release(key, "owner", owner_json)

    # -- for operators (celery locks) -------------------------------------------------------

    def _reader(self, key: str | None, deadline: float) -> _Session:
        """A session for reads and deletes on behalf of others: any of this process's, or
        one that pings seldom in a process that holds no locks (the command line)."""
        state = self._state.get()
        with state.guard:
            sessions = list(state.sessions.values())
        ttl = sessions[0].requested if sessions else OWNER_SESSION
        return self._session(ttl, key or self._root, deadline)

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """The lines of every lock container (or of one), read pipelined, then each first
        node's data and stat (for a semaphore, every node holding a slot): its czxid is
        the fencing token (a slot's: its mzxid), its ctime when it was made.
        A node lives as long as its holder's session: no TTL is kept on the server."""
        deadline = self.clock() + self.connect_timeout
        session = self._reader(key, deadline)
        if key is None:
            try:
                names, _ = self._read(
                    session, lambda: session.client.get_children_async(self._root), deadline, None
                )
            except NoNodeError:
                return []
            containers = [f"{self._root}/{name}" for name in sorted(names)]
        else:
            containers = [self._full_key(key)]
        reads = [(container, session.client.get_children_async(container)) for container in containers]
        holders = []
        for container, read in reads:
            try:
                line = _queued(self._result(session, read, deadline, key))
            except NoNodeError:
                continue
            holding = _holders(line)
            waiting = holding.count(False)
            holders += [
                (container, place, node, waiting, session.client.get_async(f"{container}/{node.name}"))
                for place, (node, holds_it) in enumerate(zip(line, holding, strict=True)) if holds_it
            ]
        found = []
        for container, place, node, waiting, read in holders:
            try:
                data, stat = self._result(session, read, deadline, key)
            except NoNodeError:
                continue  # released since we read the line
            token, owner = split_stored(data)
            exclusive = node.limit == 1
            found.append(LockInfo(
                # A slot's grant is its node's last write (see _wait_for_room); an
                # exclusive lock's node is written once.
                key=unquote(_basename(container)), owner=owner, token=token,
                fencing_token=stat.czxid if exclusive else stat.mzxid,
                ttl=None, held_since=stat.ctime / 1000, waiting=waiting,
                slot=None if exclusive else place, limit=node.limit,
                location=f"{self.url} {container}/{node.name}",
            ))
        return found

    def _break(self, info: LockInfo) -> bool:
        """Delete the node named by ``info.token`` from any session (a node belongs to its
        creator's session, but any session may delete it, ACLs allowing); the holder's
        next renewal finds it gone."""
        key = self._full_key(info.key)
        state = self._state.get()
        with state.guard:
            ours = (key, info.token) in state.held
        if ours:
            return self._release(key, "token", info.token)
        deadline = self.clock() + self.connect_timeout
        session = self._reader(key, deadline)
        try:
            line = _line(self._result(session, session.client.get_children_async(key), deadline, key))
        except NoNodeError:
            return False
        for name in line:
            if _NODE.fullmatch(name) and name.startswith(f"{info.token}-"):
                try:
                    self._result(session, session.client.delete_async(f"{key}/{name}"), deadline, key)
                except NoNodeError:
                    return False
                return True
        return False

    def close(self) -> None:
        """End this process's sessions: the server deletes their nodes at once, so locks
        still held are freed (their handles then find them lost)."""
        state = self._state.get()
        with state.guard:
            sessions = list(state.sessions.values())
            state.sessions.clear()
            state.held.clear()
            state.cleanups.clear()
            janitor, state.janitor = state.janitor, None
        if janitor is not None:
            janitor.stop()
        for session in sessions:
            session.close(min(self.connect_timeout, 2.0))

    # -- sessions --------------------------------------------------------------------------

    def _session(self, ttl: float, key: str, deadline: float) -> _Session:
        """This process's connected session for locks of ``ttl``, within ``deadline``."""
        timeout = min(max(ttl, MIN_SESSION), MAX_SESSION)
        state = self._state.get()
        with state.guard:
            session = state.sessions.get(round(timeout * 1000))
            if session is None:
                session = state.sessions[round(timeout * 1000)] = _Session(self, timeout)
        if not session.wait_connected(deadline, self.clock):
            raise self._unavailable(key, session.last_error)
        negotiated = session.negotiated
        if negotiated is not None and negotiated != timeout and not session.warned:
            session.warned = True
            logger.warning(
                "ZooKeeper at %s granted sessions of %gs, not the %gs asked for (its "
                "minSessionTimeout/maxSessionTimeout): locks of lock_ttl %gs outlive a dead "
                "holder by %gs",
                self.url, negotiated, timeout, ttl, negotiated,
            )
        return session

    def _hold_node(
        self, session: _Session, key: str, token: str, path: str, session_id: int, ttl: float, sent_at: float
    ) -> None:
        state = self._state.get()
        node = _Node(path, session, session_id, ttl, sent_at + ttl)
        with state.guard:
            state.held[(key, token)] = node
            janitor = state.janitor
            if janitor is None:
                janitor = state.janitor = _Janitor(self, state)
        janitor.due(node.expires_at)

    def _defer(self, cleanup: _Cleanup) -> None:
        state = self._state.get()
        with state.guard:
            state.cleanups.append(cleanup)
            janitor = state.janitor
            if janitor is None:
                janitor = state.janitor = _Janitor(self, state)
        janitor.wake()

    def _janitor_wakeup(self) -> None:
        state = self._state.get()
        janitor = state.janitor
        if janitor is not None:
            janitor.wake()

    # -- plumbing --------------------------------------------------------------------------

    @staticmethod
    def _send(session: _Session, request: Any) -> Any:
        """Queue one request on the session's connection; its kazoo async result.

        Straight to kazoo's connection, for the creates kazoo's own calls do not offer (a
        container) or only through a second thread hop (create2 with its stat). Paths are
        our own (the chroot is part of them), so kazoo's chroot is not involved.
        """
        result = session.client.handler.async_result()
        session.client._call(request, result)
        return result

    def _result(self, session: _Session, result: Any, deadline: float, key: str | None) -> Any:
        """The value of a kazoo async result, waiting until ``deadline`` at most.

        :raises NoNodeError, NodeExistsError, SessionExpiredError: answers the caller
            handles.
        :raises LockBackendUnavailable: no answer in time, the connection dropped, or
            the server refused the request (credentials).
        """
        remaining = deadline - self.clock()
        if not _wait(result, max(remaining, 0.0)):
            raise self._unavailable(key, f"no answer in time ({session.last_error})")
        if result.successful():
            return result.value
        error = result.exception
        if isinstance(error, NoNodeError | NodeExistsError | SessionExpiredError):
            raise error
        if isinstance(error, NoAuthError | AuthFailedError):
            msg = f"ZooKeeper at {self.url} refused our credentials for {key!r}: {type(error).__name__}"
            raise LockBackendUnavailable(msg, url=self.url, key=key)
        if type(error).__name__ in ("ConnectionLoss", "ConnectionClosedError"):
            msg = f"ZooKeeper at {self.url}: the connection dropped ({session.last_error})"
            raise _Dropped(msg, url=self.url, key=key)
        raise self._unavailable(key, f"{type(error).__name__} {error}".strip())

    def _read(
        self, session: _Session, send: Callable[[], Any], deadline: float, key: str | None
    ) -> tuple[Any, float]:
        """A read's value and when it was sent, sending it again if the connection dropped
        under it (kazoo queues it until it reconnects), until ``deadline``."""
        while True:
            sent_at = self.clock()
            try:
                return self._result(session, send(), deadline, key), sent_at
            except _Dropped:
                if self.clock() >= deadline:
                    raise

    def _unavailable(self, key: str | None, why: str) -> LockBackendUnavailable:
        msg = f"ZooKeeper at {self.url} did not answer within {self.connect_timeout}s: {why}"
        return LockBackendUnavailable(msg, url=self.url, key=key)


class _Janitor:
    """The backend's own thread in one process, for what no caller waits on:

    - deletes held nodes whose renewal stopped one TTL ago (as a TTL store would expire
      them; the session would keep them for the process's life);
    - deletes nodes of attempts that did not end holding the lock, once the session
      answers again (replies lost with a dropped connection);
    - declares lost every lock of a session the server ended (LOST), at once;
    - for sessions shorter than their locks' TTL (the server's maxSessionTimeout, or
      MAX_SESSION), proves the session every third of its timeout, and declares its locks
      lost once it can no longer prove the session alive.

    A thread of the operating system, as the lease keeper is (see _native.py).
    """

    def __init__(self, backend: ZooKeeperBackend, state: _ProcessState) -> None:
        self._backend = backend
        self._state = state
        self._wakeup = _native.Wakeup()
        self._wakes_at = math.inf
        self._idle_for: float | None = None
        #: Wake-up calls made for a new due time (benchmarks count them per acquire).
        self.wake_calls = 0
        self._stopped = False
        self._thread = _native.NativeThread(self._run)

    def due(self, at: float) -> None:
        """Something is due at ``at`` (on the backend's clock): wake up if that is sooner."""
        due_in = max(at - self._backend.clock(), 0.0)
        # Learnt here, not by the thread: a lock held only briefly is gone before the
        # thread looks. Idle, the thread then sleeps this long, and a lock like this one
        # taken later is due later: a loop of brief locks needs no wake-up calls.
        self._idle_for = due_in if self._idle_for is None else min(self._idle_for, due_in)
        if at < self._wakes_at:
            self.wake_calls += 1
            self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self) -> None:
        self._stopped = True
        self._wakeup.set()

    def _run(self) -> None:
        while not self._stopped:
            # Busy: whatever becomes due during the round leaves a wake-up call, which the
            # wait below then returns at once for (the round may have looked before it).
            self._wakes_at = -math.inf
            try:
                delay = self._round()
            except Exception:  # it must outlive any bug: log it and go on
                logger.exception("ZooKeeper janitor: round failed; retrying")
                delay = 0.5
            self._wakes_at = math.inf if delay is None else self._backend.clock() + delay
            self._wakeup.wait(delay)

    def _round(self) -> float | None:
        """Do what is due; seconds until something is due next (None: nothing is)."""
        backend, state = self._backend, self._state
        now = backend.clock()
        with state.guard:
            held = list(state.held.items())
            cleanups, state.cleanups = state.cleanups, []
            sessions = list(state.sessions.values())
        lost: list[tuple[str, str, str]] = []
        for (key, token), node in held:
            session = node.session
            if node.session_id in session.expired_ids:
                lost.append((key, token, "its ZooKeeper session expired (the server deleted its node)"))
            elif now >= node.expires_at:
                # Nobody renews it any more: end it as its TTL would.
                lost.append((key, token, ""))
                if session.connected:
                    session.client.delete_async(node.path)
                else:
                    cleanups.append(_Cleanup(session, key, token, node.path))
            elif _short(session, node.ttl) and now >= session.proven_until:
                lost.append((key, token, "its ZooKeeper session could not be proved alive in time"))
        if lost:
            self._declare_lost(lost)
        for session in sessions:
            self._prove(session, now)
        retry = [c for c in cleanups if not self._clean(c)]
        with state.guard:
            state.cleanups.extend(retry)
            later = [n.expires_at for n in state.held.values()]
            later += [
                min(n.session.last_proof + n.session.negotiated / 3, n.session.proven_until)
                for n in state.held.values()
                if n.session.negotiated is not None and n.session.negotiated < n.ttl
            ]
        if retry:
            later.append(now + 0.25)
        if not later:
            # Idle: sleep one more TTL before sleeping until called, so a process that
            # takes and releases locks in a loop never needs a wake-up call (a thread
            # switch per acquire): each new node is due after this wake-up anyway.
            delay, self._idle_for = self._idle_for, None
            return delay
        # Never past the shortest interval told of meanwhile: a brief lock taken while a
        # longer one is held then falls due after this wake-up, and needs no call.
        learnt = self._idle_for
        self._idle_for = max(n.ttl for _, n in held) if held else self._idle_for
        delay = max(0.0, min(later) - backend.clock())
        return delay if learnt is None else min(delay, learnt)

    def _declare_lost(self, lost: list[tuple[str, str, str]]) -> None:
        backend, state = self._backend, self._state
        reasons = {(key, token): reason for key, token, reason in lost}
        with state.guard:
            for key, token, _ in lost:
                state.held.pop((key, token), None)
        keeper = LeaseKeeper.for_process()
        for held in keeper.tracked():
            if held.backend is not backend:
                continue
            reason = reasons.get((backend._full_key(held.key), held.token))
            if reason:  # "": not renewed, so not tracked any more either (a late one)
                keeper.declare_lost(held, reason)

    def _prove(self, session: _Session, now: float) -> None:
        """Prove a session shorter than its locks' TTL, every third of its timeout."""
        negotiated = session.negotiated
        if negotiated is None or not session.connected:
            return
        with self._state.guard:
            needs = any(n.session is session and n.ttl > negotiated for n in self._state.held.values())
        if not needs or now < session.last_proof + negotiated / 3:
            return
        sent_at = self._backend.clock()
        try:
            self._backend._result(
                session, session.client.sync_async(self._backend._root), sent_at + negotiated / 4, None
            )
        except (LockError, KazooException):
            return
        session.proved(sent_at)

    def _clean(self, cleanup: _Cleanup) -> bool:
        """Delete the nodes of ``cleanup``; True when done (or nothing can be left)."""
        session, backend = cleanup.session, self._backend
        if not session.connected:
            return bool(session.client.client_state == KeeperState.CLOSED)  # closed: nothing left
        deadline = backend.clock() + backend.connect_timeout
        try:
            if cleanup.path is not None:
                paths = [cleanup.path]
            else:
                children = backend._result(
                    session, session.client.get_children_async(cleanup.directory), deadline, None
                )
                paths = [
                    f"{cleanup.directory}/{name}" for name in children
                    if name.startswith(cleanup.token + "-")
                ]
            for path in paths:
                with contextlib.suppress(NoNodeError):
                    backend._result(session, session.client.delete_async(path), deadline, None)
        except NoNodeError:
            return True
        except (LockError, KazooException):
            return False
        if paths:
            logger.info("removed %d node(s) of an attempt that did not end holding the lock", len(paths))
        return True


# -- helpers -------------------------------------------------------------------------------


def _name(text: str) -> str:
    """``text`` as one node name: ZooKeeper refuses "/", ".", "..", control and some
    Unicode characters in names, so all but a plain set are %-escaped (UTF-8)."""
    return quote(text, safe=":@=+,;!$&'()*~-_").replace(".", "%2E")


def _basename(path: str) -> str:
    return path.rpartition("/")[2]


def _line(children: Sequence[str]) -> list[str]:
    """Our nodes of a lock, in the order they queued (their sequence numbers)."""
    ours = [name for name in children if _NODE.fullmatch(name)]
    return sorted(ours, key=lambda name: int(name[-10:]))


@dataclass(frozen=True)
class _InLine:
    """A node of a line by its name: its limit (1: an exclusive lock's) and the digest
    of its task id."""

    name: str
    limit: int
    task: str | None


def _queued(children: Sequence[str]) -> list[_InLine]:
    """The line (see :func:`_line`), each node with its limit and task."""
    line = []
    for name in _line(children):
        match = _NODE.fullmatch(name)
        assert match is not None  # _line keeps only these
        line.append(_InLine(name, int(match[2] or 1), match[3]))
    return line


def _index_of(line: Sequence[_InLine], name: str) -> int | None:
    return next((i for i, node in enumerate(line) if node.name == name), None)


def _holders(line: Sequence[_InLine]) -> list[bool]:
    """Which nodes of ``line`` hold the lock or a slot: of an exclusive lock, the first."""
    return [holds(line[:place], node) for place, node in enumerate(line)]


def _task_digest(task_id: str | None) -> str:
    """A task id as it is in a semaphore node's name: 16 hex digits (nothing: no task)."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:16] if task_id else ""


def _drain(events: collections.deque[Any]) -> list[Any]:
    drained = []
    while events:
        drained.append(events.popleft())
    return drained


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return bool(value)


def _short(session: _Session, ttl: float) -> bool:
    """True when the server granted ``session`` a shorter timeout than ``ttl``."""
    return session.negotiated is not None and session.negotiated < ttl


def _parse_url(
    url: str, masked: str, *, option: str = "singleton_lock_backend"
) -> tuple[str, str, dict[str, Any]]:
    """kazoo's hosts string, the chroot ("" or "/a/b") and the options of a URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ZooKeeperBackend.schemes:
        msg = f"{option}: {masked!r} is not a zookeeper:// or zk:// URL"
        raise ConfigurationError(msg, option=option)
    netloc = parts.netloc
    options: dict[str, Any] = dict(parse_qsl(parts.query))
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, password = credentials.partition(":")
        options["user"], options["password"] = unquote(user), unquote(password)
    hosts = []
    for host in filter(None, (h.strip() for h in netloc.split(","))):
        if host.startswith("["):  # [::1]:2181
            address, _, port = host[1:].partition("]")
            hosts.append(f"[{address}]:{port.lstrip(':') or DEFAULT_PORT}")
        else:
            address, _, port = host.partition(":")
            hosts.append(f"{address}:{port or DEFAULT_PORT}")
    if not hosts:
        msg = f"{option}: ZooKeeper URL {masked!r} names no host (zookeeper://h1:2181,h2:2181/chroot)"
        raise ConfigurationError(msg, option=option)
    chroot = unquote(parts.path).rstrip("/")
    segments = chroot.split("/")[1:] if chroot else []
    if any(s in ("", ".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in s) for s in segments):
        msg = f"{option}: the chroot of {masked!r} is not a ZooKeeper path (zookeeper://host/a/b)"
        raise ConfigurationError(msg, option=option)
    return ",".join(hosts), chroot, options
