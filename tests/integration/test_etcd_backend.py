"""The etcd backend against a real single-member etcd (the cluster cases are in
test_etcd_cluster.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time

import pytest
from pyetcd import etcdrpc

from celery_singleton_lock import (
    ConfigurationError,
    HeldLock,
    LockBackendUnavailable,
    LockKeyError,
    connect,
)
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.testing import EtcdCluster, etcd_binary
from tests.conftest import wait_until
from tests.contract import BackendSpec, CrossProcessContract, ServerOperations
from tests.integration.etcd_helpers import entries, names_written, revision
from tests.queue_contract import QueueContract, connections, queue_waiters


def _revoke(backend, lease_id: int) -> None:
    backend._cluster.call("Lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id))


@pytest.fixture(scope="module")
def counted_member():
    """A member of its own for counting requests: the count must not include other
    clients of this process (renewals of other tests' locks, a reaper still revoking)."""
    with EtcdCluster(size=1) as cluster:
        yield cluster


class TestEtcdContract(CrossProcessContract):
    # etcd's leader looks for expired leases every 500 ms, then commits their revocation.
    expiry_lateness = 1.0
    unreachable_hosts = 2

    @pytest.fixture
    def backend_spec(self, etcd_url):
        return BackendSpec(etcd_url)

    @pytest.fixture
    def server_operations(self, counted_member):
        member = counted_member.members[0]
        return ServerOperations(count=lambda: member.grpc_messages("*"), spec=BackendSpec(counted_member.url))

    def expire(self, backend, key):
        for entry in entries(backend, key):
            _revoke(backend, entry.lease)

    def unreachable_url(self, hosts, password):
        return f"etcd://app:{password}@{','.join(hosts)}"

    def check_unreachable(self, kind, error, elapsed):
        # Both kinds are retried on every member until the connect_timeout (0.5 s) ends:
        # a refusal may be a member restarting.
        assert elapsed >= 0.4


@pytest.fixture
def backend(etcd_url):
    backend = connect(etcd_url)
    yield backend
    backend.close()


@pytest.fixture
def backends(etcd_url):
    """Make more backends of the server (each its own leases, as another process's)."""
    with connections(etcd_url) as make:
        yield make


@pytest.fixture
def line_length(backend):
    return lambda key: len(entries(backend, key))


class TestEtcdQueue(QueueContract):
    pass


def test_an_entry_takes_the_first_place_and_is_bound_to_its_own_lease(backend, etcd_server, unique_key):
    held = backend.acquire(unique_key + "/with/slashes", ttl=5)
    (entry,) = entries(backend, unique_key + "/with/slashes")
    assert entry.key.decode() == "singleton-lock/" + unique_key + "%2Fwith%2Fslashes/0"
    assert held.token.endswith("0" * 8)  # the token names the place
    assert entry.create_revision == held.fencing_token
    assert entry.lease == int(held.token[:16], 16)
    token, owner = entry.value.split(b"\n", 1)
    assert token.decode() == held.token
    assert json.loads(owner)["pid"] == os.getpid()
    # A key that is a path prefix of another is a different lock.
    assert backend.acquire(unique_key + "/with", ttl=5) is not None
    other = connect(etcd_server.url, spare_leases=0)
    assert other.acquire(unique_key + "/with/slashes", ttl=5) is None
    assert backend.release(held) is True
    other.close()


def test_each_release_sends_exactly_one_watch_event(backend, backends, line_length, etcd_server, unique_key):
    member = etcd_server.members[0]
    holder = backend.acquire(unique_key, ttl=10)
    line = queue_waiters(backends, line_length, unique_key, 5)
    watch_events_before = member.grpc_messages("Watch", "sent")
    backend.release(holder)
    for i in range(5):
        wait_until(lambda i=i: len(line.order) == i + 1, 10, f"turn {i}")
        # Only the waiter right behind the released entry was told, by one event.
        assert member.grpc_messages("Watch", "sent") - watch_events_before == i + 1
        line.proceed[i].set()
    line.finish()


def _lease_ids(cluster: EtcdCluster) -> set[int]:
    etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
    endpoints = ",".join(m.endpoint for m in cluster.members)
    out = subprocess.run(
        [etcdctl, "--endpoints", endpoints, "lease", "list", "-w", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return {lease["id"] for lease in json.loads(out).get("leases") or []}


def test_failed_attempts_and_timed_out_waits_leak_no_lease(etcd_server, unique_key):
    backend = connect(etcd_server.url, spare_leases=2)
    before = _lease_ids(etcd_server)
    holder = backend.acquire(unique_key, ttl=30)
    for _ in range(100):
        assert backend.acquire(unique_key, ttl=30) is None
    for _ in range(10):
        assert backend.acquire(unique_key, ttl=30, blocking=True, timeout=0.05) is None
    for i in range(20):  # cycles on other keys reuse spares
        backend.release(backend.acquire(f"{unique_key}:{i}", ttl=30))
    backend.release(holder)
    # What is left: at most the spares kept for reuse, and nothing once closed.
    assert len(_lease_ids(etcd_server) - before) <= 2
    backend.close()
    assert _lease_ids(etcd_server) - before == set()


def test_unknown_option_and_bad_url_name_the_setting():
    with pytest.raises(ConfigurationError) as info:
        connect("etcd://127.0.0.1:2379", ssl_ca_certs="/x")
    assert info.value.option == "singleton_lock_backend_options"
    assert "ssl_ca_certs" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        connect("etcd://")
    assert info.value.option == "singleton_lock_backend"


def test_authenticated_cluster_takes_the_user_from_the_url():
    with EtcdCluster(size=1) as cluster:
        endpoint = cluster.members[0].endpoint
        etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
        for args in (["user", "add", "root:r00t-pw"], ["role", "add", "root"],
                     ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            subprocess.run([etcdctl, "--endpoints", endpoint, *args], check=True, capture_output=True)
        good = connect(f"etcd://root:r00t-pw@{endpoint}")
        held = good.acquire("k", ttl=5)
        assert held is not None
        assert good.release(held) is True
        bad = connect(f"etcd://root:wrong-pw@{endpoint}", connect_timeout=1)
        with pytest.raises(LockBackendUnavailable) as info:
            bad.acquire("k", ttl=5)
        assert "credentials" in str(info.value)
        assert "wrong-pw" not in str(info.value)
        anonymous = connect(f"etcd://{endpoint}", connect_timeout=1)
        with pytest.raises(LockBackendUnavailable):
            anonymous.acquire("k", ttl=5)
        for backend in (good, bad, anonymous):
            backend.close()


def test_only_the_exact_token_renews_or_releases(backend, backends, unique_key):
    # An etcd token starts with its lease id: a handle with a prefix of the holder's
    # token names the holder's lease. Its release once revoked that lease, which deleted
    # the holder's entry (issue 9, item 7).
    held = backend.acquire(unique_key, ttl=10)
    forger = backends()
    # A token with the holder's lease and place but other random digits names the
    # holder's entry: only the stored value tells them apart.
    for token in ("", held.token[:16], held.token[:39], held.token[:16] + "0" * 16 + held.token[32:],
                  held.token + "0", held.token.upper()):
        forged = HeldLock(forger, unique_key, token, held.fencing_token, held.ttl, held.owner,
                          valid_until=held._valid_until)
        assert forger.renew([forged]) == [False], token
        assert forger.release(forged) is False, token
    assert forger.acquire(unique_key, ttl=10) is None  # still held, by the holder alone
    assert backend.renew([held]) == [True]
    assert [entry.create_revision for entry in entries(backend, unique_key)] == [held.fencing_token]
    assert backend.release(held) is True


def test_a_request_etcd_refuses_as_too_large_is_a_key_error_not_an_outage(unique_key):
    # The key passes the library's own bound (1024 bytes); this server takes only 3 KiB
    # per request, and an attempt names the key four times, a place in line three times.
    with EtcdCluster(size=1, extra_args=["--max-request-bytes", "3072"]) as cluster:
        backend = connect(cluster.url, connect_timeout=2)
        started = time.monotonic()
        for blocking in (False, True):
            with pytest.raises(LockKeyError) as info:
                backend.acquire("k" * 1000, ttl=5, blocking=blocking, timeout=1)
            assert info.value.argument == "key"
            assert "too large" in str(info.value)
        assert time.monotonic() - started < 1  # refused at once, never retried as an outage
        assert backend.acquire(unique_key, ttl=5) is not None  # a short key is fine
        backend.close()


def test_a_ttl_etcd_refuses_names_the_ttl(backend):
    # The library refuses TTLs over 10 years first; etcd's own bound is 9e9 s, and its
    # refusal (a bare gRPC OUT_OF_RANGE before) names the ttl too.
    grant = etcdrpc.LeaseGrantRequest(TTL=10**10, ID=1)
    with pytest.raises(ConfigurationError) as info:
        backend._call("Lease", "LeaseGrant", grant, "k")
    assert info.value.option == "ttl"
    with pytest.raises(ConfigurationError) as info:
        backend.acquire("k", ttl=1e10)
    assert info.value.option == "ttl"


def test_wait_refuses_a_nan_timeout_and_takes_inf_as_no_limit(backend, etcd_url, unique_key):
    holder = backend.acquire(unique_key, ttl=10)
    waiter = connect(etcd_url)
    # wait() is what the Wait policy and HA beat call directly; NaN waited forever.
    with pytest.raises(ConfigurationError) as info:
        waiter.wait(unique_key, 10, timeout=math.nan)
    assert info.value.option == "timeout"
    assert len(entries(backend, unique_key)) == 1  # it did not queue
    got: list = []
    thread = threading.Thread(
        target=lambda: got.append(waiter.acquire(unique_key, ttl=10, blocking=True, timeout=math.inf))
    )
    thread.start()
    wait_until(lambda: len(entries(backend, unique_key)) == 2, 5, "the waiter to queue")
    backend.release(holder)
    thread.join(5)
    assert got[0] is not None
    assert got[0].fencing_token > holder.fencing_token
    waiter.release(got[0])
    waiter.close()


def test_a_keys_history_leaves_no_names_behind(backend, etcd_url, unique_key):
    # etcd keeps every name ever written in its index until a compaction, which it does
    # not run by default, and the acquire's compare visits every name under the key: one
    # new name per acquisition made the 8,000th cost half again the first. Every
    # acquisition of a free key, blocking or not, takes place 0 again.
    since = revision(backend)
    for _ in range(200):
        assert backend.release(backend.acquire(unique_key, ttl=10)) is True
    for _ in range(20):
        with backend.lock(unique_key, ttl=10, timeout=5):
            pass
    directory = backend._full_key(unique_key).encode()
    assert names_written(backend, unique_key, since) == {directory + b"0"}
    assert entries(backend, unique_key) == []
    # Contended: four clients taking turns use the places of at most four entries at once.
    since = revision(backend)
    clients = [connect(etcd_url) for _ in range(4)]

    def take_turns(client) -> None:
        for _ in range(15):
            with client.lock(unique_key, ttl=10, timeout=10):
                pass

    threads = [threading.Thread(target=take_turns, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert names_written(backend, unique_key, since) <= {directory + b"%x" % i for i in range(4)}
    for client in clients:
        client.close()


def test_a_waiter_whose_place_was_taken_again_queues_behind_the_newcomer(backend, etcd_url, unique_key):
    # Places are reused: once a waiter's entry is gone (its lease ended), a newcomer may
    # take the same place. The waiter must not read the newcomer's entry as its own (both
    # would then think they hold the lock); it queues again, at the back.
    holder = backend.acquire(unique_key, ttl=10)
    first, second = connect(etcd_url), connect(etcd_url)
    got: dict[str, HeldLock | None] = {}

    def wait(name: str, client) -> None:
        got[name] = client.acquire(unique_key, ttl=10, blocking=True, timeout=20)

    early = threading.Thread(target=wait, args=("first", first))
    early.start()
    wait_until(lambda: len(entries(backend, unique_key)) == 2, 5, "the first waiter to queue")
    (_, place_1) = entries(backend, unique_key)
    _revoke(backend, place_1.lease)  # its lease ends: its entry is deleted
    late = threading.Thread(target=wait, args=("second", second))
    late.start()
    wait_until(
        lambda: [e.key[-1:] for e in entries(backend, unique_key)][1:2] == [b"1"]
        and entries(backend, unique_key)[1].lease != place_1.lease,
        5, "the newcomer to take place 1",
    )
    backend.release(holder)
    wait_until(lambda: "second" in got, 5, "the newcomer's turn")
    assert got["second"] is not None
    assert "first" not in got  # still waiting, behind the newcomer
    second.release(got["second"])
    early.join(10)
    late.join(10)
    assert got["first"] is not None
    assert got["first"].fencing_token > got["second"].fencing_token
    first.release(got["first"])
    first.close()
    second.close()


def test_a_line_longer_than_one_offer_of_places_queues_in_order(backend, backends, line_length, unique_key):
    # A waiter offers places 0-7 in one transaction; the ninth entry finds them all taken
    # and offers the free places of the line it read instead.
    holder = backend.acquire(unique_key, ttl=10)
    line = queue_waiters(backends, line_length, unique_key, 9)
    assert sorted(e.key[-1:] for e in entries(backend, unique_key)) == [b"%x" % i for i in range(10)]
    backend.release(holder)
    for i in range(9):
        wait_until(lambda i=i: len(line.order) == i + 1, 10, f"turn {i}")
        line.proceed[i].set()
    line.finish()
    assert line.order == list(range(9))


def test_a_waiter_offers_the_place_its_last_release_freed(backend, etcd_url, unique_key):
    # A process contending in a loop queues again right after its release, when a long
    # line's lowest places are all taken and its own is free: it offers that place with
    # the lowest ones, and queues in one transaction instead of two.
    looper = connect(etcd_url)
    held = [backend.acquire(unique_key, ttl=10, limit=10) for _ in range(9)]
    last = looper.acquire(unique_key, ttl=10, limit=10)
    assert last.token[32:40] == f"{9:08x}"
    assert looper.release(last) is True
    sent: list[str] = []
    call = looper._cluster.call

    def counted(service: str, method: str, request: object, **options: object) -> object:
        sent.append(method)
        return call(service, method, request, **options)

    looper._cluster.call = counted
    again = looper.acquire(unique_key, ttl=10, blocking=True, timeout=5, limit=10)
    assert again is not None
    assert again.token[32:40] == f"{9:08x}"
    assert sent == ["Txn"]
    assert looper.release(again) is True
    for handle in held:
        assert backend.release(handle) is True
    looper.close()


def test_keep_until_moves_the_entry_to_a_lease_nobody_renews(backend, unique_key):
    # throttle's window outlives the worker: the server ends the lease by itself.
    held = backend.acquire(unique_key, ttl=1)
    old_lease = int(held.token[:16], 16)
    assert backend.keep_until(held, backend.clock() + 3) is True
    (entry,) = entries(backend, unique_key)
    assert entry.lease != old_lease
    assert entry.value.startswith(held.token.encode() + b"\n")
    left = backend._cluster.call("Lease", "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=entry.lease))
    assert 2 <= left.TTL <= 3
    assert held not in LeaseKeeper.for_process().tracked()
    assert backend.release(held) is False  # the window's lease ends it, not a release
    wait_until(lambda: entries(backend, unique_key) == [], 5, "the window to end")
