"""The etcd backend on a real 3-member cluster: losing the leader, losing the quorum."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from pyetcd import etcdrpc

from celery_singleton_lock import LockBackendUnavailable, connect
from celery_singleton_lock.testing import EtcdCluster
from tests.conftest import wait_until
from tests.integration.etcd_helpers import entries

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with EtcdCluster(size=3) as cluster:
        yield cluster


@pytest.fixture
def healthy(cluster):
    """Every member up again after the test, whatever it killed."""
    yield cluster
    for member in cluster.members:
        if not member.running:
            cluster.restart(member)


def test_a_held_lock_survives_the_leader_being_killed(healthy, unique_key):
    cluster = healthy
    leader = cluster.leader()
    backend = connect(cluster.url, connect_timeout=3)
    backend._cluster._current = cluster.members.index(leader)  # its death forces a fail-over
    held = backend.acquire(unique_key, ttl=3)
    leader.kill()
    killed_at = held.backend.clock()
    # Renewals confirmed after the kill, through another member, twice over: the lease
    # outlives the TTL it had when the leader died.
    wait_until(lambda: held._valid_until > killed_at + held.ttl + 1, 15, "renewals after the kill")
    assert not held.lost
    assert backend._cluster.endpoints[backend._cluster._current] != leader.endpoint
    waiter = connect(cluster.url, connect_timeout=3)
    got: list = []
    thread = threading.Thread(
        target=lambda: got.append(waiter.acquire(unique_key, ttl=3, blocking=True, timeout=10))
    )
    thread.start()
    wait_until(lambda: waiter.acquire(unique_key + ":probe", ttl=1) is not None, 5, "the waiter's client")
    assert backend.release(held) is True
    thread.join(10)
    assert got[0] is not None
    assert got[0].fencing_token > held.fencing_token
    waiter.release(got[0])
    backend.close()
    waiter.close()


def test_without_a_quorum_nothing_is_reported_held(healthy, unique_key):
    cluster = healthy
    backend = connect(cluster.url, connect_timeout=2)
    held = backend.acquire(unique_key, ttl=2)
    survivor, *doomed = cluster.members
    for member in doomed:
        member.kill()
    start = time.monotonic()
    with pytest.raises(LockBackendUnavailable) as info:
        backend.acquire(unique_key + ":new", ttl=5)
    assert time.monotonic() - start < 2 + 1.0
    assert survivor.endpoint in str(info.value) or "did not answer" in str(info.value)
    with pytest.raises(LockBackendUnavailable):
        backend.acquire(unique_key + ":new", ttl=5, blocking=True, timeout=10)
    # The lock taken before the loss cannot be renewed: it is reported lost by its
    # deadline, never held beyond it.
    wait_until(lambda: held.lost, held.ttl + 1, "the unrenewable lock to be reported lost")
    for member in doomed:
        cluster.restart(member)
    recovered = backend.acquire(unique_key + ":new", ttl=5)
    assert recovered is not None
    backend.release(recovered)
    backend.close()


# -- a hung member (SIGSTOP): the faults of issue 9, items 4, 5 and 15 ------------------------


def _lease_alive(backend, lease_id: int) -> bool:
    reply = backend._cluster.call("Lease", "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=lease_id))
    return reply.TTL > 0


@pytest.fixture
def paused(cluster):
    """Members the test pauses; every one is resumed afterwards, whatever failed."""
    members: list = []
    yield members
    for member in members:
        member.resume()


@pytest.mark.parametrize("role", ["follower", "leader"])
def test_a_short_lock_survives_the_member_its_holder_talks_to_hanging(cluster, paused, role, unique_key):
    leader = cluster.leader()
    hung = leader if role == "leader" else next(m for m in cluster.members if m is not leader)
    other = next(m for m in cluster.members if m is not hung and m is not leader)
    holder = connect(cluster.url)  # the default connect_timeout, 5 s: longer than the TTL
    holder._cluster._current = cluster.members.index(hung)
    held = holder.acquire(unique_key, ttl=3)
    rival = connect(cluster.url)
    rival._cluster._current = cluster.members.index(other)
    paused.append(hung)
    hung.pause()
    paused_at = holder.clock()
    # For two TTLs nobody else gets the lock (its lease never expired on the server)...
    assert rival.acquire(unique_key, ttl=3, blocking=True, timeout=2 * held.ttl) is None
    # ... and the holder never stopped proving it held, renewing through other members.
    assert not held.lost, held.lost_reason
    assert held._valid_until > paused_at + held.ttl
    assert holder._cluster.endpoints[holder._cluster._current] != hung.endpoint
    hung.resume()
    assert holder.release(held) is True
    holder.close()
    rival.close()


@pytest.fixture(scope="module")
def slow_election():
    """A cluster whose followers wait 3 s before electing: a leader paused for less keeps
    its place, and, once resumed, applies the proposals that reached it while paused,
    although the clients that sent them gave up: writes with an unknown outcome."""
    with EtcdCluster(size=3, heartbeat_ms=100, election_ms=3000) as cluster:
        yield cluster


def _client_of_a_follower(cluster, connect_timeout: float):
    leader = cluster.leader()
    follower = next(m for m in cluster.members if m is not leader)
    backend = connect(cluster.url, connect_timeout=connect_timeout)
    backend._cluster._current = cluster.members.index(follower)
    return backend, leader


def test_an_attempt_that_timed_out_leaves_the_key_free_at_once(slow_election, unique_key):
    backend, leader = _client_of_a_follower(slow_election, connect_timeout=0.6)
    backend.release(backend.acquire(unique_key + ":warm", ttl=10))  # a spare: the put comes first
    (spare,) = backend._spares[10]
    leader.pause()
    try:
        with pytest.raises(LockBackendUnavailable):
            backend.acquire(unique_key, ttl=10)
    finally:
        leader.resume()  # it now applies the put the attempt gave up on
    # The attempt's lease is revoked as soon as the leader answers, with whatever the
    # late put left on it: the key is free at once, not one TTL (10 s) later.
    other = connect(slow_election.url)
    started = time.monotonic()
    got = other.acquire(unique_key, ttl=10, blocking=True, timeout=3)
    assert got is not None
    assert time.monotonic() - started < 2
    wait_until(lambda: not backend._reaper.pending(), 5, "the reaper to finish")
    assert not _lease_alive(other, spare.id)
    assert spare not in backend._spares.get(10, [])
    other.release(got)
    other.close()
    backend.close()


def test_a_lease_whose_put_had_an_unknown_outcome_is_revoked_never_reused(slow_election, unique_key):
    holder = connect(slow_election.url)
    held = holder.acquire(unique_key, ttl=10)
    # 3 s: a try gets 1 s, then the attempt goes on with what is left.
    backend, leader = _client_of_a_follower(slow_election, connect_timeout=3)
    backend.release(backend.acquire(unique_key + ":warm", ttl=10))
    (spare,) = backend._spares[10]
    leader.pause()
    resume = threading.Timer(1.5, leader.resume)  # after the first try timed out, within the budget
    resume.start()
    try:
        assert backend.acquire(unique_key, ttl=10) is None  # refused: the holder holds
    finally:
        resume.join()
    # The first try's outcome was unknown: its lease is revoked, not given back to the
    # spares, where a later wait would have kept alive whatever the try had put on it.
    assert not _lease_alive(holder, spare.id)
    assert spare.id not in {lease.id for lease in backend._spares.get(10, [])}
    (line,) = entries(holder, unique_key)  # the holder alone: nothing of ours is left
    assert line.create_revision == held.fencing_token
    holder.release(held)
    holder.close()
    backend.close()


def _take_turns(url: str, key: str, ttl: float, stop, report) -> None:
    """Take ``key`` over and over, hold it briefly, and report each acquisition; an
    outage is reported too and the loop goes on (as a Celery retry would)."""
    backend = connect(url)
    while not stop.is_set():
        try:
            held = backend.acquire(key, ttl=ttl, blocking=True, timeout=4 * ttl)
        except LockBackendUnavailable:
            report.put(("unavailable", time.monotonic(), 0))
            continue
        if held is None:
            report.put(("timed out", time.monotonic(), 0))
            continue
        report.put(("acquired", time.monotonic(), held.fencing_token))
        stop.wait(0.01)  # the body
        try:
            backend.release(held)
        except LockBackendUnavailable:
            report.put(("unavailable", time.monotonic(), 0))
    backend.close()


def test_the_line_never_stalls_through_leader_pauses(cluster, paused, unique_key):
    ttl = 3.0
    context = multiprocessing.get_context("spawn")
    stop, report = context.Event(), context.Queue()
    processes = [
        context.Process(target=_take_turns, args=(cluster.url, unique_key, ttl, stop, report))
        for _ in range(6)
    ]
    for process in processes:
        process.start()
    events: list[tuple[str, float, int]] = []

    def acquisitions_after(moment: float) -> int:
        while not report.empty():
            events.append(report.get())
        return sum(1 for kind, at, _ in events if kind == "acquired" and at > moment)

    try:
        wait_until(lambda: acquisitions_after(0) >= 30, 60, "the processes to take turns")
        for _ in range(3):
            leader = cluster.leader()
            paused.append(leader)
            leader.pause()
            time.sleep(3.0)  # the fault being tested: the leader hangs for a whole TTL
            leader.resume()
            resumed_at = time.monotonic()
            wait_until(
                lambda since=resumed_at: acquisitions_after(since) >= 10, 2 * ttl, "turns after the pause"
            )
        ended_at = time.monotonic()
    finally:
        stop.set()
        for process in processes:
            process.join(30)
    acquisitions_after(0)
    turns = sorted(at for kind, at, _ in events if kind == "acquired")
    gaps = [later - earlier for earlier, later in zip(turns, [*turns[1:], ended_at], strict=True)]
    assert max(gaps) < 2 * ttl, sorted(gaps)[-5:]
    tokens = [token for kind, _, token in events if kind == "acquired"]
    assert len(set(tokens)) == len(tokens)  # every turn a grant of its own
    assert all(process.exitcode == 0 for process in processes)
