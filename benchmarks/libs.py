"""One adapter per lock library, all used the way each library documents.

Every adapter offers the same three steps, so the scenarios treat them alike:

``try_acquire(key, ttl)``               one non-blocking attempt: a handle or None
``acquire_blocking(key, ttl, timeout)`` the library's own way of waiting: a handle or None
``release(handle)``                     True when the lock was still ours

and those that count slots (ours, kazoo's ``Semaphore``) two more, for a key of ``limit``
holders at once (``limit=1`` being the library's exclusive lock):

``try_acquire_slot(key, ttl, limit)``               one non-blocking attempt
``acquire_slot_blocking(key, ttl, limit, timeout)`` waiting the library's own way

Every peer talks to the server through ``redis.Redis.from_url(url)`` with redis-py's
default options (celery-once builds exactly that client from the URL itself);
celery-singleton-lock gets the same URL through its ``connect``. The ZooKeeper peers
get the hosts of the same ``zookeeper://`` URL: a ``KazooClient`` with kazoo's defaults
(its 10 s session timeout given explicitly), or one bare socket.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import redis

#: Display names, in table order.
LABELS = {
    "socket": "bare socket, SET NX PX + DEL (floor)",
    "raw": "raw redis-py (SET NX PX + DEL)",
    "ours": "celery-singleton-lock",
    "redis-py": "redis-py Lock",
    "python-redis-lock": "python-redis-lock",
    "pottery": "pottery Redlock (1 master)",
    "celery-once": "celery-once Redis backend",
    "ours-redlock": "celery-singleton-lock Redlock (3 masters)",
    "pottery-redlock": "pottery Redlock (3 masters)",
    "zk-socket": "bare socket, jute create + delete (floor)",
    "zk-raw": "raw kazoo create-ephemeral-sequential + delete",
    "zk-raw-line": "raw kazoo create | getChildren + delete",
    "ours-zk": "celery-singleton-lock ZooKeeper",
    "kazoo": "kazoo Lock recipe",
    "kazoo-semaphore": "kazoo Semaphore recipe (Lock recipe for limit=1)",
}

#: How each library waits for a held lock (the "wait" column).
WAIT_STYLE = {
    "socket": "n/a (no blocking mode)",
    "raw": "n/a (no blocking mode)",
    "ours": "BLPOP on a per-key signal list, bounded by holder TTL; the releaser yields",
    "redis-py": "polls SET NX every 0.1 s (its default sleep)",
    "python-redis-lock": "BLPOP on a per-key signal list, bounded by expire",
    "pottery": "polls, random sleep 0-0.2 s (its retry delay)",
    "celery-once": "none of its own: we loop raise_or_lock with a 10 ms sleep",
    "ours-redlock": "BLPOP on the key's first live herald master, bounded by holder TTL",
    "pottery-redlock": "polls, random sleep 0-0.2 s (its retry delay)",
    "zk-socket": "n/a (no blocking mode)",
    "zk-raw": "n/a (no blocking mode)",
    "zk-raw-line": "n/a (no blocking mode)",
    "ours-zk": "watch on the node just before its own",
    "kazoo": "watch on the node just before its own",
    "kazoo-semaphore": "a lock on the semaphore (as kazoo's Lock), then a watch on its leases",
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


class BareSocket:
    """The physical floor: the same two commands as :class:`RawLoop` written pre-packed
    to one TCP socket, replies read with one ``recv`` each; no client library at all."""

    name = "socket"

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        db = (parts.path or "/0").strip("/") or "0"
        self.sock.sendall(b"*2\r\n$6\r\nSELECT\r\n$%d\r\n%s\r\n" % (len(db), db.encode()))
        if not self.sock.recv(64).startswith(b"+OK"):
            raise Unavailable("SELECT failed")

    def try_acquire(self, key: str, ttl: float) -> bytes | None:
        name = key.encode()
        ms = b"%d" % int(ttl * 1000)
        self.sock.sendall(
            b"*6\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$32\r\n%s\r\n$2\r\nNX\r\n$2\r\nPX\r\n$%d\r\n%s\r\n"
            % (len(name), name, os.urandom(16).hex().encode(), len(ms), ms)
        )
        return name if self.sock.recv(64).startswith(b"+OK") else None

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> bytes | None:
        raise NotImplementedError("the bare socket loop has no blocking mode")

    def release(self, handle: bytes) -> bool:
        self.sock.sendall(b"*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n" % (len(handle), handle))
        return self.sock.recv(64) == b":1\r\n"

    def redis_key(self, key: str) -> str:
        return key

    def close(self) -> None:
        self.sock.close()


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

    def try_acquire_slot(self, key: str, ttl: float, limit: int) -> Any:
        return self.backend.acquire(key, ttl=ttl, blocking=False, limit=limit)

    def acquire_slot_blocking(self, key: str, ttl: float, limit: int, timeout: float) -> Any:
        return self.backend.acquire(key, ttl=ttl, blocking=True, timeout=timeout, limit=limit)

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


# -- ZooKeeper ----------------------------------------------------------------------------

#: kazoo's default session timeout, given explicitly: a kazoo session is per client, so
#: the peers' locks live as long as this (ours maps each lock's ttl onto a session).
KAZOO_SESSION_S = 10.0


def zk_hosts(url: str) -> tuple[str, str]:
    """``("h1:p1,h2:p2", "/chroot")`` from ``zookeeper://h1:p1,h2:p2/chroot``."""
    rest = url.split("://", 1)[1]
    hosts, slash, chroot = rest.partition("/")
    return hosts, (slash + chroot).rstrip("/")


def zk_path(key: str) -> str:
    """The lock node a peer uses for ``key`` (ZooKeeper paths take ``:``, not ``/``)."""
    return "/bench-locks/" + key.replace("/", "_")


class ZooKeeperSocket:
    """The physical floor: one TCP connection, a session handshake, then a blocking
    create (ephemeral sequential) and a delete in ZooKeeper's jute encoding, nothing
    else: no client thread, no retries, no watches. Two requests per cycle.

    Frames are ``int32 length`` + body; a request body is ``int32 xid, int32 opcode``
    + the record, a reply ``int32 xid, int64 zxid, int32 err`` + the record.
    """

    name = "zk-socket"
    CREATE, DELETE, PING, CLOSE_SESSION = 1, 2, 11, -11
    EPHEMERAL_SEQUENTIAL = 3
    NODE_EXISTS = -110
    #: ACL list of one entry: perms ALL (31), id world:anyone (kazoo's default too)
    OPEN_ACL = struct.pack(">ii", 1, 31) + struct.pack(">i", 5) + b"world" + struct.pack(
        ">i", 6) + b"anyone"

    def __init__(self, url: str) -> None:
        hosts, self.chroot = zk_hosts(url)
        host, port = hosts.split(",")[0].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # ConnectRequest: protocol 0, last zxid 0, timeout ms, session 0, 16-byte password
        self._send(struct.pack(">iqiqi16s?", 0, 0, int(KAZOO_SESSION_S * 1000), 0, 16,
                               bytes(16), False))
        self._frame()
        self.xid = 0
        self._parents: set[bytes] = set()

    def _send(self, body: bytes) -> None:
        self.sock.sendall(struct.pack(">i", len(body)) + body)

    def _frame(self) -> bytes:
        (size,) = struct.unpack(">i", self._read(4))
        return self._read(size)

    def _read(self, size: int) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise ConnectionError("ZooKeeper closed the connection")
            buf += chunk
        return bytes(buf)

    def _call(self, opcode: int, record: bytes) -> tuple[int, bytes]:
        self.xid += 1
        self._send(struct.pack(">ii", self.xid, opcode) + record)
        reply = self._frame()
        _xid, _zxid, err = struct.unpack_from(">iqi", reply)
        return err, reply[16:]

    @staticmethod
    def _string(value: bytes) -> bytes:
        return struct.pack(">i", len(value)) + value

    def _create(self, path: bytes, flags: int) -> tuple[int, bytes]:
        record = self._string(path) + struct.pack(">i", -1) + self.OPEN_ACL + struct.pack(">i", flags)
        err, body = self._call(self.CREATE, record)
        return err, body[4:] if not err else b""

    def try_acquire(self, key: str, ttl: float) -> bytes:
        parent = (self.chroot + zk_path(key)).encode()
        if parent not in self._parents:  # once per key, outside the steady state
            for i in range(2, len(parent.split(b"/")) + 1):
                err, _ = self._create(b"/".join(parent.split(b"/")[:i]), 0)
                if err not in (0, self.NODE_EXISTS):
                    raise RuntimeError(f"create parent failed: error {err}")
            self._parents.add(parent)
        err, path = self._create(parent + b"/n-", self.EPHEMERAL_SEQUENTIAL)
        if err:
            raise RuntimeError(f"create failed: error {err}")
        return path

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> bytes | None:
        raise NotImplementedError("the socket floor has no blocking mode")

    def release(self, handle: bytes) -> bool:
        err, _ = self._call(self.DELETE, self._string(handle) + struct.pack(">i", -1))
        return err == 0

    def ping(self) -> None:
        """One heartbeat (xid -2, opcode 11): the server's plain round trip."""
        self._send(struct.pack(">ii", -2, self.PING))
        self._frame()

    def close(self) -> None:
        try:
            self._call(self.CLOSE_SESSION, b"")
        finally:
            self.sock.close()


class _Kazoo:
    """One started ``KazooClient`` (kazoo's threading handler) per adapter."""

    def __init__(self, url: str) -> None:
        try:
            from kazoo.client import KazooClient
        except ImportError as exc:
            raise Unavailable(f"kazoo is not installed: {exc}") from exc
        hosts, chroot = zk_hosts(url)
        self.client = KazooClient(hosts=hosts + chroot, timeout=KAZOO_SESSION_S)
        self.client.start(timeout=15)

    def close(self) -> None:
        self.client.stop()
        self.client.close()


class KazooRaw(_Kazoo):
    """The kazoo floor: ``create(ephemeral=True, sequence=True)`` then ``delete``: two
    requests, no queue check (it never looks whether an older node exists)."""

    name = "zk-raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._parents: set[str] = set()

    def try_acquire(self, key: str, ttl: float) -> str:
        parent = zk_path(key)
        if parent not in self._parents:
            self.client.ensure_path(parent)
            self._parents.add(parent)
        return str(self.client.create(parent + "/n-", ephemeral=True, sequence=True))

    def acquire_blocking(self, key: str, ttl: float, timeout: float) -> str | None:
        raise NotImplementedError("the raw loop has no blocking mode")

    def release(self, handle: str) -> bool:
        self.client.delete(handle)
        return True


class KazooRawLine(KazooRaw):
    """The least a correct sequential-node lock sends through kazoo: the create and a
    read of the line sent together (one round trip; the lowest node holds the lock),
    then the delete. Three requests, two of them writes; it checks nothing more."""

    name = "zk-raw-line"

    def try_acquire(self, key: str, ttl: float) -> str | None:
        parent = zk_path(key)
        if parent not in self._parents:
            self.client.ensure_path(parent)
            self._parents.add(parent)
        create = self.client.create_async(parent + "/n-", ephemeral=True, sequence=True)
        line = self.client.get_children_async(parent)
        path = str(create.get())
        if min(line.get()) != path.rpartition("/")[2]:
            self.client.delete(path)
            return None
        return path


class KazooLock(_Kazoo):
    """kazoo's ``client.Lock(path, identifier)`` recipe, as its docs show: one ``Lock``
    object per lock path, made once and acquired again and again. Its lifetime is the
    client's session (:data:`KAZOO_SESSION_S`), not ``ttl``."""

    name = "kazoo"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._locks: dict[str, Any] = {}
        self._identifier = f"{socket.gethostname()}:{os.getpid()}"

    def _lock(self, key: str) -> Any:
        if key not in self._locks:
            self._locks[key] = self.client.Lock(zk_path(key), self._identifier)
        return self._locks[key]

    def try_acquire(self, key: str, ttl: float) -> Any:
        lock = self._lock(key)
        return lock if lock.acquire(blocking=False) else None

    def acquire_blocking(self, key: str, ttl: float, timeout: float | None) -> Any:
        from kazoo.exceptions import LockTimeout

        lock = self._lock(key)
        try:
            return lock if lock.acquire(blocking=True, timeout=timeout) else None
        except LockTimeout:  # its way of saying "not within timeout"
            return None

    def release(self, handle: Any) -> bool:
        return bool(handle.release())


class KazooSemaphore(KazooLock):
    """kazoo's ``client.Semaphore(path, identifier, max_leases=limit)`` recipe, one object
    per path and limit, made once, as :class:`KazooLock` does with ``Lock``; for
    ``limit=1`` its ``Lock`` recipe itself, what kazoo offers for one holder at a time.
    The limit lives in the path's data, so a path keeps the limit it was first given."""

    name = "kazoo-semaphore"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._semaphores: dict[tuple[str, int], Any] = {}

    def _slots(self, key: str, limit: int) -> Any:
        if limit == 1:
            return self._lock(key)
        if (key, limit) not in self._semaphores:
            self._semaphores[key, limit] = self.client.Semaphore(
                zk_path(key), self._identifier, max_leases=limit)
        return self._semaphores[key, limit]

    def try_acquire_slot(self, key: str, ttl: float, limit: int) -> Any:
        slots = self._slots(key, limit)
        return slots if slots.acquire(blocking=False) else None

    def acquire_slot_blocking(self, key: str, ttl: float, limit: int, timeout: float) -> Any:
        from kazoo.exceptions import LockTimeout

        slots = self._slots(key, limit)
        try:
            return slots if slots.acquire(blocking=True, timeout=timeout) else None
        except LockTimeout:  # its way of saying "not within timeout"
            return None


class OursZooKeeper(Ours):
    """celery-singleton-lock on ZooKeeper: ``connect("zookeeper://127.0.0.1:PORT")``."""

    name = "ours-zk"


ADAPTERS: dict[str, type] = {
    "socket": BareSocket,
    "raw": RawLoop,
    "ours": Ours,
    "redis-py": RedisPyLock,
    "python-redis-lock": PythonRedisLock,
    "pottery": PotteryRedlock,
    "celery-once": CeleryOnce,
    "ours-redlock": OursRedlock,
    "pottery-redlock": PotteryRedlockMasters,
    "zk-socket": ZooKeeperSocket,
    "zk-raw": KazooRaw,
    "zk-raw-line": KazooRawLine,
    "ours-zk": OursZooKeeper,
    "kazoo": KazooLock,
    "kazoo-semaphore": KazooSemaphore,
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
