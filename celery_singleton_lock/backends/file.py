"""One host, no server: ``file:///path/to/dir``, locks that the kernel frees when their
holder dies.

Every key is one file in the directory, named by the SHA-256 of the prefixed key (keys
come from task arguments: they never become paths). Two open file description (OFD)
locks on it, from ``fcntl(F_OFD_SETLK)``, do the work::

    byte 0  HOLD   held, exclusively, for as long as a process holds the lock; the
                   kernel drops it the moment the holder's last descriptor closes, which
                   a SIGKILL, a segfault or the OOM killer do too
    byte 1  GUARD  held for a few system calls by whoever reads or rewrites the record
                   (shared to read, exclusive to write)

    file content   {"key": ..., "fence": ..., "value": "<token>\\n<owner JSON>", ...}

OFD locks belong to an open file description, not to a process: every acquisition opens
the file anew, so two threads of one process exclude each other (classic POSIX ``fcntl``
locks would not), and no ``close()`` of another descriptor of the file drops them.

**The kernel is the lease.** A lock is held while its holder's descriptor is open. The
lease keeper's renewal (``_renew``) only checks that it still is: the descriptor is
ours, the path still names that file, and the record still names our token. ``lock_ttl``
has no part in liveness: a holder that lives but is stuck keeps the lock until it dies
(see docs/file.md).

**Message markers keep their TTL.** An owner without a process (``Owner.of_message``:
``enqueue_once``'s queued markers, beat's slot claims) stands for a queued message that
outlives the process that wrote it, and is cleared by another process. Such a lock is a
record with an expiry and no HOLD, like a key with a TTL in Redis.

**Waiting** (``_wait_turn``): one thread per process and key blocks in
``F_OFD_SETLKW``, which the kernel wakes when the holder releases or dies, and hands the
lock to this process's waiters in FIFO order. A waiter that times out leaves; the thread
stays blocked until the lock is free, then lets it go, and ends when nobody waits.

**Semaphores** (``limit`` N > 1): slot 0 is HOLD itself, slot n the byte ``1 + n``,
all in the key's one file; the record names slot 0's holder as before and the others in
``slots``, and ``high`` keeps the key's fencing tokens rising across slots. An attempt
takes GUARD for writing and asks each slot's byte without waiting (the lowest free one,
and whether the owner's task id holds another). A wait cannot block on "any of N bytes"
with one lock request (a request waits for every conflict in its range to end), so each
process that waits runs one watcher thread per slot, blocked in ``F_OFD_SETLKW`` on its
byte: the kernel grants a freed byte to exactly one blocked description, whichever slot
is freed first, by release or death, and that watcher hands it to the room's first
waiter. Blocked requests cannot be cancelled: after the last waiter left, the watchers
stay blocked until their slot frees, then let it go at once and end; an attempt that
meets a slot passing through a watcher looks again (``_PASSING_RESCANS``).

**Fork.** A forked child shares its parent's open file descriptions, locks included:
an explicit unlock in the child would free the parent's lock, and a child that kept the
descriptor would keep the lock alive after its parent died. So every descriptor is
opened ``O_CLOEXEC`` and recorded, and a fork closes all of them in the child (closing
a shared description's copy releases nothing); the child holds and releases nothing of
its parent's. Recording waits for a fork in progress, so no descriptor slips through.

Fencing tokens are ``max(last + 1, wall clock in microseconds)``, stored in the record;
the file is never deleted, so the counter outlives every release.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import stat
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from celery_singleton_lock import _native
from celery_singleton_lock.backends.base import SLOT_MARK, Granted, LockBackend, LockInfo, Refused
from celery_singleton_lock.backends.owner import Owner, split_stored
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, LockError
from celery_singleton_lock.lease import HeldLock, clock_drift

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["NETWORK_FILESYSTEMS", "FileBackend", "default_directory", "filesystem_type"]

logger = logging.getLogger("celery_singleton_lock.acquire")

OPTION = "singleton_lock_backend"

#: Filesystems whose directory several hosts may share, where a lock taken on one host
#: does not reliably exclude a process on another, or is freed only at a server-side
#: lease expiry (NFS, SMB), or is not supported at all (9p, vboxsf).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ncpfs", "coda", "ceph",
    "glusterfs", "lustre", "gpfs", "beegfs", "orangefs", "vboxsf", "vmhgfs", "davfs",
    "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.rclone",
    "fuse.vmhgfs-fuse", "fuse.davfs2", "fuse.gcsfuse", "fuse.juicefs",
})

_HOLD = 0
_GUARD = 1
# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padded to the
# alignment of off_t as the C struct is.
_FLOCK = "hhqqi0q"
#: The longest record we read (a 1 KiB key, a long task id and the owner fit many times).
_MAX_RECORD = 1 << 20
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
#: Times an attempt reopens a lock file that was replaced under it before giving up.
_REOPENS = 5


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # pragma: no cover - not Linux: markers then never outlive a reboot check
        return ""


#: This boot of the machine: a marker's expiry is on CLOCK_BOOTTIME, which restarts at boot.
_BOOT = _boot_id()


def _now() -> float:
    """Seconds on the host-wide clock that markers expire by: never stepped, counts suspend."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


def _supported() -> str | None:
    """Why this platform cannot run the backend, or None."""
    if fcntl is None or not hasattr(fcntl, "F_OFD_SETLK"):
        return (
            f"{OPTION}: file:// needs open file description locks (Linux 3.15 or later); "
            f"this is {sys.platform}: use a lock server (redis://, etcd://, ...)"
        )
    return None


def _is_marker(owner: Owner) -> bool:
    """An owner that is a queued message, not a process (``Owner.of_message``): its lock
    outlives the process that took it, so it is a record with a TTL, not a kernel lock."""
    return owner.pid == 0 and not owner.host


def _lock(fd: int, byte: int, kind: int, *, wait: bool) -> bool:
    """Set an OFD lock of ``kind`` (F_WRLCK, F_RDLCK, F_UNLCK) on one byte; False if
    another description holds a conflicting one and ``wait`` is False."""
    arg = struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock_all(fd: int) -> None:
    """Drop every lock of ``fd``'s description (HOLD or whichever slot's byte it holds)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))


@contextlib.contextmanager
def _guarded(fd: int, *, write: bool) -> Iterator[None]:
    """Hold the record's guard byte for a few system calls. Only ever taken last (never
    while waiting for HOLD), so holders of it never wait for anything."""
    _lock(fd, _GUARD, fcntl.F_WRLCK if write else fcntl.F_RDLCK, wait=True)
    try:
        yield
    finally:
        _lock(fd, _GUARD, fcntl.F_UNLCK, wait=False)


def _slot_byte(slot: int) -> int:
    """The byte whose lock is semaphore slot ``slot``: HOLD for slot 0 (the exclusive
    lock's own), then the bytes after GUARD."""
    return _HOLD if slot == 0 else _GUARD + slot


def _slot_of(key: str) -> int:
    """The slot number in a slot record's key (``LockBackend.slot_key``): 0 for a key."""
    return int(key.partition(SLOT_MARK)[2]) if SLOT_MARK in key else 0


def _hold_taken(fd: int, byte: int = _HOLD) -> bool:
    """Whether any other open file description holds ``byte`` (HOLD, or a slot's),
    asked without taking it."""
    asked = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, asked)
    return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)


def _same_file(fd: int, path: str) -> bool:
    """True if ``path`` still names the file ``fd`` is open on (not deleted or replaced)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


# -- the record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """The holder of semaphore slot 1 or above (slot 0's is the record's own fields)."""

    value: str
    fence: int
    limit: int

    @property
    def token(self) -> str:
        return self.value.partition("\n")[0]

    @property
    def owner_json(self) -> str:
        return self.value.partition("\n")[2]


@dataclass(frozen=True)
class _Record:
    """A lock file's content. ``value`` is ``owner.stored_with(token)``, or "" when free.

    The fields name slot 0's holder (the exclusive lock's); ``slots`` the holders of a
    semaphore's other slots, each held by its own byte (``_slot_byte``): an entry whose
    byte nobody holds is a dead holder's, free.
    """

    key: str = ""
    fence: int = 0
    value: str = ""
    ttl: float = 0.0
    #: A message marker's expiry on ``_now()`` (None: the kernel holds it), of boot ``boot``.
    expires: float | None = None
    boot: str = ""
    #: The semaphore limit slot 0 was taken with (1: an exclusive lock).
    limit: int = 1
    #: The highest fencing token a slot above 0 was given (``fence`` is slot 0's own).
    high: int = 0
    slots: dict[int, _Slot] = field(default_factory=dict, hash=False)

    def next_fence(self) -> int:
        """A fencing token above every earlier one of the key, all slots counted."""
        return max(self.fence + 1, self.high + 1, time.time_ns() // 1000)

    def token_of(self, slot: int) -> str:
        if not slot:
            return self.token
        entry = self.slots.get(slot)
        return "" if entry is None else entry.token

    def task_id_of(self, slot: int) -> str | None:
        value = self.value if slot == 0 else getattr(self.slots.get(slot), "value", "")
        return _task_id_in(value)

    def cleared_slot(self, slot: int) -> _Record:
        if slot == 0:
            return self.cleared()
        return replace(self, slots={n: e for n, e in self.slots.items() if n != slot})

    @property
    def token(self) -> str:
        return self.value.partition("\n")[0]

    @property
    def owner_json(self) -> str:
        return self.value.partition("\n")[2]

    @property
    def task_id(self) -> str | None:
        return _task_id_in(self.value)

    @property
    def is_marker(self) -> bool:
        return self.expires is not None

    def marker_left(self) -> float:
        """Seconds a marker has left (0 when expired, from another boot, or not a marker)."""
        if self.expires is None or self.boot != _BOOT:
            return 0.0
        return max(0.0, self.expires - _now())

    def cleared(self) -> _Record:
        """Slot 0 freed (the other slots' holders stay)."""
        return _Record(key=self.key, fence=self.fence, ttl=self.ttl, high=self.high, slots=self.slots)


def _task_id_in(value: str) -> str | None:
    """The owner's task id in a stored value (``"<token>\n<owner JSON>"``)."""
    try:
        task_id = json.loads(value.partition("\n")[2]).get("task_id")
    except (ValueError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None


def _fence_time(fence: int) -> float | None:
    """When a fencing token was given, where it is the clock's (microseconds)."""
    return fence / 1e6 if fence > 10**15 else None


def _granted_record(record: _Record, slot: int, key: str, value: str, ttl: float, limit: int) -> _Record:
    """``record`` with slot ``slot`` given to ``value`` (``owner.stored_with(token)``),
    under a fencing token above every earlier one of the key."""
    fence = record.next_fence()
    if slot == 0:
        return replace(record, key=key, fence=fence, value=value, ttl=ttl, expires=None, boot="", limit=limit)
    return replace(record, key=key, high=fence, slots={**record.slots, slot: _Slot(value, fence, limit)})


class _Passing:
    """A slot's byte held with no holder written: a watcher between the kernel's grant
    and its next step (see :meth:`FileBackend._take_free_slot`)."""


_PASSING = _Passing()
#: Looks again at a semaphore whose only untaken-looking slots were passing through a
#: watcher: a watcher that nobody waits for any more lets its slot go a few system calls
#: after the kernel woke it, and a refusal then would turn away a call with a slot free.
_PASSING_RESCANS = 5


def _refuse_marker_slots(owner: Owner, limit: int) -> None:
    if _is_marker(owner):
        msg = (
            f"limit: a message marker (Owner.of_message) is a record with a TTL on file://, "
            f"not a kernel lock; it takes limit=1, not {limit}"
        )
        raise ConfigurationError(msg, option="limit")


def _read(fd: int) -> _Record:
    """The record in ``fd``'s file (call with the guard held). A file that is empty, or
    unreadable after a crash of the machine, is a free lock whose counter starts again
    (the clock floor of fencing tokens still keeps them rising)."""
    data = os.pread(fd, min(os.fstat(fd).st_size, _MAX_RECORD), 0)
    try:
        # raw_decode: the first JSON object; blanks after it are what is left of a longer
        # record written before (see _write).
        fields, _ = json.JSONDecoder().raw_decode(data.decode())
        record = _Record(
            key=str(fields.get("key", "")),
            fence=int(fields.get("fence", 0)),
            value=str(fields.get("value", "")),
            ttl=float(fields.get("ttl", 0.0)),
            expires=None if fields.get("expires") is None else float(fields["expires"]),
            boot=str(fields.get("boot", "")),
        )
        if len(fields) == _EXCLUSIVE_FIELDS:  # no semaphore's fields (see _write)
            return record
        return replace(
            record,
            limit=int(fields.get("limit", 1)),
            high=int(fields.get("high", 0)),
            slots={
                int(n): _Slot(str(entry["value"]), int(entry["fence"]), int(entry["limit"]))
                for n, entry in fields.get("slots", {}).items()
            },
        )
    except (ValueError, TypeError, AttributeError, KeyError, UnicodeDecodeError):
        return _Record()


#: The fields of an exclusive lock's record (a semaphore's adds limit, high and slots).
_EXCLUSIVE_FIELDS = 6


def _write(fd: int, record: _Record) -> None:
    """Replace the record (call with the guard held for writing)."""
    fields: dict[str, object] = {
        "key": record.key, "fence": record.fence, "value": record.value, "ttl": record.ttl,
        "expires": record.expires, "boot": record.boot,
    }
    # Only a semaphore's fields: an exclusive lock's record stays as it was.
    if record.limit != 1:
        fields["limit"] = record.limit
    if record.high:
        fields["high"] = record.high
    if record.slots:
        fields["slots"] = {
            str(n): {"value": e.value, "fence": e.fence, "limit": e.limit} for n, e in record.slots.items()
        }
    data = (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    # Over a longer record, blanks fill the rest: no truncation (a metadata write), and a
    # process killed halfway leaves JSON that still reads (_read takes the first object).
    data += b" " * (os.fstat(fd).st_size - len(data))
    os.pwrite(fd, data, 0)


# -- descriptors, per process ----------------------------------------------------------------


class _Descriptors:
    """Every lock-file descriptor this process has open, and which of them hold a lock.

    A fork closes all of them in the child (see the module docstring). Opening and
    closing happen under ``guard``, which a fork waits for: a descriptor is never open
    without being recorded.
    """

    def __init__(self) -> None:
        self._start_empty()

    def _start_empty(self) -> None:
        self.guard = _native.allocate_lock()
        self.open: set[int] = set()
        #: (lock file path, token) -> the descriptor holding HOLD for that acquisition.
        self.held: dict[tuple[str, str], int] = {}
        #: lock file path -> the waiting room of this process for that lock.
        self.rooms: dict[str, _Room] = {}
        #: (lock file path, limit) -> the waiting room of this process for its semaphore.
        self.slot_rooms: dict[tuple[str, int], _SlotRoom] = {}
        #: (path, token) of dropped handles, left by their finalizers (see _drop).
        self.dropped: deque[tuple[str, str]] = deque()

    def open_file(self, path: str, *, create: bool = True) -> int:
        flags = _OPEN_FLAGS if create else _OPEN_FLAGS & ~os.O_CREAT
        with self.guard:
            self.close_dropped()
            fd = os.open(path, flags, 0o666)
            self.open.add(fd)
        return fd

    def close(self, fd: int) -> None:
        with self.guard:
            self.close_dropped()
            self._close(fd)

    def _close(self, fd: int) -> None:
        if fd in self.open:
            self.open.discard(fd)
            os.close(fd)

    def close_dropped(self) -> None:
        """Free the locks of dropped handles (``guard`` held): a lock nobody can release
        any more is free."""
        while self.dropped:
            fd = self.held.pop(self.dropped.popleft(), None)
            if fd is not None:
                with contextlib.suppress(OSError):  # unlocked, not only closed: see _release_fd
                    _unlock_all(fd)
                self._close(fd)

    def keep(self, path: str, token: str, fd: int) -> None:
        with self.guard:
            self.held[(path, token)] = fd

    def held_fd(self, path: str, token: str) -> int | None:
        return self.held.get((path, token))

    def pop_held(self, path: str, token: str) -> int | None:
        with self.guard:
            return self.held.pop((path, token), None)

    def forget_in_child(self) -> None:
        """After a fork, in the child: close every inherited descriptor (closing our copy
        of a shared description leaves its locks to the parent), and start empty (the
        rooms' threads are not in the child)."""
        for fd in self.open:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._start_empty()


_process = _Descriptors()


def _before_fork() -> None:
    _process.guard.acquire()


def _after_fork_in_parent() -> None:
    _process.guard.release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_process.forget_in_child
)


def _drop(path: str, token: str) -> None:
    """A dropped handle's finalizer: its descriptor is closed now if the guard is free,
    else by the next open or close. A finalizer runs in whatever thread the garbage
    collector interrupts, maybe one that holds the guard: waiting for it would deadlock
    that thread (seen in CI)."""
    _process.dropped.append((path, token))  # deque.append is atomic
    if _process.guard.acquire(blocking=False):
        try:
            _process.close_dropped()
        finally:
            _process.guard.release()


# -- waiting ---------------------------------------------------------------------------------

_WAITING, _CLAIMED, _DONE, _GONE = range(4)


class _Waiter:
    """One blocked ``wait``: woken by its room's thread, also under gevent (the thread is
    an OS thread; a greenlet is woken through its hub)."""

    def __init__(self, token: str, ttl: float, owner: Owner) -> None:
        self.token = token
        self.ttl = ttl
        self.owner = owner
        self.state = _WAITING
        self.outcome: Granted | BaseException | None = None
        #: Its thread left while the lock was being handed to it (an exception, such as a
        #: soft time limit, interrupted the wait): the lock is released as soon as granted.
        self.abandoned = False
        self._post = _native.poster()
        self._wakeup = _native.Wakeup() if self._post is None else None
        self._event = threading.Event() if self._post is not None else None  # gevent's

    def notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
        elif self._post is not None and self._event is not None:
            self._post(self._event.set)

    def wait(self, timeout: float | None) -> bool:
        if self._wakeup is not None:
            return self._wakeup.wait(timeout)
        assert self._event is not None
        return self._event.wait(timeout)


class _Room:
    """This process's waiters for one lock file, and the thread that waits for them."""

    def __init__(self) -> None:
        self.guard = _native.allocate_lock()
        self.waiters: deque[_Waiter] = deque()
        self.marker_wakeup = _native.Wakeup()


class _SlotRoom(_Room):
    """This process's waiters for a semaphore of one lock file, and its watchers: a
    thread per slot blocked on that slot's byte while anybody waits (see _watch)."""

    def __init__(self) -> None:
        super().__init__()
        #: The slots that have a watcher thread.
        self.watching: set[int] = set()


# -- the backend -----------------------------------------------------------------------------


def default_directory() -> Path:
    """``file://``'s directory: one per user under the system temp dir."""
    return Path(tempfile.gettempdir()) / f"celery-singleton-lock-{os.getuid()}"


def _mountinfo_unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in octal (\040).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The type of the filesystem ``path`` is on (``ext4``, ``tmpfs``, ``nfs4``...), from
    /proc/self/mountinfo; None where that cannot be read (then nothing is refused)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        device = os.stat(path).st_dev
        real = os.path.realpath(path)
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    by_device = None
    best: tuple[int, str] | None = None
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or not tail:
            continue
        mount_point = _mountinfo_unescape(fields[4])
        if fields[2] == wanted:
            by_device = tail[0]  # the last mount of a device wins, as the kernel's does
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), tail[0])
    # The device names the mount exactly; a btrfs subvolume's own device is not listed,
    # so the longest mount point containing the path decides then.
    return by_device or (best[1] if best else None)


def _directory_of(url: str) -> Path | None:
    """The directory a ``file:`` URL names (None: ``file://`` alone, the default).

    :raises ConfigurationError: for a host other than localhost, or a relative path.
    """
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        msg = (
            f"{OPTION}: {url!r} names the host {parts.netloc!r}; a file:// lock directory is "
            "on this host: write file:///absolute/path (three slashes), or file:// alone"
        )
        raise ConfigurationError(msg, option=OPTION)
    if parts.query or parts.fragment:
        msg = f"{OPTION}: a file:// URL takes no query or fragment, got {url!r}"
        raise ConfigurationError(msg, option=OPTION)
    path = unquote(parts.path)
    if not path:
        return None
    if "\0" in path:
        msg = f"{OPTION}: the path of {url!r} contains a NUL character"
        raise ConfigurationError(msg, option=OPTION)
    return Path(path)


def _refuse_network(directory: Path) -> None:
    kind = filesystem_type(directory)
    if kind in NETWORK_FILESYSTEMS:
        msg = (
            f"{OPTION}: the lock directory {str(directory)!r} is on a {kind} filesystem, "
            "where file locks do not reliably exclude processes (of other hosts sharing "
            "it) and a crashed holder's lock is not freed at once; use a directory on a "
            "local filesystem (all workers on this host), or a lock server (redis://, "
            "etcd://, zookeeper://, postgresql://)"
        )
        raise ConfigurationError(msg, option=OPTION)


def _check_default_directory(directory: Path) -> None:
    """``file://``'s directory must be ours alone: anyone who can write in it can take or
    fake our locks."""
    info = os.lstat(directory)
    problem = None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory (a symlink?)"
    elif info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to us (uid {os.getuid()})"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}, open to other users (want 0700)"
    if problem:
        msg = (
            f"{OPTION}: the default lock directory {str(directory)!r} {problem}: another "
            "user could hold or fake our locks. Remove it, or set singleton_lock_backend "
            "to file:///a/directory/of/yours"
        )
        raise ConfigurationError(msg, option=OPTION)


class FileBackend(LockBackend):
    """Locks for processes of one host, in files of one directory; no server.

    :param url: ``file:///path/to/dir`` (created if missing), or ``file://`` for a
        directory of this user's own under the system temp dir (created 0700; refused if
        it exists and is not ours alone).
    """

    schemes = ("file",)
    lease_ttl_is_settable = False  # the kernel holds the lock while the descriptor is open

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        if not isinstance(url, str):
            msg = f"{option}: file:// takes one URL, not a list"
            raise ConfigurationError(msg, option=option)
        reason = _supported()
        if reason is not None:
            raise ConfigurationError(reason, option=option)
        directory = _directory_of(url)
        if directory is not None and directory.exists():
            _refuse_network(directory)

    def __init__(
        self,
        url: str = "file://",
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        super().__init__(url, prefix=prefix, connect_timeout=connect_timeout, clock=clock)
        if options:
            msg = f"the file:// backend takes no options, got {', '.join(sorted(options))}"
            raise ConfigurationError(msg, option="singleton_lock_backend_options")
        self.check_url(url, option=OPTION)
        named = _directory_of(url)
        self._default = named is None
        #: The directory the lock files are in.
        self.directory = default_directory() if named is None else named
        self._directory = str(self.directory)
        self._make_directory()

    def _make_directory(self) -> None:
        """Create the directory if it is missing (also when a cleaner removed it), and
        check that we may use it.

        :raises ConfigurationError: naming ``singleton_lock_backend``.
        """
        directory = self.directory
        try:
            if self._default:
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o700)
                _check_default_directory(directory)
            else:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"{OPTION}: cannot use the lock directory {str(directory)!r}: {exc.strerror}"
            raise ConfigurationError(msg, option=OPTION) from None
        _refuse_network(directory)
        if not os.access(directory, os.W_OK | os.X_OK):
            msg = f"{OPTION}: the lock directory {str(directory)!r} is not writable by us"
            raise ConfigurationError(msg, option=OPTION)

    def _open(self, path: str) -> int:
        """A new descriptor (a description of its own) of ``path``, created if missing."""
        try:
            return _process.open_file(path)
        except FileNotFoundError:
            # The directory is gone (a temp cleaner, a person): make it again, once.
            try:
                self._make_directory()
            except ConfigurationError as exc:
                raise LockBackendUnavailable(str(exc), url=self.url) from None
            return _process.open_file(path)

    def path_of(self, key: str) -> str:
        """The file of ``key`` (unprefixed, as given to ``acquire``)."""
        return self._path(self._full_key(key))

    def _path(self, full_key: str) -> str:
        if SLOT_MARK in full_key:  # a semaphore's slots are bytes of its key's one file
            full_key = full_key.partition(SLOT_MARK)[0]
        name = hashlib.sha256(full_key.encode()).hexdigest()
        return f"{self._directory}/{name}.lock"

    def _unavailable(self, key: str, exc: OSError) -> LockBackendUnavailable:
        msg = f"lock directory {str(self.directory)!r}: {exc.strerror or exc}"
        return LockBackendUnavailable(msg, url=self.url, key=key)

    # -- one attempt -------------------------------------------------------------------

    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        path = self._path(key)
        try:
            for _ in range(_REOPENS):
                fd = self._open(path)
                try:
                    if not _lock(fd, _HOLD, fcntl.F_WRLCK, wait=False):
                        with _guarded(fd, write=False):
                            record = _read(fd)
                        return Refused(record.marker_left() or None, record.task_id)
                    if not _same_file(fd, path):
                        continue  # deleted or replaced after our open: its lock means nothing
                    outcome = self._take(fd, path, key, token, ttl, owner)
                    if isinstance(outcome, Granted) and not _is_marker(owner):
                        fd = -1  # kept: it holds the lock
                    return outcome
                finally:
                    if fd != -1:
                        _process.close(fd)
        except OSError as exc:
            raise self._unavailable(key, exc) from None
        msg = f"lock file {path!r} kept being replaced under us"
        raise LockBackendUnavailable(msg, url=self.url, key=key)

    def _take(
        self, fd: int, path: str, key: str, token: str, ttl: float, owner: Owner
    ) -> Granted | Refused:
        """With HOLD held on ``fd``: take the lock unless a live message marker has it.

        A process's lock keeps ``fd`` (recorded as held); a marker's lock is the record
        alone, and the caller closes ``fd``.
        """
        with _guarded(fd, write=True):
            record = _read(fd)
            left = record.marker_left()
            if left > 0:
                return Refused(left, record.task_id)
            fence = record.next_fence()
            marker = _is_marker(owner)
            _write(fd, _Record(
                key=key, fence=fence, value=owner.stored_with(token), ttl=ttl,
                expires=_now() + ttl if marker else None, boot=_BOOT if marker else "",
                high=record.high, slots=record.slots,  # a semaphore's other slots stay
            ))
        if not marker:
            _process.keep(path, token, fd)
        return Granted(fence)

    # -- semaphores: one file per key, one byte per slot -----------------------------------

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused:
        """Take the lowest free slot: its byte's lock, on a descriptor of its own.

        The attempt holds the record's guard for writing while it looks: semaphore
        attempts of the key take turns, so "the lowest free slot" and "this task id holds
        no slot" are true at once, and every record write already takes the guard. Every
        lock it asks for is a non-blocking one (the guard's holders never wait).
        """
        _refuse_marker_slots(owner, limit)
        path = self._path(key)
        passing = 0
        try:
            for _ in range(_REOPENS + _PASSING_RESCANS):
                fd = self._open(path)
                try:
                    outcome = self._take_free_slot(fd, path, key, token, ttl, owner, limit)
                    if outcome is None:
                        continue  # deleted or replaced after our open: its locks mean nothing
                    if isinstance(outcome, Granted):
                        fd = -1  # kept: it holds the slot
                        return outcome
                    if outcome is _PASSING and passing < _PASSING_RESCANS:
                        passing += 1
                        time.sleep(0)  # let the watcher run (and this thread's GIL go)
                        continue
                    return outcome if isinstance(outcome, Refused) else Refused(None)
                finally:
                    if fd != -1:
                        _process.close(fd)
        except OSError as exc:
            raise self._unavailable(key, exc) from None
        msg = f"lock file {path!r} kept being replaced under us"
        raise LockBackendUnavailable(msg, url=self.url, key=key)

    def _take_free_slot(
        self, fd: int, path: str, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused | _Passing | None:
        """The attempt of :meth:`_try_acquire_slot` on ``fd``; None: the file was replaced;
        ``_PASSING``: every slot taken, one by a watcher that has not written a holder yet
        (it is letting the slot go, or handing it over: a look again settles which)."""
        with _guarded(fd, write=True):
            if not _same_file(fd, path):
                return None
            record = _read(fd)
            free: int | None = None
            holders: list[int] = []
            for slot in range(limit):
                byte = _slot_byte(slot)
                marker = slot == 0 and record.marker_left() > 0  # a record with no lock
                if free is None and not marker and _lock(fd, byte, fcntl.F_WRLCK, wait=False):
                    free = slot
                elif free is None or marker or (
                    # Above the free slot, only a holder's task id matters: only a slot
                    # with a record can name one.
                    (slot in record.slots or (slot == 0 and record.value)) and _hold_taken(fd, byte)
                ):
                    holders.append(slot)
            if owner.task_id is not None and any(record.task_id_of(n) == owner.task_id for n in holders):
                # A redelivered copy of a run that holds a slot: never a second one.
                if free is not None:
                    _lock(fd, _slot_byte(free), fcntl.F_UNLCK, wait=False)
                return Refused(None, owner.task_id)
            if free is None:
                if any(not record.token_of(slot) for slot in holders if not (slot == 0 and record.is_marker)):
                    return _PASSING
                left = record.marker_left()
                return Refused(left or None, record.task_id_of(holders[0]) if holders else None)
            granted = _granted_record(record, free, key, owner.stored_with(token), ttl, limit)
            _write(fd, granted)
        _process.keep(path, token, fd)
        return Granted(granted.fence if free == 0 else granted.slots[free].fence, slot=free)

    def _hold(
        self,
        key: str,
        ttl: float,
        owner: Owner,
        token: str,
        granted: Granted,
        sent_at: float,
        sender: Any,
        limit: int = 1,
    ) -> HeldLock:
        held = super()._hold(key, ttl, owner, token, granted, sent_at, sender, limit)
        path = self._path(self._full_key(key))
        if _process.held_fd(path, held.token) is not None:
            # A handle dropped without release can never be released: free the lock when it
            # is collected, as a server's TTL frees a lock nobody renews.
            weakref.finalize(held, _drop, path, held.token).atexit = False
        return held

    # -- renewal and release -------------------------------------------------------------

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        results = []
        for key, token, ttl in items:
            path = self._path(key)
            try:
                fd = _process.held_fd(path, token)
                if fd is None:
                    results.append(self._renew_marker(path, token, ttl))
                    continue
                if not _same_file(fd, path):
                    results.append(False)
                    continue
                with _guarded(fd, write=False):
                    results.append(_read(fd).token_of(_slot_of(key)) == token)
            except OSError as exc:
                raise self._unavailable(key, exc) from None
        return results

    def _renew_marker(self, path: str, token: str, ttl: float) -> bool:
        with self._existing(path) as fd:
            if fd is None:
                return False
            with _guarded(fd, write=True):
                record = _read(fd)
                if record.token != token or record.marker_left() <= 0:
                    return False
                _write(fd, replace(record, expires=_now() + ttl, ttl=ttl))
                return True

    @contextlib.contextmanager
    def _existing(self, path: str) -> Iterator[int | None]:
        """A new descriptor of an existing lock file (None if there is none)."""
        try:
            fd = _process.open_file(path, create=False)
        except FileNotFoundError:
            yield None
            return
        try:
            yield fd
        finally:
            _process.close(fd)

    def _release(self, key: str, field: str, value: str) -> bool:
        path = self._path(key)
        slot = _slot_of(key)
        try:
            if field == "token":
                fd = _process.pop_held(path, value)
                if fd is not None:
                    if not slot:
                        return self._release_fd(path, fd, lambda record: record.token == value)
                    return self._release_fd(path, fd, lambda record: record.token_of(slot) == value, slot)
                return slot == 0 and self._release_marker(path, lambda record: record.token == value)
            return self._release_owner(path, value, (slot,))
        except OSError as exc:
            raise self._unavailable(key, exc) from None

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        try:
            return self._release_owner(self._path(key), owner_json, range(limit))
        except OSError as exc:
            raise self._unavailable(key, exc) from None

    def _release_fd(self, path: str, fd: int, ours: Callable[[_Record], bool], slot: int = 0) -> bool:
        """Release the lock (slot ``slot``) that ``fd`` (popped from the held table) holds:
        always its descriptor; the record only if the path still names that file and the
        record us."""
        try:
            with _guarded(fd, write=True):
                record = _read(fd)
                matches = ours(record) and not (not slot and record.is_marker) and _same_file(fd, path)
                if matches:
                    _write(fd, record.cleared_slot(slot) if slot else record.cleared())
            # Unlocked, not only closed: a child forked a moment ago may not have closed
            # its copy of the description yet, and must not keep the lock for us.
            _lock(fd, _slot_byte(slot) if slot else _HOLD, fcntl.F_UNLCK, wait=False)
        finally:
            _process.close(fd)
        return matches

    def _release_marker(self, path: str, ours: Callable[[_Record], bool]) -> bool:
        with self._existing(path) as fd:
            if fd is None:
                return False
            with _guarded(fd, write=True):
                record = _read(fd)
                if not (ours(record) and record.marker_left() > 0):
                    return False
                _write(fd, record.cleared())
        room = _process.rooms.get(path)
        if room is not None:
            room.marker_wakeup.set()
        return True

    def _release_owner(self, path: str, owner_json: str, slots: Iterable[int]) -> bool:
        """``release_owned``: the lock (the first of ``slots``) of exactly that owner,
        wherever it was taken.

        From the worker's main process after a pool process died, the kernel has freed
        that process's lock already; only its record is left, which we clear (so listings
        stop showing it). A live holder in another process cannot be released from here:
        its lock is its open descriptor.
        """
        with self._existing(path) as fd:
            if fd is None:
                return False
            with _guarded(fd, write=True):
                record = _read(fd)
                for slot in slots:
                    value = record.value if slot == 0 else getattr(record.slots.get(slot), "value", "")
                    if not value or value.partition("\n")[2] != owner_json:
                        continue
                    if slot == 0 and record.is_marker:
                        if record.marker_left() <= 0:
                            return False
                        _write(fd, record.cleared())
                        return True
                    byte = _slot_byte(slot)
                    held = _process.pop_held(path, value.partition("\n")[0])
                    if held is not None:  # held by this process: release it
                        _write(fd, record.cleared_slot(slot))
                        _lock(held, byte, fcntl.F_UNLCK, wait=False)
                        _process.close(held)
                        return True
                    if not _lock(fd, byte, fcntl.F_WRLCK, wait=False):
                        continue  # its holder lives (or a new holder is writing its record)
                    try:
                        _write(fd, record.cleared_slot(slot))  # the holder died: only its record was left
                    finally:
                        _lock(fd, byte, fcntl.F_UNLCK, wait=False)
                    return True
                return False

    # -- for operators (celery locks) -----------------------------------------------------

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """Every lock file's record (or the key's), shown when the kernel says a process
        holds its HOLD byte (asked with ``F_OFD_GETLK``, which takes nothing), or when it is
        a message marker with time left. A record whose holder died is not shown."""
        start = f"{self.prefix}:"
        try:
            if key is None:
                paths = sorted(
                    entry.path for entry in os.scandir(self._directory) if entry.name.endswith(".lock")
                )
            else:
                paths = [self._path(self._full_key(key))]
            found: list[LockInfo] = []
            for path in paths:
                with self._existing(path) as fd:
                    if fd is None:
                        continue
                    with _guarded(fd, write=False):
                        record = _read(fd)
                    if not record.key.startswith(start):
                        continue
                    name = record.key[len(start):]
                    found.extend(
                        LockInfo(
                            key=name, owner=split_stored(entry.value)[1], token=entry.token,
                            fencing_token=entry.fence, ttl=None, held_since=_fence_time(entry.fence),
                            slot=slot, limit=entry.limit, location=f"{path} byte {_slot_byte(slot)}",
                        )
                        for slot, entry in sorted(record.slots.items())
                        if _hold_taken(fd, _slot_byte(slot))
                    )
                    if not record.value:
                        continue
                    if record.is_marker:
                        ttl: float | None = record.marker_left()
                        if not ttl:
                            continue
                    elif _hold_taken(fd):
                        ttl = None  # held for as long as its holder's descriptor is open
                    else:
                        continue
                token, owner = split_stored(record.value)
                found.append(LockInfo(
                    key=name, owner=owner, token=token, fencing_token=record.fence,
                    ttl=ttl, held_since=_fence_time(record.fence),
                    slot=0 if record.limit > 1 else None, limit=record.limit, location=path,
                ))
        except OSError as exc:
            raise self._unavailable(key or self._directory, exc) from None
        return found

    def _break(self, info: LockInfo) -> bool:
        """A message marker, or a lock of this process: released. Another process's lock is
        its open descriptor, which only that process (or its death) can let go of."""
        path = self._path(self._full_key(info.key))
        slot = info.slot or 0
        try:
            fd = _process.pop_held(path, info.token)
            if fd is not None:
                return self._release_fd(path, fd, lambda record: record.token_of(slot) == info.token, slot)
            if slot == 0 and self._release_marker(path, lambda record: record.token == info.token):
                return True
            if not any(held.token == info.token for held in self._held(info.key)):
                return False
        except OSError as exc:
            raise self._unavailable(info.key, exc) from None
        pid = info.owner.pid if info.owner else "?"
        host = info.owner.host if info.owner else "this host"
        msg = (
            f"lock {info.key!r} is held by the kernel for process {pid} on {host} (file://): no "
            f"other process can release it; stop that process (kill {pid}) and the kernel "
            "frees the lock at once"
        )
        raise LockError(msg, key=info.key)

    # -- waiting -------------------------------------------------------------------------

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
        if limit > 1:
            return self._wait_for_slot(key, token, ttl, owner, deadline, limit)
        path = self._path(key)
        waiter = _Waiter(token, ttl, owner)
        room, start = self._join(path, waiter)
        if start:
            _native.NativeThread(lambda: self._serve(path, key, room))
        return self._await(key, room, waiter, deadline)

    def _await(self, key: str, room: _Room, waiter: _Waiter, deadline: float | None) -> Granted | None:
        """Block until the room's thread (or a watcher) hands ``waiter`` its lock, or
        ``deadline`` passes."""
        try:
            while True:
                remaining = None if deadline is None else deadline - self.clock()
                with room.guard:
                    if waiter.state == _DONE:
                        break
                    if waiter.state == _WAITING and remaining is not None and remaining <= 0:
                        waiter.state = _GONE
                        return None
                    claimed = waiter.state == _CLAIMED
                # Claimed, the outcome is a few system calls away (or it waits again: a
                # message marker had the lock); the room wakes us either way.
                waiter.wait(None if claimed else remaining)
        except BaseException:
            self._abandon(key, room, waiter)
            raise
        outcome = waiter.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _abandon(self, key: str, room: _Room, waiter: _Waiter) -> None:
        """The waiter's thread is leaving by an exception: leave nothing behind."""
        with room.guard:
            if waiter.state == _WAITING:
                waiter.state = _GONE
                return
            waiter.abandoned = True
            outcome = waiter.outcome if waiter.state == _DONE else None
        if isinstance(outcome, Granted):  # else the room releases it when it is granted (_finish)
            self._release_quietly(self.slot_key(key, outcome.slot), waiter.token)

    def _release_quietly(self, key: str, token: str) -> None:
        try:
            self._release(key, "token", token)
        except LockBackendUnavailable as exc:  # its descriptor is closed all the same
            logger.warning("could not clear the record of an abandoned wait for %r: %s", key, exc)

    def _join(self, path: str, waiter: _Waiter) -> tuple[_Room, bool]:
        """Queue ``waiter`` in this process's room for ``path``; True if it needs a thread."""
        with _process.guard:
            room = _process.rooms.get(path)
            start = room is None
            if room is None:
                room = _process.rooms[path] = _Room()
            with room.guard:
                room.waiters.append(waiter)
        return room, start

    def _next_waiter(self, path: str, room: _Room) -> _Waiter | None:
        """The first waiter still waiting; None (and the room closed) when nobody waits."""
        with _process.guard, room.guard:
            while room.waiters and room.waiters[0].state == _GONE:
                room.waiters.popleft()
            if room.waiters:
                return room.waiters[0]
            if _process.rooms.get(path) is room:
                del _process.rooms[path]
            return None

    def _serve(self, path: str, key: str, room: _Room) -> None:
        """The room's thread: block in the kernel until the lock is free, hand it over."""
        try:
            while self._next_waiter(path, room) is not None:
                self._serve_one(path, key, room)
        finally:
            # Normally nobody waits any more; after a bug, nobody may wait on a room that
            # has no thread.
            with _process.guard:
                if _process.rooms.get(path) is room:
                    del _process.rooms[path]
            self._fail_all(room, LockBackendUnavailable(
                f"the wait for {key!r} ended unexpectedly", url=self.url, key=key
            ))

    def _serve_one(self, path: str, key: str, room: _Room) -> None:
        """Wait once for HOLD, and hand it to the first waiter still waiting."""
        try:
            fd = self._open(path)
        except OSError as exc:
            self._fail_all(room, self._unavailable(key, exc))
            return
        except LockBackendUnavailable as exc:
            self._fail_all(room, exc)
            return
        try:
            _lock(fd, _HOLD, fcntl.F_WRLCK, wait=True)  # woken at release or death
            if not _same_file(fd, path):
                return
            with room.guard:
                waiter = next((w for w in room.waiters if w.state == _WAITING), None)
                if waiter is None:
                    return  # they all timed out while we waited: let it go
                waiter.state = _CLAIMED
            outcome = self._take(fd, path, key, waiter.token, waiter.ttl, waiter.owner)
            if isinstance(outcome, Refused):  # a live message marker: it has a TTL
                with room.guard:
                    waiter.state = _WAITING
                waiter.notify()  # past its deadline, it may leave now
                _process.close(fd)
                fd = -1
                room.marker_wakeup.wait(outcome.holder_ttl)
                return
            if not _is_marker(waiter.owner):
                fd = -1  # kept: it holds the lock now
            valid_until = self.clock() + waiter.ttl - clock_drift(waiter.ttl)
            self._finish(room, waiter, replace(outcome, valid_until=valid_until), key)
        except OSError as exc:
            self._fail_all(room, self._unavailable(key, exc))
        except BaseException as exc:  # never die quietly: whoever waits gets it
            self._fail_all(room, exc)
            raise
        finally:
            if fd != -1:
                _process.close(fd)

    def _finish(
        self, room: _Room, waiter: _Waiter, outcome: Granted | BaseException, key: str = ""
    ) -> None:
        with room.guard:
            waiter.outcome = outcome
            waiter.state = _DONE
            abandoned = waiter.abandoned
            with contextlib.suppress(ValueError):
                room.waiters.remove(waiter)
        if abandoned and isinstance(outcome, Granted):
            self._release_quietly(key, waiter.token)
        waiter.notify()

    def _fail_all(self, room: _Room, error: BaseException) -> None:
        with room.guard:
            waiting = [w for w in room.waiters if w.state in (_WAITING, _CLAIMED)]
        for waiter in waiting:
            self._finish(room, waiter, error)

    # -- waiting for a slot ----------------------------------------------------------------

    def _wait_for_slot(
        self, key: str, token: str, ttl: float, owner: Owner, deadline: float | None, limit: int
    ) -> Granted | None:
        """Wait in this process's room for the semaphore: every slot has a watcher
        thread blocked on its byte (:meth:`_watch`), so whichever slot is freed first,
        by a release or by its holder's death, the kernel wakes one of them."""
        _refuse_marker_slots(owner, limit)
        path = self._path(key)
        waiter = _Waiter(token, ttl, owner)
        # A redelivered copy can take a slot only once its first run let its own go:
        # watching that slot alone, it leaves the free ones alone meanwhile.
        wanted = self._slots_of_task(key, path, owner, limit) or range(limit)
        with _process.guard:
            room = _process.slot_rooms.get((path, limit))
            if room is None:
                room = _process.slot_rooms[(path, limit)] = _SlotRoom()
            with room.guard:
                room.waiters.append(waiter)
                unwatched = [slot for slot in wanted if slot not in room.watching]
                room.watching.update(unwatched)
        for slot in unwatched:
            _native.NativeThread(functools.partial(self._watch, path, key, limit, room, slot))
        return self._await(key, room, waiter, deadline)

    def _slots_of_task(self, key: str, path: str, owner: Owner, limit: int) -> list[int]:
        """The slots below ``limit`` that a run of ``owner``'s task id holds (none
        without a task id)."""
        if owner.task_id is None:
            return []
        try:
            with self._existing(path) as fd:
                if fd is None:
                    return []
                with _guarded(fd, write=False):
                    record = _read(fd)
                return [
                    slot for slot in (0, *record.slots)
                    if slot < limit and record.task_id_of(slot) == owner.task_id
                    and _hold_taken(fd, _slot_byte(slot))
                ]
        except OSError as exc:
            raise self._unavailable(key, exc) from None

    def _watch(self, path: str, key: str, limit: int, room: _SlotRoom, slot: int) -> None:
        """A slot's watcher: block in ``F_OFD_SETLKW`` on the slot's byte, which the kernel
        grants to one of all the descriptions blocked on it when its holder releases or
        dies; hand the slot to the room's first waiter that may have it, then watch its
        new holder while anybody waits. With nobody left, it lets the slot go and ends."""
        byte = _slot_byte(slot)
        try:
            while True:
                fd = self._open(path)
                try:
                    _lock(fd, byte, fcntl.F_WRLCK, wait=True)  # woken at release or death
                    if not self._still_watched(path, limit, room, slot):
                        return  # nobody waits any more: let it go before anything else
                    if not _same_file(fd, path):
                        continue
                    handed = self._hand_over(fd, path, key, limit, room, slot)
                    if handed is None:
                        return
                    fd = -1  # kept: the waiter holds the slot now
                    waiter, granted = handed
                    self._finish(room, waiter, granted, self.slot_key(key, slot))
                    if not self._still_watched(path, limit, room, slot):
                        return
                finally:
                    if fd != -1:
                        with contextlib.suppress(OSError):  # unlocked, not only closed: see _release_fd
                            _lock(fd, byte, fcntl.F_UNLCK, wait=False)
                        _process.close(fd)
        except OSError as exc:
            self._stop_watching(path, limit, room, slot)
            self._fail_all(room, self._unavailable(key, exc))
        except BaseException as exc:  # never die quietly: whoever waits gets it
            self._stop_watching(path, limit, room, slot)
            self._fail_all(room, exc)
            if not isinstance(exc, LockBackendUnavailable):
                raise

    def _hand_over(
        self, fd: int, path: str, key: str, limit: int, room: _SlotRoom, slot: int
    ) -> tuple[_Waiter, Granted] | None:
        """With ``slot``'s byte held on ``fd``: write the first eligible waiter's record
        (not one whose task id holds another slot: a redelivered copy waits for its first
        run to end). None when nobody may have it (the watcher then stops)."""
        with _guarded(fd, write=True):
            record = _read(fd)
            running = {
                record.task_id_of(n) for n in (0, *record.slots)
                if n != slot and n < limit and _hold_taken(fd, _slot_byte(n))
            }
            with _process.guard, room.guard:
                room.waiters = deque(w for w in room.waiters if w.state != _GONE)
                eligible = (
                    w for w in room.waiters
                    if w.state == _WAITING and (w.owner.task_id is None or w.owner.task_id not in running)
                )
                waiter = next(eligible, None)
                if waiter is None:
                    self._forget_watcher(path, limit, room, slot)
                    return None
                waiter.state = _CLAIMED
            value = waiter.owner.stored_with(waiter.token)
            granted = _granted_record(record, slot, key, value, waiter.ttl, limit)
            _write(fd, granted)
        _process.keep(path, waiter.token, fd)
        fence = granted.fence if slot == 0 else granted.slots[slot].fence
        valid_until = self.clock() + waiter.ttl - clock_drift(waiter.ttl)
        return waiter, Granted(fence, valid_until=valid_until, slot=slot)

    def _still_watched(self, path: str, limit: int, room: _SlotRoom, slot: int) -> bool:
        """Whether anybody waits (then the slot is watched on); else its watcher ends."""
        with _process.guard, room.guard:
            if any(w.state == _WAITING for w in room.waiters):
                return True
            self._forget_watcher(path, limit, room, slot)
            return False

    def _stop_watching(self, path: str, limit: int, room: _SlotRoom, slot: int) -> None:
        with _process.guard, room.guard:
            self._forget_watcher(path, limit, room, slot)

    @staticmethod
    def _forget_watcher(path: str, limit: int, room: _SlotRoom, slot: int) -> None:
        """The slot's watcher ends (``_process.guard`` and ``room.guard`` held); so does
        the room once it has neither watchers nor waiters."""
        room.watching.discard(slot)
        idle = not room.watching and not any(w.state in (_WAITING, _CLAIMED) for w in room.waiters)
        if idle and _process.slot_rooms.get((path, limit)) is room:
            del _process.slot_rooms[(path, limit)]
