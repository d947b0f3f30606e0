"""etcd v3: ``etcd://h1:2379,h2:2379,h3:2379`` and ``etcds://`` (TLS).

etcd is a consensus store: a granted lock survives the loss of a minority of members.
Each lock is a directory; every acquisition, holder or waiter, is one entry in it, in a
numbered *place* that the next acquisition reuses once it is free::

    <prefix>/<key, with '%' and '/' escaped>/<place, hex: 0, 1, 2...>
        value "<token>\\n<owner JSON>", attached to a lease of its own
    token: <lease id, 16 hex><random, 16 hex><place, 8 hex>

The holder is the entry with the lowest create revision; the others wait in FIFO order,
each watching only the entry just before its own, so a release wakes exactly one waiter.
The holder's create revision is its fencing token: it rises with every write in the
whole cluster, also when a place is used again. Release compares the whole stored value
(token and owner), renewal the token in it, so only the exact token ends or renews a lock.

Why places and not a new name per acquisition: etcd keeps a deleted key in its index
until a compaction (which it does not run by default), and a compare or read of the
directory visits every name it ever held. A name per acquisition made the 8,000th
acquisition of a key cost half again the first. An acquisition takes the lowest free
place (0 when the line is empty), so a key's directory never holds more names than it
ever had entries at once.

Round trips: an uncontended attempt is one transaction (put if the directory is empty,
else read the holder); a release is one guarded delete. Leases make the third: etcd
grants a lease in a call of its own, so a released lease is kept as a *spare* and the
next acquisition with the same TTL reuses it. A lease never carries two entries at a
time, so exclusion does not depend on it; see ``docs/etcd.md``.

A write whose outcome is unknown (its member timed out or lost its leader after the
request may have reached the cluster) can still be applied later, even after a retry
elsewhere succeeded. Its lease is therefore revoked before we try again, with another
lease and another token, and never used again: once its lease is revoked no put on
it can succeed, late or not, so no entry of ours is left that we would keep alive.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from celery_singleton_lock.backends._queue import holds, tells_when_held
from celery_singleton_lock.backends.base import (
    MIN_TTL,
    Granted,
    LockBackend,
    LockInfo,
    Refused,
)
from celery_singleton_lock.backends.owner import Owner, split_stored, stored_task_id
from celery_singleton_lock.errors import (
    ConfigurationError,
    LockBackendUnavailable,
    LockError,
    LockKeyError,
)
from celery_singleton_lock.lease import HeldLock, LeaseKeeper, clock_drift

try:
    import grpc
    from pyetcd import etcdrpc
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the etcd backend needs etcd-sdk-python: pip install 'celery-singleton-lock[etcd]'"
    raise ConfigurationError(msg, option="singleton_lock_backend") from exc

__all__ = ["EtcdBackend"]

DEFAULT_PORT = 2379
#: etcd refuses transactions with more operations than this (its --max-txn-ops default).
MAX_TXN_OPS = 128
#: Spare leases kept per TTL; more concurrent acquisitions simply grant more leases.
SPARE_LEASES = 8
#: Owners whose stored JSON is kept, encoded, for the next acquisition and release.
OWNERS_KEPT = 64
#: The shortest time one try at one member gets: a healthy member answers in
#: milliseconds, so a try that takes longer moves on to the next member.
MIN_TRY = 0.25
#: A renewal (keep-alives and the existence check) gets this share of the lease's TTL,
#: and never more than connect_timeout. The lease keeper renews after a third of the TTL
#: and retries on failure, so a hung member costs a short try or two, not the lease.
RENEWAL_SHARE = 0.25
#: How often leases that could not be revoked at once are tried again.
REAP_PAUSE = 0.25
#: Places a waiter offers in one transaction; the lowest free one is taken. A longer
#: line costs one more transaction, with places chosen from the line it returned.
PLACES_PER_TRY = 8
#: The token of an etcd acquisition: the lease id, 16 random hex digits, the place; for a
#: semaphore's entry also its limit (4 hex digits), which others read to tell holders.
_TOKEN = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{4})?")
#: The name of an entry: its place, in hex.
_PLACE = re.compile(rb"[0-9a-f]{1,8}")

#: Codes that mean "this member cannot answer now" (down, no leader, its own request to
#: the leader timed out: etcd reports that as UNKNOWN "context deadline exceeded").
_RETRY_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)
#: Answers about the request itself (a lease not found, or already there), for the
#: caller to handle.
_CALLER_HANDLES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
#: Refusals of what we asked for (too large, out of range): no member would take it, so
#: it is a bad key or TTL, never an outage to retry.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
_CHANNEL_OPTIONS = [
    # A member that comes back is reconnected to within a second, not gRPC's default
    # two minutes of back-off.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A member that hangs without closing its socket is noticed on long streams.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
_CLIENT_OPTIONS = ("ca_cert", "cert_key", "cert_cert", "user", "password", "spare_leases")


@dataclass
class _Lease:
    """A lease of ours and how long we can prove it alive (monotonic deadline)."""

    id: int
    ttl: float
    valid_until: float


@dataclass(frozen=True)
class _Entry:
    """One entry of a line, as a semaphore's waiter reads it: its name (the place), its
    create revision, its limit (1: an exclusive lock's) and its task id."""

    key: bytes
    created: int
    limit: int
    task: str | None


class _Room:
    """What the first waiter of a semaphore knows of the entries ahead of it, as of
    revision ``seen_at``: later entries queue behind it, so only deletions change them."""

    def __init__(self, ahead: list[_Entry], ours: _Entry, seen_at: int) -> None:
        self.ahead = ahead
        self.ours = ours
        self.seen_at = seen_at
        self.vanished = False

    @property
    def holds(self) -> bool:
        return not self.vanished and holds(self.ahead, self.ours)

    def deleted(self, events: Sequence[Any]) -> bool:
        """Count deletions (watch events) after ``seen_at``; True if one was ahead of us
        or ours. The first deletion of a name after ``seen_at`` is of the entry we know
        by it; its place may be taken again later, but only behind us."""
        counted = False
        for event in events:
            name, at = event.kv.key, event.kv.mod_revision
            if at <= self.seen_at:
                continue  # already in the read
            if name == self.ours.key:
                self.vanished = counted = True
                continue
            before = len(self.ahead)
            self.ahead = [e for e in self.ahead if e.key != name]
            counted = counted or len(self.ahead) < before
        return counted

    def catch_up(self, line: list[_Entry], read_at: int) -> None:
        """Start again from a read of the line at ``read_at`` (the watch began later)."""
        index = _index_of(line, self.ours)
        if index is None:
            self.vanished = True
            return
        self.ahead, self.seen_at = line[:index], read_at


class _Unreachable(Exception):
    """No member answered within the budget (turned into LockBackendUnavailable)."""


class _Unsure(Exception):
    """A write's try failed after it may have reached the cluster: it may yet be applied."""


class _Cluster:
    """gRPC channels to every member of the URL, with fail-over and authentication.

    Calls go to the current member; when it does not answer (refused, dead, no leader,
    per-try deadline), the next member is tried, until the call's budget is spent.
    """

    def __init__(
        self,
        endpoints: list[str],
        *,
        credentials: grpc.ChannelCredentials | None,
        user: str | None,
        password: str | None,
        budget: float,
        clock: Callable[[], float],
    ) -> None:
        self.endpoints = endpoints
        self.budget = budget
        self.clock = clock
        self._credentials = credentials
        self._user = user
        self._password = password
        self._guard = threading.Lock()
        # Spread clients over members (load only: nothing secret depends on it).
        self._current = random.randrange(len(endpoints))  # noqa: S311
        self._channels: dict[int, grpc.Channel] = {}
        self._stubs: dict[tuple[int, str], Any] = {}
        self._metadata: tuple[tuple[str, str], ...] | None = None

    def stub(self, service: str, index: int | None = None) -> Any:
        index = self._current if index is None else index
        stub = self._stubs.get((index, service))  # made once; every call reads it
        if stub is not None:
            return stub
        with self._guard:
            stub = self._stubs.get((index, service))
            if stub is None:
                channel = self._channels.get(index)
                if channel is None:
                    target = self.endpoints[index]
                    if self._credentials is None:
                        channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
                    else:
                        channel = grpc.secure_channel(target, self._credentials, options=_CHANNEL_OPTIONS)
                    self._channels[index] = channel
                stub = self._stubs[(index, service)] = getattr(etcdrpc, f"{service}Stub")(channel)
            return stub

    def failed(self, index: int) -> None:
        """The member at ``index`` did not answer: move on to the next one."""
        with self._guard:
            if self._current == index:
                self._current = (index + 1) % len(self.endpoints)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return self._metadata

    def call(
        self,
        service: str,
        method: str,
        request: Any,
        *,
        budget: float | None = None,
        once_sent: bool = False,
    ) -> Any:
        """One unary call, failing over between members within ``budget`` seconds."""
        return self.retrying(
            lambda stub, timeout: getattr(stub, method)(
                request, timeout=timeout, metadata=self._metadata
            ),
            service,
            budget=budget,
            once_sent=once_sent,
        )

    def retrying(
        self,
        send: Callable[[Any, float], Any],
        service: str,
        *,
        budget: float | None = None,
        once_sent: bool = False,
    ) -> Any:
        """Run ``send(stub, per_try_timeout)`` on the current member, failing over.

        :param once_sent: the request is a write that must not be sent twice: a try that
            failed after it may have reached a member raises :class:`_Unsure` instead of
            trying the next member (a try refused before sending still moves on).
        """
        budget = self.budget if budget is None else budget
        deadline = self.clock() + budget
        # One silent member must not eat the whole budget: each try gets its share.
        per_try = max(budget / len(self.endpoints), MIN_TRY)
        reauthenticated = False
        last_error = "no time was left to try a member"
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise _Unreachable(last_error)
            index = self._current
            try:
                if self._user is not None and self._metadata is None:
                    self._authenticate(index, min(per_try, remaining))
                return send(self.stub(service, index), min(per_try, remaining))
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code == grpc.StatusCode.UNAUTHENTICATED or "invalid auth token" in details:
                    if reauthenticated:
                        raise _Unreachable(f"authentication keeps failing: {details}") from None
                    reauthenticated, self._metadata = True, None
                    continue
                if code == grpc.StatusCode.PERMISSION_DENIED or any(
                    sign in details for sign in ("authentication failed", "user name is empty")
                ):
                    raise _Unreachable(f"refused our credentials: {details}") from None
                if code in _CALLER_HANDLES or code in _REFUSED or "larger than max" in details:
                    raise
                if code not in _RETRY_ON and "leader" not in details:
                    raise _Unreachable(f"{self.endpoints[index]}: {code.name} {details}") from None
                last_error = f"{self.endpoints[index]}: {code.name} {details}".strip()
                self.failed(index)
                if once_sent and "failed to connect" not in details:
                    raise _Unsure(last_error) from None
                if (index + 1) % len(self.endpoints) == 0 or len(self.endpoints) == 1:
                    # A full round failed (all down, or an election in progress): pause
                    # briefly instead of spinning on refused connections.
                    time.sleep(min(0.05, max(0.0, deadline - self.clock())))

    def _authenticate(self, index: int, timeout: float) -> None:
        request = etcdrpc.AuthenticateRequest(name=self._user, password=self._password)
        reply = self.stub("Auth", index).Authenticate(request, timeout=timeout)
        self._metadata = (("token", reply.token),)

    def close(self) -> None:
        with self._guard:
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for channel in channels:
            channel.close()


class _Reaper:
    """Revokes, from a thread of its own, leases that could not be revoked at once.

    Such a lease may carry an entry nobody will delete: a put whose outcome is unknown,
    or the place of a waiter that gave up while no member answered. Revoking it frees the
    line as soon as a member answers again, instead of when the lease expires. The thread
    exists only while there is work, and gives a lease up once it has surely expired.
    """

    def __init__(self, revoke: Callable[[int], None], clock: Callable[[], float]) -> None:
        self._revoke = revoke
        self._clock = clock
        self._guard = threading.Lock()
        #: Lease id -> when it has expired on the server even if never revoked.
        self._leases: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._pid = os.getpid()

    def add(self, lease: _Lease) -> None:
        with self._guard:
            if os.getpid() != self._pid:  # a forked child: the parent reaps its own leases
                self._leases.clear()
                self._thread, self._pid = None, os.getpid()
            # A lease lives TTL seconds after its last renewal, longer by at most an
            # election's extension: twice the TTL past its validity is surely the end.
            self._leases[lease.id] = lease.valid_until + lease.ttl
            if not self._closed.is_set() and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(
                    target=self._run, name="celery-singleton-lock-etcd-reaper", daemon=True
                )
                self._thread.start()

    def pending(self) -> set[int]:
        """The ids of leases still to revoke (tests look)."""
        with self._guard:
            return set(self._leases)

    def _run(self) -> None:
        while True:
            with self._guard:
                now = self._clock()
                self._leases = {i: end for i, end in self._leases.items() if end > now}
                due = list(self._leases)
                if not due or self._closed.is_set():
                    self._thread = None
                    return
            for lease_id in due:
                try:
                    self._revoke(lease_id)
                except (LockError, grpc.RpcError):  # still no answer: the next round retries
                    continue
                with self._guard:
                    self._leases.pop(lease_id, None)
            self._closed.wait(REAP_PAUSE)

    def close(self) -> None:
        """Stop; leases not revoked yet expire on the server."""
        self._closed.set()


class EtcdBackend(LockBackend):
    """Locks on an etcd v3 cluster; see the module docstring for the layout.

    :param ca_cert: CA file for ``etcds://``; ``cert_key`` and ``cert_cert`` a client
        certificate. Also accepted as URL query parameters.
    :param user: etcd user (or in the URL: ``etcd://user:password@host``); ``password``.
    :param spare_leases: leases kept for reuse per TTL after release (0: revoke each).
    """

    schemes = ("etcd", "etcds")
    lease_ttl_is_settable = False  # an etcd lease keeps the TTL it was granted with
    # The client's keep-alive and watch streams feed their requests from Python threads,
    # which gevent makes greenlets of the busy hub: renewal would time out.
    gevent_refusal = (
        "celery-singleton-lock cannot renew etcd leases in a gevent worker (-P gevent): "
        "the etcd client's streams stall while a task body keeps the hub busy. Use "
        "-P threads or prefork with etcd, or a Redis or Redlock singleton_lock_backend."
    )

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
        endpoints, options = _parse_url(url, self.url)
        options.update(client_options)
        unknown = sorted(set(options) - set(_CLIENT_OPTIONS))
        if unknown:
            msg = f"unknown etcd option(s) {', '.join(unknown)}; known: {', '.join(_CLIENT_OPTIONS)}"
            raise ConfigurationError(msg, option="singleton_lock_backend_options")
        credentials = None
        if url.lower().startswith("etcds://"):
            credentials = _tls_credentials(options)
        self._spare_limit = int(options.get("spare_leases", SPARE_LEASES))
        self._cluster = _Cluster(
            endpoints,
            credentials=credentials,
            user=options.get("user"),
            password=options.get("password"),
            budget=connect_timeout,
            clock=clock,
        )
        self._spares: dict[int, list[_Lease]] = {}
        self._spares_guard = threading.Lock()
        self._pid = os.getpid()
        self._reaper = _Reaper(lambda lease_id: self._revoke(lease_id, None), clock)
        self._owners: dict[Owner, bytes] = {}
        #: Directory -> the place our last release of it freed (see ``_first_places``).
        self._freed: dict[bytes, int] = {}
        #: Watch events that woke a waiter in this process (tests and benchmarks count them).
        self.wakeups = 0

    # -- keys ------------------------------------------------------------------------------

    def _owner_json(self, owner: Owner) -> bytes:
        """``"\\n<owner JSON>"``, the stored value after the token; kept for the owners
        seen last (a process has few: its own, one per task it runs)."""
        stored = self._owners.get(owner)
        if stored is None:
            if len(self._owners) >= OWNERS_KEPT:
                self._owners.clear()
            stored = self._owners[owner] = b"\n" + owner.as_json().encode()
        return stored

    def _first_places(self, directory: bytes) -> list[int]:
        """The places a waiter offers first: the lowest ones and, among them in order, the
        place our last release of ``directory`` freed. A process that contends in a loop
        queues again right after its release, when a line of more than
        :data:`PLACES_PER_TRY` entries has its lowest places taken and its own place free:
        without it, half its offers found every place taken and cost another transaction.
        A place that existed once adds no name to the directory."""
        freed = self._freed.get(directory)
        lowest = range(PLACES_PER_TRY if freed is None else PLACES_PER_TRY - 1)
        return sorted({*lowest, *(() if freed is None else (freed,))})

    def _full_key(self, key: str) -> str:
        # The directory of the lock. Escaping '/' keeps "a" from containing "a/b"'s entries.
        return f"{self.prefix}/{key.replace('%', '%25').replace('/', '%2F')}/"

    # -- one attempt -----------------------------------------------------------------------

    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        directory = key.encode()

        owner_json = self._owner_json(owner)
        tokens: list[str] = []

        def request(lease: _Lease) -> Any:
            tokens.append(_token(lease, token, 0))
            # Filled in field by field: the hot path, and half the cost of nested messages.
            txn = etcdrpc.TxnRequest()
            # No entry at all in the directory: no holder and nobody queued before us.
            # Then place 0 is free too: an empty line always starts there.
            empty = txn.compare.add()
            empty.key, empty.range_end = directory, _prefix_end(directory)
            empty.target, empty.result = etcdrpc.Compare.CREATE, etcdrpc.Compare.EQUAL
            put = txn.success.add().request_put
            put.key, put.value, put.lease = directory + b"0", tokens[-1].encode() + owner_json, lease.id
            holder = txn.failure.add().request_range
            holder.key, holder.range_end, holder.limit = directory, empty.range_end, 1
            holder.sort_target, holder.sort_order = etcdrpc.RangeRequest.CREATE, etcdrpc.RangeRequest.ASCEND
            return txn

        lease, reply = self._put_with_lease(request, ttl, key)
        if reply.succeeded:
            return Granted(reply.header.revision, token=tokens[-1], valid_until=lease.valid_until)
        # The transaction was applied exactly once and put nothing: the lease is clean.
        self._give_back(lease)
        holder = reply.responses[0].response_range.kvs[0]
        return Refused(holder_ttl=None, holder_task_id=stored_task_id(holder.value))

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
        """Queue an entry of our own in ``key``'s directory and block until every earlier
        entry is gone (FIFO); for a semaphore, until it holds a slot (``_wait_for_slot``).

        Only the entry just before ours is watched, so a release wakes one waiter. Our
        lease is kept alive while we wait; on timeout or error our entry is removed.
        """
        if limit > 1:
            return self._wait_for_slot(key, token, ttl, owner, deadline, limit)
        directory = key.encode()
        owner_json = self._owner_json(owner)
        places = self._first_places(directory)
        while True:

            def request(lease: _Lease, places: list[int] = places) -> Any:
                return _offer(
                    directory, places, lambda at: _token(lease, token, at).encode() + owner_json,
                    lease.id, keys_only=True,
                )

            lease, reply = self._put_with_lease(request, ttl, key)
            queue = reply.responses[1].response_range.kvs
            taken = _place_taken(reply.responses[0].response_txn, places)
            if taken is None:
                # Every place offered was taken (a long line): nothing was put, so the
                # lease is clean. Offer the lowest free places of the line just read.
                self._give_back(lease)
                places = _free_places(directory, queue)
                continue
            entry = directory + _place_name(taken)
            try:
                place = self._wait_in_line(
                    key, directory, entry, reply.header.revision, lease, queue,
                    reply.header.revision, deadline,
                )
            except BaseException:
                self._abandon(lease)
                raise
            if place is None:  # timed out
                self._abandon(lease)
                return None
            if place > 0:
                return Granted(place, token=_token(lease, token, taken), valid_until=lease.valid_until)
            # Our entry vanished (its lease expired while we waited, or an operator deleted
            # it): queue again, at the back, with a new lease, and make sure the old one
            # carries nothing. Reporting the lock held here is etcd bug #11456.
            self._abandon(lease)

    def _put_with_lease(
        self, request: Callable[[_Lease], Any], ttl: float, key: str
    ) -> tuple[_Lease, Any]:
        """Send the transaction ``request(lease)`` with a spare or new lease, within
        connect_timeout, applied exactly once.

        A try with an unknown outcome may still be applied later, even after a retry
        elsewhere succeeded and the entry it made was deleted; its entry would then come
        back as an orphan at the head of the line, kept alive by whoever reused the lease
        (issue 9, items 4 and 15). So its lease is revoked first (no put on a revoked
        lease can succeed, late or not), and the next try has a new lease and token.
        """
        deadline = self.clock() + self.connect_timeout
        fresh_only = False
        while True:
            lease = self._grant(ttl, key, deadline) if fresh_only else self._take_lease(ttl, key, deadline)
            try:
                txn = request(lease)
                reply = self._call("KV", "Txn", txn, key, deadline=deadline, once_sent=True)
            except _Unsure as exc:
                self._discard(lease, deadline, key, str(exc))
                continue
            except grpc.RpcError as exc:  # refused: nothing was put
                if "requested lease not found" not in (exc.details() or ""):
                    raise
                fresh_only = True  # a spare that etcd lost meanwhile
                continue
            except LockError:
                # No try reached a member, or the cluster refused it: nothing was put. The
                # lease is dropped unused (it ends by itself) rather than revoked now,
                # which would cost another connect_timeout while no member answers.
                raise
            except BaseException:
                # No answer at all, or interrupted: the lease is never used again, and is
                # revoked as soon as a member answers, in case something was put on it.
                self._reaper.add(lease)
                raise
            return lease, reply

    def _discard(self, lease: _Lease, deadline: float, key: str, why: str) -> None:
        """Revoke a lease whose put has an unknown outcome, before anything else is tried.

        :raises LockBackendUnavailable: no member could revoke it in time; it is then
            left to the reaper.
        """
        try:
            self._revoke(lease.id, key, deadline=deadline)
        except LockBackendUnavailable:
            self._reaper.add(lease)
            msg = f"etcd at {self.url} did not answer within {self.connect_timeout}s: {why}"
            raise LockBackendUnavailable(msg, url=self.url, key=key) from None

    def _wait_in_line(
        self,
        key: str,
        directory: bytes,
        entry: bytes,
        created_at: int,
        lease: _Lease,
        queue: Sequence[Any],
        seen_at: int,
        deadline: float | None,
    ) -> int | None:
        """Our create revision (``created_at``) once we are first; 0 if our entry
        vanished; None on timeout.

        Places are reused, so an entry is ours only with our create revision: after ours
        expired, a newcomer may have taken the same place, behind whoever is first.
        """
        while True:
            if not any(kv.key == entry and kv.create_revision == created_at for kv in queue):
                return 0
            earlier = [kv for kv in queue if kv.create_revision < created_at]
            if not earlier:
                return created_at
            predecessor = max(earlier, key=lambda kv: kv.create_revision)
            watch = functools.partial(
                self._deleted, predecessor.key, predecessor.create_revision, seen_at, key=key
            )
            outcome = self._watch_alive(key, lease, deadline, watch)
            if outcome is None:
                return None
            if not outcome:
                return 0
            # Re-read the line: the entry before us may have been a waiter that gave up,
            # and our own entry must still exist (never trust the wake-up alone).
            reply = self._call("KV", "Range", _range(directory, keys_only=True).request_range, key)
            queue, seen_at = reply.kvs, reply.header.revision

    def _watch_alive(
        self, key: str, lease: _Lease, deadline: float | None, watch: Callable[[float], bool]
    ) -> bool | None:
        """Block until ``watch(timeout)`` reports what it watches for (True: the entry
        before ours deleted, say), our lease is gone (False) or ``deadline`` passes
        (None), keeping our lease alive every third of its TTL in between."""
        retry_at = -math.inf
        while True:
            now = self.clock()
            if deadline is not None and now >= deadline:
                return None
            keepalive_at = max(lease.valid_until - lease.ttl * (2 / 3), retry_at)
            if now >= keepalive_at:
                sent_at = self.clock()
                try:
                    ttls = self._keep_alive([lease.id], key, budget=self._renewal_budget(lease.ttl))
                except LockBackendUnavailable:
                    # As the lease keeper does: a hung member or an election costs a short
                    # try and another (watching on meanwhile), not our place, until the
                    # lease can no longer be proved alive.
                    if self.clock() >= lease.valid_until:
                        raise
                    retry_at = self.clock() + MIN_TRY
                    continue
                if ttls.get(lease.id, 0) <= 0:
                    return False
                lease.valid_until = sent_at + lease.ttl - clock_drift(lease.ttl)
                continue
            bound = keepalive_at if deadline is None else min(deadline, keepalive_at)
            if watch(bound - now):
                return True

    def _deleted(self, entry: bytes, created_at: int, seen_at: int, timeout: float, *, key: str) -> bool:
        """Watch ``entry``, which existed at revision ``seen_at`` as created at
        ``created_at``: True on its deletion (or when the watch broke and the line must
        be re-read), False when ``timeout`` passed.

        The watch starts at the current revision, not at ``seen_at``: etcd serves a watch
        that starts in the past from a loop that runs every 100 ms, which made handoffs up
        to 100 ms late. What the watch cannot see, a deletion between ``seen_at`` and its
        start, one read after it started catches; it compares the create revision, as the
        place may already hold a newcomer's entry (who would then wait for us: a cycle).
        """

        def created(reply: Any) -> bool:
            return bool(reply.header.revision > seen_at and not self._exists(entry, created_at, key))

        def events(reply: Any) -> bool:
            return bool(reply.events)

        return self._watching(entry, b"", [etcdrpc.WatchCreateRequest.NOPUT], timeout, created, events)

    def _exists(self, entry: bytes, created_at: int, key: str) -> bool:
        reply = self._call("KV", "Range", _range(entry, keys_only=True).request_range, key)
        return any(kv.create_revision == created_at for kv in reply.kvs)

    def _abandon(self, lease: _Lease) -> None:
        # Revoking the lease deletes our entry at once (waking whoever watched it); if
        # no member answers, the reaper revokes it once one does.
        try:
            self._revoke(lease.id, None)
        except LockBackendUnavailable:
            self._reaper.add(lease)

    # -- semaphores (limit > 1) ------------------------------------------------------------
    #
    # One line per key, whatever the limit: an entry holds a slot once fewer entries than
    # its own limit are ahead of it and none ahead is of its task (_holds). Each acquirer
    # enforces its own limit, stored in its token, so a deploy that changes N needs no
    # cleanup and never runs more than the larger N at once; an exclusive lock (limit 1)
    # is the same rule at rank 0, with its own code unchanged.

    def slot_key(self, key: str, slot: int | None) -> str:
        # Every slot is an entry of the key's line; its token names its place.
        return key

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused:
        """Join the line only if fewer than ``limit`` entries are in it and none of our
        task: into an empty line in one transaction (as an exclusive attempt); else the
        line that transaction read decides, and the put is guarded by "nobody joined
        since". A refusal writes nothing."""
        directory = key.encode()
        owner_json = self._owner_json(owner)
        tokens: list[str] = []
        line: list[_Entry] = []
        read_at: int | None = None

        def request(lease: _Lease) -> Any:
            place = 0 if read_at is None else _free_places(directory, line)[0]
            tokens.append(_token(lease, token, place, limit))
            txn = etcdrpc.TxnRequest()
            guard = txn.compare.add()
            guard.key, guard.range_end = directory, _prefix_end(directory)
            guard.target = etcdrpc.Compare.CREATE
            if read_at is None:  # empty: no entry created at all
                guard.result = etcdrpc.Compare.EQUAL
            else:  # no entry created after the read (deletions only free room)
                guard.result, guard.create_revision = etcdrpc.Compare.LESS, read_at + 1
            put = txn.success.add().request_put
            put.key, put.lease = directory + _place_name(place), lease.id
            put.value = tokens[-1].encode() + owner_json
            txn.failure.append(_range(directory))
            return txn

        while True:
            lease, reply = self._put_with_lease(request, ttl, key)
            if reply.succeeded:
                # The slot is our rank, or more if some left meanwhile: below limit.
                fencing_token, valid_until = reply.header.revision, lease.valid_until
                return Granted(fencing_token, token=tokens[-1], valid_until=valid_until, slot=len(line))
            # Applied once and put nothing: the lease is clean.
            self._give_back(lease)
            line, read_at = _entries(reply.responses[0].response_range.kvs), reply.header.revision
            twin = next((e for e in line if owner.task_id and e.task == owner.task_id), None)
            if twin is not None:
                return Refused(holder_ttl=None, holder_task_id=twin.task)
            if len(line) >= limit:
                return Refused(holder_ttl=None, holder_task_id=line[0].task)

    def _wait_for_slot(
        self, key: str, token: str, ttl: float, owner: Owner, deadline: float | None, limit: int
    ) -> Granted | None:
        """Queue an entry of ours (as ``_wait_turn`` does) and block until it holds a slot."""
        directory = key.encode()
        owner_json = self._owner_json(owner)
        places = self._first_places(directory)
        while True:

            def request(lease: _Lease, places: list[int] = places) -> Any:
                return _offer(
                    directory, places, lambda at: _token(lease, token, at, limit).encode() + owner_json,
                    lease.id, keys_only=False,
                )

            lease, reply = self._put_with_lease(request, ttl, key)
            line = _entries(reply.responses[1].response_range.kvs)
            taken = _place_taken(reply.responses[0].response_txn, places)
            if taken is None:
                self._give_back(lease)
                places = _free_places(directory, line)
                continue
            ours = _token(lease, token, taken, limit)
            entry = _Entry(directory + _place_name(taken), reply.header.revision, limit, owner.task_id)
            try:
                value = ours.encode() + owner_json
                outcome = self._wait_for_room(key, directory, entry, value, lease, line, deadline)
            except BaseException:
                self._abandon(lease)
                raise
            if outcome is None:  # timed out
                self._abandon(lease)
                return None
            if isinstance(outcome, tuple):
                slot, fencing_token = outcome
                return Granted(fencing_token, token=ours, valid_until=lease.valid_until, slot=slot)
            # Our entry vanished: queue again, at the back, with a new lease.
            self._abandon(lease)

    def _wait_for_room(
        self,
        key: str,
        directory: bytes,
        ours: _Entry,
        value: bytes,
        lease: _Lease,
        line: list[_Entry],
        deadline: float | None,
    ) -> tuple[int, int] | bool | None:
        """(slot, fencing token) once our entry holds a slot; False if it vanished; None
        on timeout.

        One wake-up per freed slot: only the first waiter watches the whole line (for
        deletions ahead of it, counted without a read); a waiter behind another that is
        kept only by its rank watches just that entry, which is written again once it
        holds its slot (or deleted), and then moves up to watch the line.
        """
        seen_at = ours.created
        waited = False
        while True:
            index = _index_of(line, ours)
            if index is None:
                return False
            ahead = line[:index]
            if not holds(ahead, ours):
                waited = True
                if tells_when_held(ahead, ours):
                    predecessor = ahead[-1]
                    watch = functools.partial(self._touched, predecessor, seen_at, key=key)
                    outcome = self._watch_alive(key, lease, deadline, watch)
                    if outcome is not True:
                        return outcome
                else:
                    room = _Room(ahead, ours, seen_at)
                    watch = functools.partial(self._room_made, directory, room, key=key)
                    outcome = self._watch_alive(key, lease, deadline, watch)
                    if outcome is not True:
                        return outcome
                    if room.vanished:
                        return False
                    if room.holds:
                        line = [*room.ahead, ours]
                        continue
                reply = self._call("KV", "Range", _range(directory).request_range, key)
                line, seen_at = _entries(reply.kvs), reply.header.revision
                continue
            if not waited:  # held from the read that queued us: our put is the grant
                return len(ahead), ours.created
            # Held after waiting: write our entry again. Its revision is the fencing token
            # (above every token granted before, however the line moved), the write tells
            # the waiter behind us, and the compare proves our entry is still there.
            held_at = self._rewrite(key, ours, value, lease)
            return False if held_at is None else (len(ahead), held_at)

    def _rewrite(self, key: str, ours: _Entry, value: bytes, lease: _Lease) -> int | None:
        """Put our entry again, unchanged, if it is still the one we created; the put's
        revision, or None when it is gone."""
        txn = etcdrpc.TxnRequest()
        same = txn.compare.add()
        same.key, same.target, same.result = ours.key, etcdrpc.Compare.CREATE, etcdrpc.Compare.EQUAL
        same.create_revision = ours.created
        put = txn.success.add().request_put
        put.key, put.value, put.lease = ours.key, value, lease.id
        reply = self._call("KV", "Txn", txn, key)
        return int(reply.header.revision) if reply.succeeded else None

    def _touched(self, predecessor: _Entry, seen_at: int, timeout: float, *, key: str) -> bool:
        """Watch ``predecessor`` (a waiter as of revision ``seen_at``): True once it is
        written again (it holds a slot) or deleted, or when the line must be re-read;
        False when ``timeout`` passed. Started at the current revision, with one read
        after it started for what happened before (as ``_deleted``)."""

        def created(reply: Any) -> bool:
            if reply.header.revision <= seen_at:
                return False
            read = self._call("KV", "Range", _range(predecessor.key, keys_only=True).request_range, key)
            return not any(kv.create_revision == kv.mod_revision == predecessor.created for kv in read.kvs)

        def events(reply: Any) -> bool:
            return bool(reply.events)

        return self._watching(predecessor.key, b"", [], timeout, created, events)

    def _room_made(self, directory: bytes, room: _Room, timeout: float, *, key: str) -> bool:
        """Watch the deletions in the whole line, counting those ahead of us in ``room``:
        True once we hold a slot, our entry vanished, or the line must be re-read; False
        when ``timeout`` passed."""

        def created(reply: Any) -> bool:
            if reply.header.revision > room.seen_at:
                read = self._call("KV", "Range", _range(directory).request_range, key)
                room.catch_up(_entries(read.kvs), read.header.revision)
            return room.holds or room.vanished

        def events(reply: Any) -> bool:
            return room.deleted(reply.events)

        return self._watching(directory, _prefix_end(directory), [etcdrpc.WatchCreateRequest.NOPUT],
                              timeout, created, events)

    def _watching(
        self,
        start: bytes,
        end: bytes,
        filters: list[Any],
        timeout: float,
        created: Callable[[Any], bool],
        events: Callable[[Any], bool],
    ) -> bool:
        """One watch of ``start`` (to ``end``, if given) for up to ``timeout`` seconds:
        True as soon as ``created(reply)`` or ``events(reply)`` says so (or the watch
        broke: the caller re-reads), False when the time is up."""
        index = self._cluster._current
        done = threading.Event()

        def requests() -> Iterator[Any]:
            yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=start, range_end=end, filters=filters,
            ))
            done.wait()  # closing the request side would end the watch

        call = self._cluster.stub("Watch", index).Watch(
            requests(), timeout=max(timeout, 0.001), metadata=self._cluster.metadata
        )
        try:
            for reply in call:
                if reply.created:
                    if created(reply):
                        return True
                    continue
                if reply.canceled:  # compacted: re-read the line
                    return True
                if events(reply):
                    self.wakeups += 1
                    return True
            return True
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False
            self._cluster.failed(index)  # the re-read fails over, or reports the cluster down
            return True
        finally:
            done.set()
            call.cancel()

    # -- renewal and release ---------------------------------------------------------------

    def _renewal_budget(self, ttl: float) -> float:
        """How long one renewal may take: a share of the TTL, at most connect_timeout."""
        return min(self.connect_timeout, max(ttl * RENEWAL_SHARE, MIN_TRY))

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        """Keep-alives for every lease in one stream, and, sent at the same time, a check
        that every entry still exists (an operator may have deleted one).

        Both are bounded by a share of the shortest TTL, not by connect_timeout: a
        renewal that waited on a hung member lost short leases it could have kept by
        asking another member (issue 9, item 5). A token that is not one of ours names
        no lease and no entry: it is not renewed, and nothing is sent for it. An entry
        counts only while it stores our exact token (its place may be someone else's).
        """
        lease_ids = [_lease_of(token) for _, token, _ in items]
        entries = [
            (directory.encode() + _place_name(_place_of(token)), token.encode() + b"\n")
            for (directory, token, _), lease_id in zip(items, lease_ids, strict=True)
            if lease_id is not None
        ]
        if not entries:
            return [False] * len(items)
        budget = self._renewal_budget(min(ttl for _, _, ttl in items))
        checks = [
            self._cluster.stub("KV").Txn.future(
                etcdrpc.TxnRequest(success=[_range(entry) for entry, _ in entries[i:i + MAX_TXN_OPS]]),
                timeout=budget, metadata=self._cluster.metadata,
            )
            for i in range(0, len(entries), MAX_TXN_OPS)
        ]
        ttls = self._keep_alive({i for i in lease_ids if i is not None}, None, budget=budget)
        stored: list[bytes] = []
        try:
            # Each check ends by its own deadline, so this waits no longer than the budget.
            for check in checks:
                stored += [b"".join(kv.value for kv in op.response_range.kvs)
                           for op in check.result().responses]
            found = [value.startswith(prefix) for value, (_, prefix) in zip(stored, entries, strict=True)]
        except grpc.RpcError:  # the keep-alives answered; the check can wait for next time
            found = [True] * len(entries)
        exists = iter(found)
        return [
            lease_id is not None and next(exists) and ttls.get(lease_id, 0) > 0
            for lease_id in lease_ids
        ]

    def _keep_alive(
        self, lease_ids: Sequence[int] | set[int], key: str | None, *, budget: float
    ) -> dict[int, int]:
        """Refresh leases in one LeaseKeepAlive stream within ``budget`` seconds; their
        new TTLs (0: gone)."""
        wanted = list(lease_ids)

        def send(stub: Any, timeout: float) -> dict[int, int]:
            requests = [etcdrpc.LeaseKeepAliveRequest(ID=i) for i in wanted]
            call = stub.LeaseKeepAlive(iter(requests), timeout=timeout, metadata=self._cluster.metadata)
            ttls: dict[int, int] = {}
            try:
                for reply in call:
                    ttls[reply.ID] = reply.TTL
                    if len(ttls) == len(wanted):
                        break
            finally:
                call.cancel()
            return ttls

        return self._answering(  # type: ignore[no-any-return]
            lambda: self._cluster.retrying(send, "Lease", budget=budget), key
        )

    def _release_held(self, held: HeldLock) -> bool:
        lease_id = _lease_of(held.token)
        # One guarded delete: the place must still store exactly what we put there (the
        # token and the owner); a token that is not one of ours is refused unsent.
        if lease_id is None:
            ours = False
        else:
            directory, place = self._full_key(held.key).encode(), _place_of(held.token)
            entry = directory + _place_name(place)
            txn = etcdrpc.TxnRequest()
            unchanged = txn.compare.add()
            unchanged.key, unchanged.value = entry, held.token.encode() + self._owner_json(held.owner)
            unchanged.target, unchanged.result = etcdrpc.Compare.VALUE, etcdrpc.Compare.EQUAL
            txn.success.add().request_delete_range.key = entry
            ours = bool(self._call("KV", "Txn", txn, held.key).succeeded)
            if ours:
                if len(self._freed) >= OWNERS_KEPT and directory not in self._freed:
                    self._freed.clear()
                self._freed[directory] = place
        if ours:
            # Our exact entry was there, so its lease is ours: reuse it, or end it.
            assert lease_id is not None
            lease = _Lease(lease_id, held.ttl, held._valid_until)
            if held.lost:
                self._abandon(lease)
            else:
                self._give_back(lease)
        # Not ours: the lease is left alone. Nobody renews it any more, so it ends by
        # itself; revoking a lease named by a token that proved nothing could end another
        # holder's lock (a handle whose token is a prefix of the holder's names its lease).
        return ours

    def keep_until(self, held: HeldLock, deadline: float) -> bool:
        """Keep ``held`` taken until ``deadline`` (``throttle``) without this process's
        help: its entry moves to a lease of its own, granted for the time left (etcd
        counts whole seconds: rounded up), by a transaction that compares the entry.
        Nothing renews that lease, so the server frees the key by itself, at most a
        second past the deadline, even if this process dies meanwhile; while it lives,
        it revokes the lease at the deadline, which frees the key (and wakes a waiter)
        on time. The old lease, which carries nothing now, is kept as a spare.

        :returns: False when the lock was no longer ours.
        """
        remaining = deadline - self.clock()
        lease_id = _lease_of(held.token)
        if remaining < MIN_TTL or held.taken_by != os.getpid() or held.released or lease_id is None:
            return self.release(held)
        LeaseKeeper.for_process().untrack(held)
        window = self._grant(remaining, held.key, self.clock() + self.connect_timeout)
        entry = self._full_key(held.key).encode() + _place_name(_place_of(held.token))
        value = held.token.encode() + self._owner_json(held.owner)
        txn = etcdrpc.TxnRequest()
        unchanged = txn.compare.add()
        unchanged.key, unchanged.value = entry, value
        unchanged.target, unchanged.result = etcdrpc.Compare.VALUE, etcdrpc.Compare.EQUAL
        put = txn.success.add().request_put
        put.key, put.value, put.lease = entry, value, window.id
        try:
            moved = bool(self._call("KV", "Txn", txn, held.key).succeeded)
        except BaseException:
            self._reaper.add(window)  # it may carry our entry: revoked once a member answers
            raise
        held._mark_released()  # the window's lease ends it: a later release() has nothing to do
        if not moved:
            self._abandon(window)
            return False
        self._give_back(_Lease(lease_id, held.ttl, held._valid_until))
        timer = threading.Timer(remaining, self._abandon, (window,))
        timer.daemon = True
        timer.start()
        return True

    def _release(self, key: str, field: str, value: str) -> bool:
        # By owner (the worker's main process, once a pool process is dead) or by token
        # alone: remove the entries whose stored owner (or token) is exactly ``value``,
        # holder or queued, each only if it is still the entry we read; True if one was
        # a holder (of the lock, or of a semaphore's slot). (A HeldLock is released in
        # one request by _release_held.)
        wanted = value.encode()
        reply = self._call("KV", "Range", _range(key.encode()).request_range, key)
        holders = _holders(reply.kvs)
        released = False
        for kv, holder in zip(reply.kvs, holders, strict=True):
            stored_token, newline, stored_owner = kv.value.partition(b"\n")
            if newline and (stored_owner if field == "owner" else stored_token) == wanted:
                deleted = self._delete_entry(kv.key, etcdrpc.Compare(
                    target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL,
                    create_revision=kv.create_revision,
                ), key)
                released = released or (deleted and holder)
        return released

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        # One read of the line finds the owner's entry, whatever its slot.
        return self._release(key, "owner", owner_json)

    def _delete_entry(self, entry: bytes, guard: Any, key: str) -> bool:
        """Delete ``entry`` if ``guard`` (a Compare, its key filled in here) holds."""
        guard.key = entry
        request = etcdrpc.TxnRequest(
            compare=[guard],
            success=[etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=entry))],
        )
        return bool(self._call("KV", "Txn", request, key).succeeded)

    # -- leases ----------------------------------------------------------------------------

    def _take_lease(self, ttl: float, key: str, deadline: float) -> _Lease:
        """A spare lease of this TTL renewed less than a third of a TTL ago, or a new one.

        An older spare is dropped without a call: it expires on the server within the
        TTL. (Reusing it would make the lease keeper renew it at once.)
        """
        self._forget_spares_after_fork()
        with self._spares_guard:
            spares = self._spares.get(_lease_seconds(ttl), [])
            while spares:
                lease = spares.pop()
                if lease.valid_until - self.clock() > ttl * (2 / 3):
                    lease.ttl = ttl
                    return lease
        return self._grant(ttl, key, deadline)

    def _grant(self, ttl: float, key: str, deadline: float) -> _Lease:
        # We choose the id (from secrets): ids are then unguessable, and a grant retried
        # after a lost reply finds "already exists", which can only be our own.
        lease_id = secrets.randbits(63) or 1
        sent_at = self.clock()
        try:
            request = etcdrpc.LeaseGrantRequest(TTL=_lease_seconds(ttl), ID=lease_id)
            self._call("Lease", "LeaseGrant", request, key, deadline=deadline)
        except grpc.RpcError as exc:
            if "lease already exists" not in (exc.details() or ""):
                raise
        return _Lease(lease_id, ttl, sent_at + ttl - clock_drift(ttl))

    def _give_back(self, lease: _Lease) -> None:
        with self._spares_guard:
            spares = self._spares.setdefault(_lease_seconds(lease.ttl), [])
            if len(spares) < self._spare_limit and os.getpid() == self._pid:
                spares.append(lease)
                return
        self._abandon(lease)

    def _forget_spares_after_fork(self) -> None:
        # A forked child must never use its parent's spares: two processes would attach
        # entries to one lease, and one's revoke would delete the other's entry.
        if os.getpid() != self._pid:
            with self._spares_guard:
                self._spares.clear()
                self._pid = os.getpid()

    def _revoke(self, lease_id: int, key: str | None, *, deadline: float | None = None) -> None:
        try:
            request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
            self._call("Lease", "LeaseRevoke", request, key, deadline=deadline)
        except grpc.RpcError as exc:
            if "requested lease not found" not in (exc.details() or ""):
                raise

    # -- plumbing --------------------------------------------------------------------------

    def _call(
        self,
        service: str,
        method: str,
        request: Any,
        key: str | None,
        *,
        deadline: float | None = None,
        once_sent: bool = False,
    ) -> Any:
        """One call within connect_timeout, or until ``deadline`` (monotonic)."""
        budget = None if deadline is None else deadline - self.clock()
        return self._answering(
            lambda: self._cluster.call(service, method, request, budget=budget, once_sent=once_sent),
            key,
        )

    def _answering(self, send: Callable[[], Any], key: str | None) -> Any:
        """Run ``send``; "no member answered" becomes LockBackendUnavailable (URL masked),
        and a refusal of the request itself the error that names its cause."""
        try:
            return send()
        except _Unreachable as exc:
            msg = f"etcd at {self.url} did not answer within {self.connect_timeout}s: {exc}"
            raise LockBackendUnavailable(msg, url=self.url, key=key) from None
        except grpc.RpcError as exc:
            refusal = _refusal(exc, key)
            if refusal is None:
                raise
            raise refusal from None

    # -- for operators (celery locks) -------------------------------------------------------

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """One read of every entry under the prefix (or the key's directory), in create
        revision order: each directory's first entry is its holder (for a semaphore, every
        entry that holds a slot, see ``_holds``), the rest its line. Then each holder's
        lease, for the TTL left (whole seconds: etcd counts them)."""
        directory = f"{self.prefix}/".encode() if key is None else self._full_key(key).encode()
        reply = self._call("KV", "Range", _range(directory).request_range, key)
        lines: dict[bytes, list[Any]] = {}
        start = len(f"{self.prefix}/")
        for kv in reply.kvs:
            cut = kv.key.rindex(b"/") + 1
            if b"/" in kv.key[start : cut - 1] or not _PLACE.fullmatch(kv.key[cut:]):
                continue  # not an entry of a lock's line
            lines.setdefault(kv.key[:cut], []).append(kv)
        found = []
        for path, line in lines.items():
            holders = _holders(line)
            waiting = holders.count(False)
            name = path[start:-1].decode()
            for rank, (holder, holding) in enumerate(zip(line, holders, strict=True)):
                if not holding:
                    continue
                asked = etcdrpc.LeaseTimeToLiveRequest(ID=holder.lease)
                left = self._call("Lease", "LeaseTimeToLive", asked, name)
                if left.TTL < 0:
                    continue  # its lease ended: etcd deletes the entry now (0: under a second)
                token, owner = split_stored(holder.value)
                limit = _limit_of(holder.value)
                found.append(LockInfo(
                    # A slot's grant is its entry's last write (see _wait_for_room); an
                    # exclusive lock's entry is written once.
                    key=_unescaped(name), owner=owner, token=token,
                    fencing_token=holder.create_revision if limit == 1 else holder.mod_revision,
                    ttl=float(left.TTL), waiting=waiting, slot=None if limit == 1 else rank, limit=limit,
                    location=f"{self.url} {holder.key.decode(errors='replace')}",
                ))
        return found

    def close(self) -> None:
        self._reaper.close()
        with self._spares_guard:
            spares = [lease for leases in self._spares.values() for lease in leases]
            self._spares.clear()
        for lease in spares:
            with contextlib.suppress(LockBackendUnavailable, grpc.RpcError):  # else it expires
                self._revoke(lease.id, None)
        self._cluster.close()


def _unescaped(name: str) -> str:
    """A key from its directory name (see ``EtcdBackend._full_key``)."""
    return re.sub("%(25|2F)", lambda m: "%" if m[1] == "25" else "/", name)


def _lease_of(token: str) -> int | None:
    """The lease id in one of our tokens; None for anything else (never a prefix)."""
    return int(token[:16], 16) if _TOKEN.fullmatch(token) else None


def _place_of(token: str) -> int:
    """The place in one of our tokens (checked by :func:`_lease_of` first)."""
    return int(token[32:40], 16)


def _token(lease: _Lease, token: str, place: int, limit: int = 1) -> str:
    """The token of an acquisition with ``lease`` in ``place`` (``token``: 16+ random hex);
    a semaphore's entry (``limit`` > 1) ends in its limit."""
    slots = "" if limit == 1 else f"{limit:04x}"
    return f"{lease.id:016x}{token[:16]}{place:08x}{slots}"


def _limit_of(value: bytes) -> int:
    """The limit of the acquisition that stored ``value``: 1 for an exclusive lock."""
    token = value.partition(b"\n")[0]
    return int(token[40:44], 16) if len(token) == 44 else 1


def _place_name(place: int) -> bytes:
    return b"%x" % place


def _offer(
    directory: bytes,
    places: Sequence[int],
    value_of: Callable[[int], bytes],
    lease_id: int,
    *,
    keys_only: bool,
) -> Any:
    """Put into the first free place of ``places`` (each level: "if this place is free,
    take it, else try the next"), storing ``value_of(place)``, then read the line."""
    offer: Any = None
    for place in reversed(places):
        entry = directory + _place_name(place)
        offer = etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(
                key=entry, target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL, create_revision=0,
            )],
            success=[_put(entry, value_of(place), lease_id)],
            failure=[] if offer is None else [etcdrpc.RequestOp(request_txn=offer)],
        )
    return etcdrpc.TxnRequest(success=[
        etcdrpc.RequestOp(request_txn=offer), _range(directory, keys_only=keys_only),
    ])


def _entries(kvs: Sequence[Any]) -> list[_Entry]:
    """A line read with its values (create-revision order) as :class:`_Entry`."""
    return [
        _Entry(kv.key, kv.create_revision, _limit_of(kv.value), _task_of(kv.value.partition(b"\n")[2]))
        for kv in kvs
    ]


@functools.lru_cache(maxsize=4 * OWNERS_KEPT)
def _task_of(owner_json: bytes) -> str | None:
    """The task id in an entry's owner JSON. A waiter reads the whole line on most
    wake-ups, and its entries repeat the owners of a few processes: parsed once each."""
    return stored_task_id(b"\n" + owner_json)


def _index_of(line: Sequence[_Entry], entry: _Entry) -> int | None:
    """Where ``entry`` is in ``line`` (None: gone; its place may hold a newcomer)."""
    return next((i for i, e in enumerate(line) if e.key == entry.key and e.created == entry.created), None)


def _holders(kvs: Sequence[Any]) -> list[bool]:
    """Which entries of a line read with its values (create-revision order) hold the
    lock or a slot: for an exclusive lock's line, the first alone."""
    line = _entries(kvs)
    return [holds(line[:rank], entry) for rank, entry in enumerate(line)]


def _place_taken(reply: Any, places: Sequence[int]) -> int | None:
    """Which of ``places`` the offer (nested "if free, take it, else...") took, if any."""
    for place in places:
        if reply.succeeded:
            return place
        if not reply.responses:
            return None
        reply = reply.responses[0].response_txn
    return None


def _free_places(directory: bytes, queue: Sequence[Any]) -> list[int]:
    """The lowest :data:`PLACES_PER_TRY` places not taken in ``queue``."""
    taken = {kv.key[len(directory):] for kv in queue}
    return list(itertools.islice(
        (place for place in itertools.count() if _place_name(place) not in taken), PLACES_PER_TRY
    ))


def _refusal(exc: grpc.RpcError, key: str | None) -> LockError | None:
    """The error for etcd refusing the request itself (None: not a refusal).

    Retrying would meet the same refusal, so it must not read as an outage.
    """
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.OUT_OF_RANGE and "lease TTL" in details:
        msg = f"etcd refused the lock's TTL ({details}); use a shorter ttl"
        return ConfigurationError(msg, option="ttl")
    if "larger than max" in details or "request is too large" in details:
        shown = "" if key is None else f" for a key of {len(key.encode())} bytes"
        msg = (
            f"etcd refused the request{shown} as too large ({details}); use a shorter key, "
            "or raise the server's --max-request-bytes"
        )
        return LockKeyError(msg, argument="key")
    if code in _REFUSED:
        msg = f"etcd refused the request: {code.name} {details}"
        return ConfigurationError(msg, option="singleton_lock_backend")
    return None


def _parse_url(url: str, masked: str) -> tuple[list[str], dict[str, Any]]:
    """Endpoints (host:port) and options (user, password, TLS files) from an etcd URL."""
    parts = urlsplit(url)
    netloc = parts.netloc
    options: dict[str, Any] = dict(parse_qsl(parts.query))
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, password = credentials.partition(":")
        options["user"], options["password"] = unquote(user), unquote(password)
    endpoints = []
    for host in filter(None, netloc.split(",")):
        if host.startswith("["):  # [::1]:2379
            address, _, port = host[1:].partition("]")
            endpoints.append(f"[{address}]:{port.lstrip(':') or DEFAULT_PORT}")
        else:
            address, _, port = host.partition(":")
            endpoints.append(f"{address}:{port or DEFAULT_PORT}")
    if not endpoints:
        msg = f"etcd URL {masked!r} names no host (etcd://host1:2379,host2:2379)"
        raise ConfigurationError(msg, option="singleton_lock_backend")
    return endpoints, options


def _tls_credentials(options: dict[str, Any]) -> grpc.ChannelCredentials:
    def read(name: str) -> bytes | None:
        path = options.get(name)
        if path is None:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            msg = f"cannot read the etcd TLS file {name}={path!r}: {exc.strerror}"
            raise ConfigurationError(msg, option=name) from None

    return grpc.ssl_channel_credentials(read("ca_cert"), read("cert_key"), read("cert_cert"))


def _lease_seconds(ttl: float) -> int:
    # etcd leases count whole seconds (and the server may raise a short one to its
    # minimum, 1.5 election timeouts): never shorter than the TTL asked for.
    return max(1, math.ceil(ttl))


def _prefix_end(prefix: bytes) -> bytes:
    # The first key after every key starting with ``prefix`` (prefixes here end in '/').
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _put(entry: bytes, value: bytes, lease_id: int) -> Any:
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=entry, value=value, lease=lease_id))


def _range(key: bytes, *, limit: int = 0, keys_only: bool = False, count_only: bool = False) -> Any:
    """A read of one entry, or (for a directory, ending in '/') of the whole line in
    create-revision order."""
    request = etcdrpc.RangeRequest(key=key, keys_only=keys_only, count_only=count_only, limit=limit)
    if key.endswith(b"/"):
        request.range_end = _prefix_end(key)
        request.sort_target = etcdrpc.RangeRequest.CREATE
        request.sort_order = etcdrpc.RangeRequest.ASCEND
    return etcdrpc.RequestOp(request_range=request)
