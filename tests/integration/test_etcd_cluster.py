"""The etcd backend on a real 3-member cluster: losing the leader, losing the quorum."""

from __future__ import annotations

import threading
import time

import pytest

from celery_singleton_lock import LockBackendUnavailable, connect
from celery_singleton_lock.testing import EtcdCluster
from tests.conftest import wait_until

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
