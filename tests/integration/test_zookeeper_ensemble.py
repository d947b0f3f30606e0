"""The ZooKeeper backend on a 3-member ensemble whose members fail (one ensemble for the
module; every test leaves all three members running)."""

from __future__ import annotations

import time

import pytest

from celery_singleton_lock import LockBackendUnavailable, LockLost, connect
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.testing import ZooKeeperEnsemble
from tests.conftest import wait_until


@pytest.fixture(scope="module")
def ensemble():
    with ZooKeeperEnsemble(size=3) as started:
        yield started


@pytest.fixture
def backends(ensemble):
    made: list = []

    def make(**options):
        made.append(connect(ensemble.url, **options))
        return made[-1]

    yield make
    for backend in made:
        backend.close()
    for member in ensemble.members:
        if not member.running:
            ensemble.restart(member)


def _member_of(ensemble, backend, ttl: float):
    """The member that ``backend``'s session for ``ttl`` is connected to."""
    session = backend._state.get().sessions[round(max(ttl, 1.0) * 1000)]
    port = session.client._connection._socket.getpeername()[1]
    return next(m for m in ensemble.members if m.client_port == port)


def test_the_leader_killed_under_a_held_lock_keeps_the_lock_and_renewal_goes_on(
    ensemble, backends, unique_key
):
    # Connected to the leader itself: its death drops our connection, and the session
    # must survive the election, carried over to a follower.
    for _ in range(20):
        backend = backends(connect_timeout=2)
        held = backend.acquire(unique_key, ttl=2)
        assert held is not None
        if _member_of(ensemble, backend, 2) is ensemble.leader():
            break
        backend.release(held)
    else:
        pytest.fail("no client of 20 connected to the leader")
    renewals = LeaseKeeper.for_process().renewal_calls
    leader = ensemble.leader()
    leader.kill()
    killed_at = time.monotonic()
    other = backends(connect_timeout=2)
    while time.monotonic() - killed_at < 2 * 2:  # two TTLs: only renewals keep it
        assert not held.lost, held.lost_reason
        assert other.acquire(unique_key, ttl=2) is None
        time.sleep(0.5)
    assert LeaseKeeper.for_process().renewal_calls - renewals >= 4
    assert _member_of(ensemble, backend, 2) is not leader
    held.ensure_held()
    assert held.release() is True
    got = other.acquire(unique_key, ttl=2)
    assert got is not None
    assert got.fencing_token > held.fencing_token  # zxids rise across the new epoch
    assert other.release(got) is True


def test_two_of_three_members_down_fail_within_the_connect_timeout_and_report_nothing_held(
    ensemble, backends, unique_key
):
    backend = backends(connect_timeout=1)
    held = backend.acquire(unique_key, ttl=2)
    assert held is not None
    survivor = _member_of(ensemble, backend, 2)
    for member in ensemble.members:
        if member is not survivor:
            member.kill()
    down_at = time.monotonic()
    wait_until(lambda: held.lost, 3, "the held lock to be reported lost by its deadline")
    assert time.monotonic() - down_at < 2.0 + 0.2
    with pytest.raises(LockLost):
        held.ensure_held()
    for attempt in range(3):
        start = time.monotonic()
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(f"{unique_key}:{attempt}", ttl=2)
        assert time.monotonic() - start < 1.0 + 0.3
        assert ensemble.url in info.value.url
    for member in ensemble.members:
        if not member.running:
            ensemble.restart(member)
    # Back: the keys tried during the outage are free (no node left behind by an attempt
    # whose outcome was unknown), and the lost lock is free for anyone.
    deadline = time.monotonic() + 15
    while True:
        try:
            regained = [backend.acquire(f"{unique_key}:{i}", ttl=2) for i in range(3)]
            break
        except LockBackendUnavailable:
            assert time.monotonic() < deadline, "the ensemble did not come back"
    assert all(h is not None for h in regained)
    again = backends().acquire(unique_key, ttl=2, blocking=True, timeout=5)
    assert again is not None
    assert again.fencing_token > held.fencing_token
