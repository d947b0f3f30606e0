"""The interface every lock backend implements, and the logic they all share.

:class:`LockBackend` owns the public methods: validation, tokens, the blocking loop with
its deadline, handing leases to the lease keeper, logging and signals. A backend only
implements one-shot steps on fully prefixed keys (``_full_key``); docs/backends.md is the
guide for writing one.

``_try_acquire(key, token, ttl, owner)``    one attempt: :class:`Granted` or :class:`Refused`
``_renew(items)``                           replace the TTL of many locks in one round trip
``_release(key, field, value)``             delete if the stored ``field`` equals ``value``

``_held(key)``                              every lock held under the prefix (key None), or
                                            the holders of one key, as :class:`LockInfo`
``_try_acquire_slot(key, token, ttl, owner, limit)``  one attempt at any free slot of a
                                            counting semaphore of ``limit`` > 1 slots

Semaphores (``limit`` N > 1): a slot is a lease like a lock, renewed and released through
the same hooks on its record's key, :meth:`LockBackend.slot_key` (slot 0 is the key of the
exclusive lock itself, so ``limit=1`` and ``limit=N`` holders of one key exclude each other
correctly, and a deploy that changes N never runs more than the larger N at once).
``_try_acquire_slot`` must: take the lowest free slot below ``limit`` atomically (one round
trip where the store allows); give a fencing token above every earlier one of the key, all
slots counted; refuse (``Refused`` with that ``holder_task_id``) an owner whose task id
already holds a slot of the key, so a redelivered copy never takes a second slot; and
report ``Refused.holder_ttl`` as the soonest expiry of the slots (a waiter's bound).

and one way to wait, by the kind of store it is:

``_wait_for_release(key, timeout)``         a TTL store (Redis): block until a release is
                                            announced; the base then tries again
``_wait_turn(key, token, ttl, owner, deadline)``  a queue store (etcd, ZooKeeper): join the
                                            line and block until first (FIFO)

The duties that come with them, which the contract suite (tests/contract.py) checks:

- every error of the server or the network is a :class:`LockBackendUnavailable` naming
  ``self.url`` (the password is masked) within ``connect_timeout``; a try whose outcome
  is unknown must not leave a lock behind that nobody will release or renew;
- the stored value is ``owner.stored_with(token)``, so ``release_owned`` (by owner) works
  from another process, and a refusal can name the holder's task id;
- fencing tokens only rise per key, also across the key's deletion and expiry;
- fork safety: a forked child makes its own connections and never renews or releases
  its parent's locks (the keeper is per process; connections must be too);
- a scheme is registered through the entry point group ``celery_singleton_lock.backends``
  (``scheme = "module:Class"``); the class names its schemes in ``schemes``;
- ``_held`` reads without writing, within ``connect_timeout``, and shows only what a
  holder could renew (no expired lease, no waiter, no free record);
- constructor keywords: ``url``, then ``prefix``, ``connect_timeout`` and ``clock`` passed
  on to this class, then the backend's own options (unknown ones are a
  :class:`ConfigurationError` naming ``singleton_lock_backend_options``).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

from celery_singleton_lock import signals
from celery_singleton_lock.backends.owner import HOST, Owner
from celery_singleton_lock.errors import ConfigurationError, LockContended, LockError, mask_url
from celery_singleton_lock.lease import HeldLock, LeaseKeeper, clock_drift

__all__ = ["Granted", "LockBackend", "LockInfo", "NodeStatus", "Reachability", "Refused"]

logger = logging.getLogger("celery_singleton_lock.acquire")
release_logger = logging.getLogger("celery_singleton_lock.release")

#: The key that :meth:`LockBackend.ping` takes and releases to prove locks are granted.
PING_KEY = "celery-locks-ping"

@dataclass(frozen=True)
class Granted:
    """An attempt that got the lock.

    :ivar token: the acquisition's token, when the backend names it itself (etcd puts
        the lease id in it); None keeps the random token :meth:`LockBackend.attempt` drew.
    :ivar valid_until: the lease's validity deadline (monotonic), when it started before
        this attempt (a lease granted earlier and reused); None: sent time + TTL - drift.
    :ivar slot: the semaphore slot granted (0 to limit-1); None for an exclusive lock.
    """

    fencing_token: int
    token: str | None = None
    valid_until: float | None = None
    slot: int | None = None


@dataclass(frozen=True)
class Refused:
    """An attempt that found the lock taken.

    :ivar holder_ttl: seconds left on the holder's lease when we looked, if known.
    :ivar holder_task_id: the holder's Celery task id, if it is a task.
    """

    holder_ttl: float | None
    holder_task_id: str | None = None


@dataclass(frozen=True)
class LockInfo:
    """One held lock as the server shows it to people (``celery locks``).

    A lock of ``lock_limit`` N > 1 (a semaphore) shows one :class:`LockInfo` per slot held,
    each with its ``slot`` (0 to N-1) and ``limit``; an exclusive lock has slot None.

    :ivar key: the key as given to ``acquire`` (without the backend's prefix).
    :ivar owner: who holds it (None: a value that is not ours, shown as unknown).
    :ivar token: the holder's token, which :meth:`LockBackend.break_lock` compares; it
        renews and releases the lock, so it is never printed.
    :ivar fencing_token: the holder's fencing token (None where the store cannot tell).
    :ivar ttl: seconds left on the lease; None: the server keeps no expiry while the
        holder lives (file://: its open descriptor; ZooKeeper: its session).
    :ivar held_since: when it was granted (Unix time, the server's clock), where the store
        records it; None elsewhere.
    :ivar waiting: acquisitions queued behind the holder (queue stores); None: unknown.
    :ivar location: where the lock lives on the server (a Redis key, a node path, a
        file), for an operator who looks with the store's own tools.
    """

    key: str
    owner: Owner | None
    token: str = field(repr=False)
    fencing_token: int | None
    ttl: float | None
    held_since: float | None = None
    waiting: int | None = None
    slot: int | None = None
    limit: int = 1
    location: str = ""


@dataclass(frozen=True)
class NodeStatus:
    """One server of a backend as :meth:`LockBackend.ping` saw it.

    :ivar url: the node's URL, password masked.
    :ivar round_trip: seconds one request took (None: it did not answer).
    :ivar clock_offset: the server's clock minus ours, in seconds, where the server tells
        its time (Redis TIME); None elsewhere.
    :ivar error: why it did not answer.
    """

    url: str
    round_trip: float | None
    clock_offset: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Reachability:
    """What :meth:`LockBackend.ping` found: every node, how many must answer, and
    whether a lock was granted and released."""

    nodes: list[NodeStatus]
    #: How many nodes must answer for locks to be granted (Redlock: a majority).
    needed: int
    #: None when the lock could be taken and released; else why not.
    grant_error: str | None

    @property
    def can_grant(self) -> bool:
        return self.grant_error is None


class LockBackend(ABC):
    """A lock server, reached through one URL. Get one with :func:`connect`.

    :param url: the server's URL (its scheme chose this class).
    :param prefix: namespace put in front of every key.
    :param connect_timeout: seconds within which an unreachable server is reported as
        :class:`LockBackendUnavailable`.
    :param clock: a monotonic clock; tests pass a fake one.
    """

    #: URL schemes this backend serves.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Why this backend cannot keep leases in a gevent worker, if it cannot (the worker
    #: then refuses to start with this message); None: it can (see _native.py).
    gevent_refusal: ClassVar[str | None] = None

    #: Whether a renewal can give a lease any TTL (a TTL store: Redis, PostgreSQL,
    #: memory); False where the lease's length is the server's or the kernel's (etcd
    #: leases, ZooKeeper sessions, file locks). See :meth:`keep_until`.
    lease_ttl_is_settable: ClassVar[bool] = True

    #: A queue store (it overrides ``_wait_turn``); set for each class when it is made.
    queues_waiters: ClassVar[bool] = False
    #: It grants semaphore slots (it implements ``_try_acquire_slot``); set likewise.
    counts_slots: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.queues_waiters = cls._wait_turn is not LockBackend._wait_turn
        cls.counts_slots = cls._try_acquire_slot is not LockBackend._try_acquire_slot
        if not cls.queues_waiters and cls._wait_for_release is LockBackend._wait_for_release:
            msg = (
                f"{cls.__name__} must implement _wait_for_release (a TTL store) or "
                "_wait_turn (a queue store): see celery_singleton_lock.backends.base"
            )
            raise TypeError(msg)

    @classmethod
    def from_url(cls, url: str | Sequence[str], **options: Any) -> LockBackend:
        """The backend that :func:`connect` makes for ``url`` (a backend with defaults of
        its own for connect overrides this)."""
        return cls(url, **options)  # type: ignore[arg-type]  # only Redlock takes a list

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        """Refuse, before any connection, a URL this backend cannot use.

        The default checks every ``host:port`` of the URL's host list; a backend extends
        it. :raises ConfigurationError: naming ``option``, the password masked.
        """
        for each in [url] if isinstance(url, str) else url:
            hosts = urlsplit(each).netloc.rpartition("@")[2]
            for host in filter(None, (h.strip() for h in hosts.split(","))):
                after_address = host.rpartition("]")[2]
                port = after_address.rpartition(":")[2] if ":" in after_address else ""
                if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                    msg = f"{option}: port {port!r} of {mask_url(each)!r} is not a number from 1 to 65535"
                    raise ConfigurationError(msg, option=option)

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = mask_url(url)
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self.clock = clock

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- the public lock API -------------------------------------------------------------

    def acquire(
        self,
        key: str,
        ttl: float,
        *,
        blocking: bool = False,
        timeout: float | None = None,
        owner: Owner | None = None,
        limit: int = 1,
    ) -> HeldLock | None:
        """Take the lock ``key`` for ``ttl`` seconds, kept alive until released.

        :param blocking: wait for the holder to release (woken by the server, never by
            polling) instead of returning None at once.
        :param timeout: with ``blocking``, give up after this many seconds (None: never).
        :param owner: who holds it, stored for people and for ``revoke``.
        :param limit: up to this many holders of ``key`` at once (a counting semaphore);
            the :class:`HeldLock` names its ``slot``. 1: an exclusive lock.
        :returns: a :class:`HeldLock`, or None when the lock is taken (or the wait timed out).
        :raises LockBackendUnavailable: the server did not answer within ``connect_timeout``.
        :raises ConfigurationError: for a key, TTL, timeout or limit out of bounds (see
            ``MIN_TTL``, ``MAX_TTL``, ``MAX_KEY_BYTES``, ``MAX_LIMIT``);
            ``timeout=math.inf`` is the same as None.
        """
        timeout = _check_timeout(timeout)
        if blocking and self.queues_waiters:
            # A queue store's wait begins with a place in line, which is granted at once
            # when the line is empty. Trying first would queue twice: a refused attempt
            # writes and deletes an entry of its own, then the wait queues another behind
            # whoever came meanwhile (not FIFO, and twice the writes under contention).
            return self.wait(key, ttl, timeout=timeout, owner=owner, limit=limit)
        result = self.attempt(key, ttl, owner=owner, limit=limit)
        if isinstance(result, HeldLock):
            return result
        if not blocking:
            return None
        return self.wait(key, ttl, timeout=timeout, owner=owner, refused=result, limit=limit)

    @contextmanager
    def lock(
        self,
        key: str,
        ttl: float,
        *,
        timeout: float | None = None,
        blocking: bool = True,
        limit: int = 1,
    ) -> Iterator[HeldLock]:
        """Hold ``key`` (one of its ``limit`` slots) for the ``with`` block; its body never
        runs unlocked.

        :raises LockContended: the lock could not be taken (within ``timeout``).
        """
        timeout = _check_timeout(timeout)
        held = self.acquire(key, ttl, blocking=blocking, timeout=timeout, limit=limit)
        if held is None:
            waited = f" within {timeout}s" if blocking and timeout is not None else ""
            taken = "is held by somebody else" if limit == 1 else f"has all {limit} slots taken"
            raise LockContended(f"lock {key!r} {taken}{waited}", key=key)
        try:
            yield held
        finally:
            self.release(held)

    def release(self, held: HeldLock) -> bool:
        """Release ``held`` if it is still ours; wake one waiter.

        :returns: False when it was no longer ours (lost, expired, or released before),
            and in a forked child, which inherited the handle but not the lock.
        """
        if held.taken_by != os.getpid():
            release_logger.warning(
                "lock %r was taken by process %s: process %s (a forked child) does not "
                "release it", held.key, held.taken_by, os.getpid(),
            )
            return False
        LeaseKeeper.for_process().untrack(held)
        if not held._mark_released():
            return False
        ours = self._release_held(held)
        if ours:
            release_logger.debug("released %r", held.key)
        else:
            release_logger.warning(
                "lock %r was no longer ours when released (fencing token %s)",
                held.key, held.fencing_token,
            )
        signals.lock_released.send(sender=held.sender, key=held.key, held=held, was_held=ours)
        return ours

    def keep_until(self, held: HeldLock, deadline: float) -> bool:
        """Keep ``held`` taken until ``deadline`` (on ``self.clock``), then let it go: for
        ``throttle``, which keeps a key taken for a while after a successful run.

        A TTL store (:attr:`lease_ttl_is_settable`) renews the lease once with the time
        left as its TTL and stops renewing it: the server frees it at the deadline, also
        if this process dies first. Elsewhere (an etcd lease, a ZooKeeper session, a
        kernel file lock: their lease length is the server's or the kernel's) the lease
        keeper renews it until the deadline and this process releases it then, which
        wakes a waiter; should the process die first, the key is freed with it, early.
        A deadline closer than ``MIN_TTL`` releases at once.

        :returns: False when the lock was no longer ours.
        """
        remaining = deadline - self.clock()
        if remaining < MIN_TTL or held.taken_by != os.getpid() or held.released:
            return self.release(held)
        keeper = LeaseKeeper.for_process()
        if not self.lease_ttl_is_settable:
            held.stop_renewal_at(deadline)
            keeper.track(held)  # the task's end may have untracked it already
            timer = threading.Timer(remaining, held.release_quietly)
            timer.daemon = True
            timer.start()
            return not held.lost
        keeper.untrack(held)
        held.ttl = remaining  # what the one renewal sets; nothing renews it after
        ours = self.renew([held])[0]
        held._mark_released()  # the server ends it: a later release() has nothing to do
        release_logger.debug("%r is kept for %.2fs more by its TTL", held.key, remaining)
        return ours

    def release_owned(self, key: str, owner: Owner, *, limit: int = 1) -> bool:
        """Release ``key`` (the slot of it, for a semaphore of ``limit`` slots) if
        ``owner`` (host, pid and task id, all of them) holds it.

        For the worker's main process once a pool process it killed (revoke with
        terminate, hard time limit) or lost is dead: the lock is free at once instead of
        at TTL expiry. Never by task id alone: a redelivered copy of the same task, on
        another host or in another process, may hold the lock under the same task id.
        """
        return self._release_by_owner(self._full_key(key), owner.as_json(), self._check_limit(limit))

    def renew(self, locks: Sequence[HeldLock]) -> list[bool]:
        """Replace the TTL of every lock in ``locks`` (one round trip); True where still ours."""
        if not locks:
            return []
        return self._renew([(self.slot_key(self._full_key(h.key), h.slot), h.token, h.ttl) for h in locks])

    def slot_key(self, key: str, slot: int | None) -> str:
        """The key (fully prefixed) of the record of semaphore slot ``slot`` of ``key``:
        ``key`` itself for slot 0 (the exclusive lock's record) and None; the record's
        key, which renewal and release are given, for the others. A backend whose keys
        need a shape of their own (a Redis hash tag) overrides it."""
        if not slot:
            return key
        return f"{key}{SLOT_MARK}{slot}"

    def _check_limit(self, limit: object) -> int:
        """``limit`` as a number of slots this backend can grant.

        :raises ConfigurationError: naming ``limit``.
        """
        limit = check_limit(limit)
        if limit > 1 and not self.counts_slots:
            msg = f"limit: {type(self).__name__} ({self.url}) grants exclusive locks only, not limit={limit}"
            raise ConfigurationError(msg, option="limit")
        return limit

    def close(self) -> None:  # noqa: B027 - a backend without resources has nothing to close
        """Close connections. Held locks are left to their TTL."""

    # -- looking at locks, for operators (``celery locks``) ------------------------------

    def held_locks(self) -> list[LockInfo]:
        """Every lock held under this backend's prefix, sorted by key (then slot).

        Reads only; a lease that expired is not shown. Costs a scan of the namespace: for
        people and tools, not for a task's hot path.

        :raises LockBackendUnavailable: the server did not answer within ``connect_timeout``.
        """
        return sorted(self._held(None), key=lambda info: (info.key, info.slot or 0))

    def lock_info(self, key: str) -> list[LockInfo]:
        """Who holds ``key`` now: empty when nobody does (one entry per slot of a
        semaphore).

        :raises LockBackendUnavailable: the server did not answer within ``connect_timeout``.
        """
        _check_key(key)
        return sorted(self._held(key), key=lambda info: info.slot or 0)

    def break_lock(self, info: LockInfo) -> bool:
        """Release the lock that ``info`` shows, whoever holds it: for a lock left by a
        stuck holder. Only that acquisition (its token) is released, so a lock taken again
        since is left alone. A holder that is alive learns at its next renewal that the
        lock is lost (``lock_lost``); one waiter is woken.

        :returns: False when that acquisition no longer holds it.
        :raises LockError: where the store cannot release another process's lock (file://).
        """
        _check_key(info.key)
        broken = self._break(info)
        if broken:
            release_logger.info(
                "broke lock %r (fencing token %s) held by %s", info.key, info.fencing_token,
                info.owner.as_json() if info.owner else "an unknown owner",
            )
        return broken

    def ping(self) -> Reachability:
        """Reach every node of the backend, then, if enough answered, take and release a
        lock (``PING_KEY``, this host and process; one second at most).

        Never raises for the server's sake: what failed is in the result.
        """
        nodes = self._ping()
        needed = self._nodes_needed(len(nodes))
        answered = sum(node.error is None for node in nodes)
        if answered < needed:  # no lock can be granted: no need to wait for a probe to say so
            errors = "; ".join(f"{node.url}: {node.error}" for node in nodes if node.error)
            why = f"{answered} of {len(nodes)} nodes answered, {needed} needed: {errors}"
            return Reachability(nodes, needed, why)
        grant_error: str | None = None
        try:
            held = self.acquire(f"{PING_KEY}:{HOST}:{os.getpid()}", ttl=1.0)
            if held is None:
                grant_error = "the probe lock of this process was held by somebody else"
            else:
                LeaseKeeper.for_process().untrack(held)  # released at once, never renewed
                self.release(held)
        except Exception as exc:  # a reply error too (a Redis replica's READONLY): it grants nothing
            grant_error = str(exc) if isinstance(exc, LockError) else f"{type(exc).__name__}: {exc}"
        return Reachability(nodes, needed, grant_error)

    # -- shared steps, also used by the Celery task ------------------------------------

    def attempt(
        self,
        key: str,
        ttl: float,
        *,
        owner: Owner | None = None,
        sender: Any = None,
        limit: int = 1,
    ) -> HeldLock | Refused:
        """One try at ``key`` (any free slot of ``limit``): the lock, or what we learned
        about its holders.

        :param sender: the sender of the lock's signals (default: this backend).
        """
        _check_key_and_ttl(key, ttl)
        limit = self._check_limit(limit)
        owner = owner or Owner.here()
        token = secrets.token_hex(16)
        sent_at = self.clock()
        if limit == 1:
            result = self._try_acquire(self._full_key(key), token, ttl, owner)
        else:
            result = self._try_acquire_slot(self._full_key(key), token, ttl, owner, limit)
        if isinstance(result, Refused):
            return result
        return self._hold(key, ttl, owner, token, result, sent_at, sender, limit)

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
        """Make the :class:`HeldLock` of a granted attempt, hand it to the lease keeper,
        and announce it."""
        valid_until = granted.valid_until
        if valid_until is None:
            valid_until = sent_at + ttl - clock_drift(ttl)
        held = HeldLock(
            self, key, granted.token or token, granted.fencing_token, ttl, owner,
            valid_until=valid_until, slot=granted.slot, limit=limit,
        )
        held.sender = self if sender is None else sender
        LeaseKeeper.for_process().track(held)
        logger.debug("acquired %r (fencing token %s)", key, granted.fencing_token)
        signals.lock_acquired.send(sender=held.sender, key=key, held=held)
        return held

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
        """Wait for ``key`` (a slot of ``limit``) after a refused attempt; None when
        ``timeout`` passes.

        The server wakes the waiter (a release announced, or its turn in a queue store),
        never polling; a holder that crashed is noticed when its lease expires. For a
        semaphore, one waiter is woken per slot freed.
        """
        _check_key_and_ttl(key, ttl)
        timeout = _check_timeout(timeout)
        limit = self._check_limit(limit)
        owner = owner or Owner.here()
        deadline = None if timeout is None else self.clock() + timeout
        token = secrets.token_hex(16)
        sent_at = self.clock()
        full_key = self._full_key(key)
        if limit == 1:  # no limit keyword: backends that grant no slots take none
            granted = self._wait_turn(full_key, token, ttl, owner, deadline, refused)
        else:
            granted = self._wait_turn(full_key, token, ttl, owner, deadline, refused, limit=limit)
        if granted is None:
            return None
        return self._hold(key, ttl, owner, token, granted, sent_at, sender, limit)

    def _full_key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def _release_held(self, held: HeldLock) -> bool:
        """Release one acquisition of ours (a backend with per-lock resources extends it)."""
        return self._release(self.slot_key(self._full_key(held.key), held.slot), "token", held.token)

    def _break(self, info: LockInfo) -> bool:
        """Release the acquisition ``info`` shows, from any process: by its token. A
        backend whose release by token works only in the holder's process overrides it."""
        return self._release(self.slot_key(self._full_key(info.key), info.slot), "token", info.token)

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        """Release the slot of ``key`` (fully prefixed) below ``limit`` whose owner is
        ``owner_json`` exactly: the default asks slot by slot (a release for a dead
        process, not a hot path); a backend that can ask all at once overrides it."""
        return any(self._release(self.slot_key(key, slot), "owner", owner_json) for slot in range(limit))

    def _ping(self) -> list[NodeStatus]:
        """Every node's status: here one node, timed on a release that finds nothing (one
        round trip that writes nothing), the second of two: the first one may have had to
        connect. A backend of many nodes, or one whose server tells its clock, overrides it."""
        for _ in range(2):
            started = time.perf_counter()
            try:
                self._release(self._full_key(PING_KEY), "owner", Owner.of_message(PING_KEY).as_json())
            except LockError as exc:
                return [NodeStatus(self.url, None, error=str(exc))]
        return [NodeStatus(self.url, time.perf_counter() - started)]

    def _nodes_needed(self, nodes: int) -> int:
        """How many of ``nodes`` must answer for a lock to be granted (all, by default)."""
        return nodes

    # -- what a backend implements -------------------------------------------------------

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """The locks held now: every one under ``self.prefix`` when ``key`` is None, else
        the holders of ``key`` (unprefixed). Each :class:`LockInfo` names its key without
        the prefix. Reads only, within ``connect_timeout``; no expired lease, no waiter.
        """
        msg = f"{type(self).__name__} cannot list its locks (it implements no _held)"
        raise LockError(msg, key=key)

    @abstractmethod
    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        """One atomic attempt: take ``key`` if free, storing token, owner and a fencing token."""

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused:
        """One atomic attempt at any free slot of ``key`` below ``limit`` (> 1): see the
        module docstring for what it must do. Not implemented: the backend grants
        exclusive locks only (``limit`` > 1 is then a :class:`ConfigurationError`)."""
        raise NotImplementedError  # never reached: _check_limit refuses limit > 1 first

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
        """Block until ``key`` is ours (a :class:`Granted`), or None once ``deadline``
        (on ``self.clock``; None: never) has passed. ``limit`` > 1 (passed only to a
        backend that grants slots): until a slot of the semaphore is ours.

        This default serves TTL stores: wait for a release announcement, bounded by the
        holder's remaining TTL (``refused``, the last refusal), then try again. A queue
        store (etcd, ZooKeeper) overrides it: join the line, watch only the entry just
        before its own (one waiter woken per release), and return a ``Granted`` whose
        ``valid_until`` is set; on timeout or error it leaves no entry behind.
        """
        while True:
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and remaining <= 0:
                return None
            holder_ttl = refused.holder_ttl if refused is not None else None
            bounds = [b for b in (remaining, holder_ttl) if b is not None]
            # An unknown holder TTL can only come from a backend that cannot tell; then
            # re-check every connect_timeout at most.
            self._wait_for_release(key, min(bounds) if bounds else self.connect_timeout)
            sent_at = self.clock()
            if limit == 1:
                result = self._try_acquire(key, token, ttl, owner)
            else:
                result = self._try_acquire_slot(key, token, ttl, owner, limit)
            if isinstance(result, Granted):
                if result.valid_until is None:
                    result = replace(result, valid_until=sent_at + ttl - clock_drift(ttl))
                return result
            refused = result

    def _wait_for_release(self, key: str, timeout: float) -> None:
        """A TTL store: block until a release of ``key`` is announced, or ``timeout``
        seconds pass (a spurious early return only costs one more attempt)."""
        raise NotImplementedError  # never reached: __init_subclass__ demands one of the two

    @abstractmethod
    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        """For each (key, token, ttl): replace the TTL if the token matches."""

    @abstractmethod
    def _release(self, key: str, field: str, value: str) -> bool:
        """Delete ``key`` if its stored ``field`` equals ``value`` exactly, and announce
        the release to one waiter.

        ``field`` is "token" (``value``: the acquisition's token) or "owner" (``value``:
        :meth:`Owner.as_json`, the text stored after the token). Never a prefix match."""


#: The shortest lease: the clock-drift margin (1% + 2 ms) and a renewal every third of
#: the TTL must leave a lease that one round trip can keep alive (at 0.1 s: renewed every
#: 33 ms, 95 ms of proven validity). Shorter leases are lost before they are used.
MIN_TTL = 0.1
#: The longest lease, or wait: 10 years. Every server takes it (Redis PX is 64-bit
#: milliseconds; etcd refuses leases from 9e9 s on, with a bare gRPC OUT_OF_RANGE).
MAX_TTL = 10 * 365 * 24 * 3600.0
#: The most slots of one semaphore: an attempt looks at every slot in one request.
MAX_LIMIT = 1000
#: Between a key and its slot number in a slot record's key (see ``slot_key``); a key
#: holding it is refused, so no key names another key's slot.
SLOT_MARK = "\x1f#"

#: The longest key, in UTF-8 bytes (the prefix aside). Derived keys stay far below it;
#: servers refuse much longer requests with errors that read like an outage.
MAX_KEY_BYTES = 1024


def _shown(key: object) -> str:
    """A key as an error message shows it: a bounded repr."""
    text = repr(key)
    if len(text) <= 80:
        return text
    size = f", {len(key)} long" if isinstance(key, str | bytes) else ""
    return f"{text[:60]}...{size}"


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        msg = f"lock key must be a non-empty str, got {_shown(key)}"
        raise ConfigurationError(msg, option="key")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        msg = f"lock key {_shown(key)} is not valid UTF-8 text ({exc.reason} at index {exc.start})"
        raise ConfigurationError(msg, option="key") from None
    if size > MAX_KEY_BYTES:
        msg = f"lock key {_shown(key)} is {size} bytes of UTF-8; at most {MAX_KEY_BYTES} are allowed"
        raise ConfigurationError(msg, option="key")
    if SLOT_MARK in key:
        msg = f"lock key {_shown(key)} holds {SLOT_MARK!r}, which names semaphore slots"
        raise ConfigurationError(msg, option="key")


def check_limit(limit: object, option: str = "limit") -> int:
    """``limit`` as a number of semaphore slots: an int from 1 to ``MAX_LIMIT``.

    :raises ConfigurationError: naming ``option``.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        msg = f"{option} must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}"
        raise ConfigurationError(msg, option=option)
    return limit


def _check_ttl(ttl: object, option: str = "ttl") -> float:
    """``ttl`` as float seconds, when it is a lease length every backend can keep.

    :raises ConfigurationError: naming ``option``.
    """
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not MIN_TTL <= ttl <= MAX_TTL  # also refuses NaN and infinity
    ):
        msg = (
            f"{option} must be a number of seconds from {MIN_TTL:g} to {MAX_TTL:.0f} "
            f"(10 years), got {ttl!r}"
        )
        raise ConfigurationError(msg, option=option)
    return float(ttl)


def _check_key_and_ttl(key: str, ttl: float) -> None:
    _check_key(key)
    _check_ttl(ttl)


def _check_timeout(timeout: object, option: str = "timeout") -> float | None:
    """A wait's bound in seconds: None (also for ``math.inf``) means no limit.

    :raises ConfigurationError: naming ``option``, for NaN, a negative or non-number
        value, or more than ``MAX_TTL``.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout):
        msg = f"{option} must be None or a number of seconds >= 0, got {timeout!r}"
        raise ConfigurationError(msg, option=option)
    if timeout == math.inf:
        return None
    if not 0 <= timeout <= MAX_TTL:
        msg = (
            f"{option} must be from 0 to {MAX_TTL:.0f} seconds (10 years), or None or "
            f"math.inf for no limit, got {timeout!r}"
        )
        raise ConfigurationError(msg, option=option)
    return float(timeout)
