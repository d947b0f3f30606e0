"""Redlock: one lock over N independent Redis masters, held when a majority granted it.

``redlock://[user:password@]h1:6379,h2:6379,h3:6379[/db]`` or a list of three or more
``redis://``/``rediss://``/``unix://`` URLs (one per master) as ``singleton_lock_backend``.

Each master is a :class:`RedisBackend` of its own: the same keys, the same scripts (built
by its ``*_call`` methods, read by its ``*_reply`` methods), so a lock looks the same on
every master as on a single Redis. What this module adds is the quorum::

    t0   the acquire script goes out to every master at once (no reply awaited yet)
    t1   replies read, each bounded by node_timeout after its own send
         held  <=> a quorum (N//2 + 1) granted AND ttl - (t1 - t0) - drift > 0
         else      released at once on every master that did not refuse, and
                   LockBackendUnavailable when fewer than a quorum answered

The requests are sent one after another on idle pooled connections and only then are the
replies read, so a round costs about one round trip to the slowest master, without a
thread per call. Renewal and release go out the same way. Waiters mark the lock, and block
with BLPOP, only on the key's herald (a master chosen by a hash of the key, the next one
while it fails), so a release announces itself there alone, not on every master. Handoff
is fair as on one Redis (see backends/redis.py).

Fencing tokens: each master counts on from its own counter (one per key, for a lock and
every slot of a semaphore), restarted from its clock in microseconds where it is gone (see
backends/redis.py). The count is the highest among the masters that granted; when they
disagree, the others are raised to it before the lock is reported held, so every later
quorum (which shares a master with this one) counts on from there. The token is that count
times ``MAX_LIMIT`` plus the slot (0 for a lock): see :func:`fencing_token`. A counter lives
one lock TTL after its last grant; later, the masters' clocks alone keep tokens going up.
See docs/redlock.md for what that promises and when it does not hold.

Semaphores (``limit`` > 1): a slot is held when a quorum of masters granted the same slot
number (each grants its lowest free one, in one script call over the key's slot records);
the slot most masters granted wins, and the other grants are released at once.
"""

from __future__ import annotations

import copy
import os
import random
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from celery_singleton_lock import _native
from celery_singleton_lock.backends.base import (
    MAX_LIMIT,
    Granted,
    LockBackend,
    LockInfo,
    NodeStatus,
    Refused,
)
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.backends.redis import (
    POLITE_WINDOW,
    Line,
    RedisBackend,
    ScriptCall,
    milliseconds,
    wait_in_line,
)
from celery_singleton_lock.errors import ConfigurationError, LockBackendUnavailable, mask_url
from celery_singleton_lock.lease import clock_drift

__all__ = ["RedlockBackend", "fencing_token", "node_urls"]

_NODE_SCHEMES = ("redis", "rediss", "unix")
#: Seconds a master that failed a call is passed over as a key's herald.
HERALD_RECHECK = 5.0
#: Fewer masters than this tolerate no failure at all: use one Redis then.
MIN_NODES = 3


def fencing_token(count: int, slot: int) -> int:
    """The fencing token of a grant of ``slot`` (0: an exclusive lock) whose quorum's
    counters stand at ``count``: ``count * MAX_LIMIT + slot``.

    The count alone would not do for a semaphore: holders of two slots granted at the same
    time may each find the same highest count, on different masters. Holders at once hold
    different slots, and a later grant counts above an earlier one, so these never repeat
    and only rise.
    """
    return count * MAX_LIMIT + slot


def node_urls(url: str | Sequence[str], *, option: str = "url") -> list[str]:
    """The Redis URL of every master named by a ``redlock://`` URL or a list of URLs.

    ``redlock://user:pw@h1:6379,h2,h3/0?socket_keepalive=true`` gives
    ``redis://user:pw@h1:6379/0``, ``redis://user:pw@h2/0``, ``redis://user:pw@h3/0``
    (credentials, database and query apply to every master).

    :raises ConfigurationError: naming ``option``, for fewer than three masters, the
        same master twice, or a URL that is not a Redis URL.
    """
    if isinstance(url, str):
        parts = urlsplit(url)
        if parts.scheme.lower() != "redlock":
            msg = f"{option}: a Redlock URL starts with redlock://, got {mask_url(url)!r}"
            raise ConfigurationError(msg, option=option)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        urls = [
            urlunsplit(("redis", f"{userinfo}{at}{host.strip()}", parts.path, parts.query, ""))
            for host in hosts.split(",")
        ]
        if any(not host.strip() for host in hosts.split(",")):
            msg = f"{option}: empty host in {mask_url(url)!r}"
            raise ConfigurationError(msg, option=option)
    elif isinstance(url, list | tuple) and all(isinstance(u, str) for u in url):
        urls = list(url)
        for each in urls:
            if urlsplit(each).scheme.lower() not in _NODE_SCHEMES:
                msg = (
                    f"{option}: every URL of a Redlock list must be redis://, rediss:// or "
                    f"unix://, got {mask_url(each)!r}"
                )
                raise ConfigurationError(msg, option=option)
    else:
        msg = f"{option} must be a redlock:// URL or a list of Redis URLs, got {type(url).__name__}"
        raise ConfigurationError(msg, option=option)
    if len(urls) < MIN_NODES:
        msg = (
            f"{option}: Redlock needs at least {MIN_NODES} independent Redis masters, got "
            f"{len(urls)}; with fewer, use one redis:// URL"
        )
        raise ConfigurationError(msg, option=option)
    seen: set[tuple[str, ...]] = set()
    for each in urls:
        RedisBackend.check_url(each, option=option)
        parts = urlsplit(each)
        where = (parts.path,) if parts.scheme == "unix" else (parts.hostname or "", str(parts.port or 6379))
        if where in seen:
            msg = f"{option}: {mask_url(each)!r} names a master twice; Redlock needs independent ones"
            raise ConfigurationError(msg, option=option)
        seen.add(where)
    return urls


class _Failed:
    """A master that gave no usable answer to one call.

    :ivar reason: why, for the error message.
    :ivar sent: the request went out, so the master may have applied it (or apply it later).
    """

    __slots__ = ("reason", "sent")

    def __init__(self, reason: str, *, sent: bool) -> None:
        self.reason = reason
        self.sent = sent


class RedlockBackend(LockBackend):
    """Locks over independent Redis masters; see the module docstring and docs/redlock.md.

    :param url: a ``redlock://`` URL or a list of at least three Redis URLs.
    :param connect_timeout: the caller's bound on an unreachable backend; each master gets
        ``node_timeout`` within it.
    :param node_timeout: seconds each master has to answer one call (default: 0.25, at
        most ``connect_timeout``). A master slower than that counts as down for the call.
    :param retry_delay: when an attempt split the votes (nobody got a quorum), the waiter
        tries again within a random 50-100% of this, unless a release wakes it sooner.
    :param client_options: passed to every master's client (TLS files, ``username``...).
    """

    schemes = ("redlock",)

    # KEYS[1] fencing counter; ARGV[1] the token just granted; ARGV[2] the lock's ttl ms,
    # which is how long a counter lives after a grant (as in RedisBackend.LUA_ACQUIRE)
    # returns 1: the counter is now at least ARGV[1]. Sent only to granting masters whose
    # counter was behind; while they hold our lock nobody else increments it.
    LUA_RAISE_FENCE = """
    local current = tonumber(redis.call('get', KEYS[1]) or '0')
    if current < tonumber(ARGV[1]) then
      redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
    end
    return 1
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        prefix: str = "singleton-lock",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        node_timeout: float | None = None,
        retry_delay: float = 0.1,
        **client_options: Any,
    ) -> None:
        urls = node_urls(url, option="singleton_lock_backend")
        shown = url if isinstance(url, str) else ",".join(mask_url(u) for u in urls)
        super().__init__(shown, prefix=prefix, connect_timeout=connect_timeout, clock=clock)
        self.node_timeout = min(connect_timeout, 0.25) if node_timeout is None else node_timeout
        if not self.node_timeout > 0:
            msg = f"node_timeout must be a positive number of seconds, got {node_timeout!r}"
            raise ConfigurationError(msg, option="node_timeout")
        self.retry_delay = retry_delay
        self.nodes = [
            RedisBackend(u, prefix=prefix, connect_timeout=self.node_timeout, **client_options)
            for u in urls
        ]
        self.quorum = len(self.nodes) // 2 + 1
        self._raise_fence = self.nodes[0].script(self.LUA_RAISE_FENCE)
        self._lanes: list[list[Line]] = []
        self._lanes_pid = os.getpid()
        #: key -> when a release of ours woke a waiter (see redis.POLITE_WAIT)
        self._handed_over: dict[str, float] = {}
        #: master index -> when it last failed a call (see _herald)
        self._failed_at: dict[int, float] = {}

    @classmethod
    def check_url(cls, url: str | Sequence[str], *, option: str) -> None:
        node_urls(url, option=option)

    def for_native_thread(self) -> RedlockBackend:
        """A copy with connections of its own to every master, for the lease keeper's OS
        thread in a gevent worker (see :meth:`RedisBackend.for_native_thread`)."""
        clone = copy.copy(self)
        clone.nodes = [node.for_native_thread() for node in self.nodes]
        clone._raise_fence = clone.nodes[0].script(self.LUA_RAISE_FENCE)
        clone._lanes = []
        clone._handed_over = {}
        return clone

    def slot_key(self, key: str, slot: int | None) -> str:
        """As on one Redis (:meth:`RedisBackend.slot_key`): the masters' keys are its keys."""
        return self.nodes[0].slot_key(key, slot)

    # -- sending one call to many masters at once --------------------------------------

    def _lane(self) -> list[Line]:
        """A :class:`Line` to every master, for one call at a time.

        Lanes are kept in a free list rather than taken from each master's pool: that is
        a third of the cost of a round (the pools' locking and bookkeeping, per master).
        A forked child starts its own list: sockets are never shared with the parent.
        """
        if self._lanes_pid != os.getpid():
            self._lanes, self._lanes_pid = [], os.getpid()
        try:
            return self._lanes.pop()
        except IndexError:
            return [node.line() for node in self.nodes]

    def _broadcast(
        self,
        call: ScriptCall,
        to: Collection[int] | None = None,
        special: dict[int, ScriptCall] | None = None,
    ) -> list[Any]:
        """Send ``call`` to every master (or those in ``to``), every request before
        reading any reply; a reply or :class:`_Failed` per master (None where not sent).

        The scripts are the same on every master, so the request is packed once;
        ``special`` ({master index: call}) sends other calls to those masters.
        """
        lane = self._lane()
        results: list[Any] = [None] * len(self.nodes)
        sent: list[int] = []
        request = lane[0].pack(call)
        calls = [call] * len(self.nodes)
        for i, other in (special or {}).items():
            calls[i] = other
        try:
            for i, failure in _connect_together(lane, to, call.key).items():
                results[i] = _Failed(failure, sent=False)
                self._failed_at[i] = self.clock()
            for i, line in enumerate(lane):
                if (to is not None and i not in to) or results[i] is not None:
                    continue
                try:
                    line.send(request if calls[i] is call else line.pack(calls[i]), call.key)
                except LockBackendUnavailable as exc:
                    results[i] = _Failed(str(exc), sent=False)
                    self._failed_at[i] = self.clock()
                    continue
                sent.append(i)
            for i in sent:
                try:
                    results[i] = lane[i].receive(calls[i])  # by node_timeout after its own send
                except LockBackendUnavailable as exc:
                    results[i] = _Failed(str(exc), sent=True)
                    self._failed_at[i] = self.clock()
        except BaseException:
            for line in lane:  # interrupted: replies may be pending on any of them
                line.close()
            raise
        finally:
            self._lanes.append(lane)
        return results

    def _unavailable(self, results: Sequence[Any], key: str | None) -> LockBackendUnavailable:
        down = [
            f"{node.url} ({result.reason})"
            for node, result in zip(self.nodes, results, strict=True)
            if isinstance(result, _Failed)
        ]
        answered = len(self.nodes) - len(down)
        msg = (
            f"Redlock {self.url}: only {answered} of {len(self.nodes)} Redis masters answered "
            f"and a quorum is {self.quorum}; unreachable: {'; '.join(down)}"
        )
        return LockBackendUnavailable(msg, url=self.url, key=key)

    def _answered(self, results: Sequence[Any], key: str | None) -> list[Any]:
        """The replies that came back; LockBackendUnavailable when fewer than a quorum."""
        replies = [r for r in results if r is not None and not isinstance(r, _Failed)]
        if len(replies) < self.quorum:
            raise self._unavailable(results, key)
        return replies

    # -- the hooks ---------------------------------------------------------------------

    def _try_acquire(self, key: str, token: str, ttl: float, owner: Owner) -> Granted | Refused:
        return self._attempt(key, token, ttl, owner)

    def _try_acquire_slot(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int
    ) -> Granted | Refused:
        return self._attempt(key, token, ttl, owner, limit)

    def _attempt(
        self, key: str, token: str, ttl: float, owner: Owner, limit: int = 1, *,
        waiting: bool = False, woken: bool = False,
    ) -> Granted | Refused:
        """One attempt at the lock (``limit`` 1) or at a slot of the semaphore ``key``.

        A slot is held when a quorum of masters granted the SAME slot: two holders of one
        slot would need two quorums, which share a master, and a master keeps one holder
        per slot, so no more than ``limit`` hold at once. Each master grants its lowest
        free slot; where they differ (contenders seen in another order), the slot most of
        them granted wins and the others are released at once.
        """
        started = self.clock()
        first = self.nodes[0]

        def call_for(*, waiting: bool = False, woken: bool = False) -> ScriptCall:
            # The masters count in step (a counter each, the clock only where it is gone):
            # tokens drawn from their clocks would never agree, which would cost a second
            # round trip (_settle_fences) on every acquire.
            if limit == 1:
                return first.acquire_call(key, token, ttl, owner, counted=True, waiting=waiting, woken=woken)
            return first.acquire_slot_call(
                key, token, ttl, owner, limit, counted=True, waiting=waiting, woken=woken
            )

        # Waiters mark the lock, and wait, only on the key's herald: a release then
        # announces itself there alone, not on every master.
        special = None
        if waiting or woken:
            special = {self._herald(key): call_for(waiting=waiting, woken=woken)}
        results = self._broadcast(call_for(), special=special)
        if special is not None:
            herald = next(iter(special))
            now_herald = self._herald(key)
            if isinstance(results[herald], _Failed) and now_herald != herald:
                # The herald failed just now: the next one is marked instead, since the
                # wait goes there (an acquire sent to it alone could grant it alone).
                self._broadcast(first.mark_call(key, limit), to={now_herald})
        granted: dict[int, tuple[int, int]] = {}  # master -> (its count, the slot)
        refused: dict[bytes, list[Refused]] = {}  # by the holder's token
        for i, result in enumerate(results):
            if isinstance(result, _Failed):
                continue
            read = RedisBackend.acquire_reply if limit == 1 else RedisBackend.acquire_slot_reply
            outcome = read(result)
            if isinstance(outcome, Granted):
                granted[i] = (outcome.fencing_token, outcome.slot or 0)
            else:
                refused.setdefault(RedisBackend.holder_token(result) or b"", []).append(outcome)
        slots = [slot for _, slot in granted.values()]
        slot = min(set(slots), key=lambda s: (-slots.count(s), s), default=0)
        quorum = {i: count for i, (count, each) in granted.items() if each == slot}
        count = self._settle_fences(key, ttl, quorum) if len(quorum) >= self.quorum else None
        if count is not None and ttl - (self.clock() - started) - clock_drift(ttl) > 0:
            strays = set(granted) - set(quorum)
            if strays:  # other slots granted to us by masters outside the quorum
                self._undo(key, token, ttl, limit, strays, results)
            return Granted(fencing_token(count, slot), slot=None if limit == 1 else slot)
        # Not held: undo it wherever it may have been granted (a master that timed out
        # may have granted it too), all at once, so others need not wait for our TTL. A
        # master the request never reached has nothing to undo: trying would only spend
        # another node_timeout on each one that does not answer.
        undo = {
            i for i, r in enumerate(results) if i in granted or (isinstance(r, _Failed) and r.sent)
        }
        if undo:
            self._undo(key, token, ttl, limit, undo, results)
        if len(self.nodes) - sum(isinstance(r, _Failed) for r in results) < self.quorum:
            raise self._unavailable(results, key)
        return self._refusal(refused)

    def _undo(
        self, key: str, token: str, ttl: float, limit: int, masters: set[int], results: Sequence[Any]
    ) -> None:
        """Release ``token``'s grant (of whichever slot) on ``masters`` at once."""
        first = self.nodes[0]
        call = (
            first.release_call(key, "token", token) if limit == 1
            else first.release_slots_call(key, limit, "token", token)
        )
        undone = self._broadcast(call, to=masters)
        for i in masters:
            # A master that got the request but answered neither it nor the undo (hung,
            # or slow) may apply the acquire later: it releases the token once it answers.
            failed = results[i]
            if isinstance(failed, _Failed) and failed.sent and isinstance(undone[i], _Failed):
                self.nodes[i].late_releases.add(key, token, ttl, limit)

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
        return wait_in_line(
            lambda woken: self._attempt(key, token, ttl, owner, limit, waiting=True, woken=woken),
            lambda timeout: self._block(key, timeout),
            clock=self.clock, ttl=ttl, deadline=deadline, polite=polite,
            unknown_bound=self.connect_timeout,
        )

    def _settle_fences(self, key: str, ttl: float, granted: dict[int, int]) -> int | None:
        """The count of a granted quorum (its fencing token: :func:`fencing_token`), or None
        when it cannot be made safe.

        Masters whose counter is behind the highest are raised to it; unless a quorum ends
        at that value, a later quorum might count from a lower one, so we do not hold.
        """
        top = max(granted.values())
        behind = {i for i, fence in granted.items() if fence < top}
        if not behind:
            return top
        call = ScriptCall(
            self._raise_fence, [self.nodes[0].fence_key(key)], [top, milliseconds(ttl)], key
        )
        results = self._broadcast(call, to=behind)
        raised = sum(1 for i in behind if not isinstance(results[i], _Failed))
        return top if len(granted) - len(behind) + raised >= self.quorum else None

    def _refusal(self, refused: dict[bytes, list[Refused]]) -> Refused:
        holding = max(refused.values(), key=len, default=[])
        if len(holding) < self.quorum:
            # Nobody holds it on a quorum (votes split between contenders, or masters
            # down): try again soon, at a random moment so contenders fall out of step.
            return Refused(self.retry_delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not secrecy
        # The holder's lease ends on all its masters at about the same time: re-check at
        # the first of them.
        ttls = [r.holder_ttl for r in holding if r.holder_ttl is not None]
        return Refused(min(ttls) if ttls else None, holding[0].holder_task_id)

    def _heralds(self, key: str) -> list[int]:
        """Every master, in the order in which ``key`` (fully prefixed) takes its herald
        from them (a hash of the key picks the first)."""
        first = zlib.crc32(key.encode()) % len(self.nodes)
        return [(first + i) % len(self.nodes) for i in range(len(self.nodes))]

    def _herald(self, key: str) -> int:
        """The master on which waiters of ``key`` mark it and block: the first of
        :meth:`_heralds` that has not failed a call within ``HERALD_RECHECK`` seconds."""
        order = self._heralds(key)
        now = self.clock()
        for i in order:
            failed_at = self._failed_at.get(i)
            if failed_at is None or now - failed_at >= HERALD_RECHECK:
                return i
        return order[0]

    def _block(self, key: str, timeout: float) -> bool:
        # BLPOP on the key's herald; a release announces itself on every master where
        # the lock is marked, and each wakes its longest-blocked waiter. A herald that
        # cannot be reached is passed over: the next one is not marked, so that wait
        # lasts its bound, then the attempt marks the new herald.
        failed: list[str] = []
        first = self._herald(key)
        order = self._heralds(key)
        for i in order[order.index(first):] + order[: order.index(first)]:
            try:
                wait = self.nodes[i].signal_wait(key, timeout)
            except LockBackendUnavailable as exc:
                failed.append(str(exc))
                self._failed_at[i] = self.clock()
                continue
            with wait:
                try:
                    return wait.wait()
                except LockBackendUnavailable:
                    # That herald failed under the wait: try the lock again at once (the
                    # attempt marks the next herald, and the next wait is there).
                    self._failed_at[i] = self.clock()
                    return False
        msg = f"Redlock {self.url}: none of the masters where waiters of {key!r} block answered: "
        raise LockBackendUnavailable(msg + "; ".join(failed), url=self.url, key=key)

    def _renew(self, items: Sequence[tuple[str, str, float]]) -> list[bool]:
        started = self.clock()
        results = self._broadcast(self.nodes[0].renew_call(items))
        kept = [RedisBackend.renew_reply(r) for r in self._answered(results, None)]
        elapsed = self.clock() - started
        return [
            sum(flags[j] for flags in kept) >= self.quorum and ttl - elapsed - clock_drift(ttl) > 0
            for j, (_, _, ttl) in enumerate(items)
        ]

    def _release(self, key: str, field: str, value: str) -> bool:
        results = self._broadcast(self.nodes[0].release_call(key, field, value))
        replies = self._answered(results, key)
        if field == "token" and 2 in replies:
            if len(self._handed_over) > 1024:  # keys never acquired again: forget them
                self._handed_over.clear()
            self._handed_over[RedisBackend.lock_of(key)] = self.clock()
        return sum(RedisBackend.release_reply(r) for r in replies) >= self.quorum

    def _release_by_owner(self, key: str, owner_json: str, limit: int) -> bool:
        if limit == 1:
            return self._release(key, "owner", owner_json)
        results = self._broadcast(self.nodes[0].release_slots_call(key, limit, "owner", owner_json))
        replies = self._answered(results, key)
        return sum(RedisBackend.release_reply(r) for r in replies) >= self.quorum

    def _held(self, key: str | None) -> Iterable[LockInfo]:
        """A quorum view: an acquisition (key and token) is shown when a quorum of all the
        masters hold it, with the shortest of their TTLs and the highest fencing token."""
        seen: dict[tuple[str, str], list[LockInfo]] = {}
        failed: list[Any] = []
        for node in self.nodes:
            try:
                infos = list(node._held(key))
            except LockBackendUnavailable as exc:
                failed.append(_Failed(str(exc), sent=True))
                continue
            failed.append(None)
            for info in infos:
                seen.setdefault((info.key, info.token), []).append(info)
        if len(self.nodes) - sum(f is not None for f in failed) < self.quorum:
            raise self._unavailable(failed, key)
        held = []
        for copies in seen.values():
            if len(copies) < self.quorum:
                continue
            fences = [c.fencing_token for c in copies if c.fencing_token is not None]
            ttls = [c.ttl for c in copies if c.ttl is not None]
            held.append(replace(
                copies[0],
                fencing_token=fencing_token(max(fences), copies[0].slot or 0) if fences else None,
                ttl=min(ttls) if ttls else None,
                held_since=None,  # Redlock's tokens count on: they are not times
                location=f"on {len(copies)} of {len(self.nodes)} masters",
            ))
        return held

    def _ping(self) -> list[NodeStatus]:
        return [status for node in self.nodes for status in node._ping()]

    def _nodes_needed(self, nodes: int) -> int:
        return self.quorum

    def close(self) -> None:
        for lane in self._lanes:
            for line in lane:
                line.close()
        self._lanes = []
        for node in self.nodes:
            node.close()


def _connect_together(lines: Sequence[Line], to: Collection[int] | None, key: str | None) -> dict[int, str]:
    """Connect the lines (those in ``to``) that have no connection yet, all at once, so a
    round of masters that do not answer costs one ``node_timeout``, not one per master;
    the reasons of those that failed, by index.

    Only the first round, or one after a connection failed, has any to connect. One line
    alone, or any under gevent (whose sockets belong to the hub of the thread that made
    them: the lease keeper's OS thread has its own), connects in this thread, in turn.
    """
    waiting = [i for i, line in enumerate(lines) if (to is None or i in to) and not line.connected]
    failures: dict[int, str] = {}
    unexpected: list[BaseException] = []

    def connect(i: int) -> None:
        try:
            lines[i].connect(key)
        except LockBackendUnavailable as exc:
            failures[i] = str(exc)
        except BaseException as exc:  # raised below, in the caller's thread
            unexpected.append(exc)

    if len(waiting) == 1 or _native.patched():
        for i in waiting:
            connect(i)
    elif waiting:
        threads = [threading.Thread(target=connect, args=(i,), daemon=True) for i in waiting]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if unexpected:
        raise unexpected[0]
    return failures
