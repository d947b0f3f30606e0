"""Redis Cluster (three masters with a replica each, one cluster per session): the
contract suite through ``rediscluster://``, a slot migration while locks are held and
waited on, renewal of 1,000 locks in one request per master, and ``min_replicas``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from celery_singleton_lock import ConfigurationError, LockBackendUnavailable, connect
from celery_singleton_lock.backends.cluster import ClusterBackend
from celery_singleton_lock.lease import HeldLock, LeaseKeeper
from celery_singleton_lock.testing import RedisCluster, RedisServer
from tests.conftest import wait_until
from tests.contract import BackendSpec, CrossProcessContract, ServerOperations
from tests.integration.certificates import self_signed

#: Our counting's own commands, and the cluster's own traffic (replicas' acknowledgements
#: of the replication stream): not lock operations.
_NOT_OURS = {"cmdstat_info", "cmdstat_cluster", "cmdstat_replconf", "cmdstat_ping", "cmdstat_psync"}


def operations_served(clients: list[redis.Redis]) -> int:
    return sum(
        int(stat["calls"]) for client in clients
        for name, stat in client.info("commandstats").items() if name not in _NOT_OURS
    )


def blocked_clients(cluster: RedisCluster, server: RedisServer) -> int:
    client = cluster.client(server)
    try:
        return int(client.info("clients")["blocked_clients"])
    finally:
        client.close()


class TestClusterContract(CrossProcessContract):
    unreachable_hosts = 2  # startup nodes asked one after the other, all within connect_timeout

    @pytest.fixture
    def backend_spec(self, redis_cluster):
        return BackendSpec(redis_cluster.url)

    @pytest.fixture
    def server_operations(self, redis_cluster):
        clients = [redis_cluster.client(server) for server in redis_cluster.masters]
        yield ServerOperations(count=lambda: operations_served(clients))
        for client in clients:
            client.close()

    def expire(self, backend, key):
        full = backend._full_key(key)
        backend._node_of(full).client.delete("{" + full + "}")

    def unreachable_url(self, hosts, password):
        return f"rediscluster://:{password}@{','.join(hosts)}"

    def check_unreachable(self, kind, error, elapsed):
        assert "answered CLUSTER SLOTS" in str(error)
        if kind == "refused":
            assert "refused the connection" in str(error)
        else:
            assert "did not answer within 0.25s" in str(error)


# -- the cluster's own promises ----------------------------------------------------------


@pytest.fixture
def cluster_backend(redis_cluster) -> Iterator[ClusterBackend]:
    backend = connect(redis_cluster.url, connect_timeout=5)
    assert isinstance(backend, ClusterBackend)
    yield backend
    backend.close()


def _key_in_slot(backend: ClusterBackend, slot: int, stem: str) -> str:
    """A lock key (unprefixed) whose lock lives in ``slot``."""
    for number in range(1_000_000):
        key = f"{stem}:{number}"
        if RedisCluster.slot_of("{" + backend._full_key(key) + "}") == slot:
            return key
    raise AssertionError(f"no key of slot {slot}")


def test_a_slot_migration_while_held_and_waited_on_loses_no_lock_and_strands_no_waiter(
    redis_cluster, cluster_backend, unique_key
):
    backend = cluster_backend
    slot = RedisCluster.slot_of("{" + backend._full_key(unique_key) + "}")
    source = redis_cluster.owner_of(slot)
    target = next(m for m in redis_cluster.masters if m is not source)
    holder = backend.acquire(unique_key, ttl=30)  # no expiry can explain what follows
    assert holder is not None
    got: list[tuple[HeldLock, float]] = []

    def wait() -> None:
        held = backend.acquire(unique_key, ttl=10, blocking=True, timeout=30)
        assert held is not None
        got.append((held, time.monotonic()))
        backend.release(held)

    threads = [threading.Thread(target=wait) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: blocked_clients(redis_cluster, source) >= 2, 10, "2 waiters blocked on the source")

    # Half way: the slot is migrating and the held lock is already on the target.
    redis_cluster.begin_move(slot, target)
    assert redis_cluster.migrate_keys(slot, source, target) >= 1
    assert backend.renew([holder]) == [True]  # found through ASK on the target
    neighbour = backend.acquire(_key_in_slot(backend, slot, unique_key), ttl=10)  # a new lock: ASK
    assert neighbour is not None
    redis_cluster.end_move(slot, target)
    # The source ends the waiters' BLPOP with MOVED: they wait on the target now.
    wait_until(lambda: blocked_clients(redis_cluster, target) >= 2, 10, "the waiters blocked on the target")
    assert blocked_clients(redis_cluster, source) == 0
    assert backend.renew([holder]) == [True]  # on the target, its owner now
    assert not holder.lost
    released_at = time.monotonic()
    assert backend.release(holder) is True
    for thread in threads:
        thread.join(30)
    # Each release woke the next waiter at once (the holder's 30 s lease did not run out).
    assert len(got) == 2
    assert got[-1][1] - released_at < 5
    tokens = [holder.fencing_token, *(held.fencing_token for held, _ in got)]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 3
    assert backend.release(neighbour) is True
    assert not backend.lock_info(unique_key)


def test_a_thousand_locks_on_three_masters_are_renewed_in_one_request_per_master(
    redis_cluster, cluster_backend, unique_key
):
    backend = cluster_backend
    held = [backend.acquire(f"{unique_key}:{n}", ttl=60) for n in range(1000)]
    assert all(held)
    keeper = LeaseKeeper.for_process()
    for each in held:
        keeper.untrack(each)  # renewed here only, counted
    try:
        per_master = {m.port: 0 for m in redis_cluster.masters}
        for each in held:
            per_master[backend._node_of(backend._full_key(each.key)).address[1]] += 1
        assert min(per_master.values()) > 200  # spread over every master
        clients = [redis_cluster.client(m) for m in redis_cluster.masters]
        try:
            def scripts_run() -> list[int]:
                return [
                    sum(int(stat["calls"]) for name, stat in c.info("commandstats").items()
                        if name in ("cmdstat_evalsha", "cmdstat_eval"))
                    for c in clients
                ]

            assert backend.renew(held) == [True] * 1000  # a master new to the script: EVAL after EVALSHA
            before = scripts_run()
            started = time.perf_counter()
            assert backend.renew(held) == [True] * 1000
            elapsed = time.perf_counter() - started
            after = scripts_run()
        finally:
            for client in clients:
                client.close()
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
        assert elapsed < 2.0, elapsed  # one round trip to all three at once (~10 ms here)
    finally:
        for each in held:
            backend.release(each)


def test_masters_that_never_ran_our_scripts_are_sent_them(redis_cluster, cluster_backend, unique_key):
    backend = cluster_backend
    held = [backend.acquire(f"{unique_key}:{n}", ttl=10) for n in range(30)]
    for master in redis_cluster.masters:
        redis_cluster.ask(master, "SCRIPT", "FLUSH")
    assert backend.renew(held) == [True] * 30
    assert [backend.release(h) for h in held] == [True] * 30
    assert backend.acquire(unique_key, ttl=10) is not None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("rediscluster://h1:7000,h2:7001/3", "only database 0"),
        ("rediscluster://h1:7000,h2:x", "port 'x'"),
        ("rediscluster://:pw@h1:7000,[nonsense]:7001", "not a valid URL"),
    ],
)
def test_a_bad_cluster_url_is_a_configuration_error_naming_the_setting(url, words):
    with pytest.raises(ConfigurationError) as info:
        connect(url)
    assert info.value.option in ("singleton_lock_backend", "url")
    assert words in str(info.value)
    assert "pw" not in str(info.value)


def test_a_server_without_cluster_support_is_a_configuration_error(redis_url):
    backend = connect(redis_url.replace("redis://", "rediscluster://"), connect_timeout=2)
    try:
        with pytest.raises(ConfigurationError) as info:
            backend.acquire("k", ttl=5)
    finally:
        backend.close()
    assert "is not a cluster node" in str(info.value)


@pytest.mark.parametrize("key", ["report:42", "a}b", "}x", "{weird}", "émoji:✓", "x{y}z"])
def test_a_keys_slot_is_the_one_redis_computes_for_its_lock_name(key):
    backend = connect("rediscluster://127.0.0.1:1")  # no round trip until the first lock
    try:
        assert isinstance(backend, ClusterBackend)
        full = backend._full_key(key)
        assert backend._slot_of(full) == RedisCluster.slot_of("{" + full + "}")
    finally:
        backend.close()


# -- min_replicas: an acquisition counts once a replica has it ----------------------------


def _replica_of_owner(
    cluster: RedisCluster, backend: ClusterBackend, key: str
) -> tuple[RedisServer, RedisServer]:
    owner = cluster.owner_of(RedisCluster.slot_of("{" + backend._full_key(key) + "}"))
    return owner, next(r for r in cluster.replicas if cluster.master_of(r) is owner)


@pytest.mark.parametrize("limit", [1, 3])  # a lock, and a semaphore's slot
def test_with_min_replicas_each_acquisition_and_renewal_waits_for_a_replica(redis_cluster, unique_key, limit):
    backend = connect(redis_cluster.url, min_replicas=1)
    try:
        owner, _ = _replica_of_owner(redis_cluster, backend, unique_key)
        client = redis_cluster.client(owner)
        try:
            def waits() -> int:
                return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))

            warm = backend.acquire(unique_key, ttl=10, limit=limit)  # the master learns our scripts
            assert warm is not None
            backend.renew([warm])
            backend.release(warm)
            before = waits()
            held = backend.acquire(unique_key, ttl=10, limit=limit)
            assert held is not None
            assert backend.renew([held]) == [True]
            assert waits() - before == 2  # one WAIT behind the grant, one behind the renewal
            assert backend.release(held) is True
        finally:
            client.close()
    finally:
        backend.close()


def test_with_min_replicas_a_grant_no_replica_acknowledged_fails_and_is_released(redis_cluster, unique_key):
    backend = connect(redis_cluster.url, min_replicas=1, min_replicas_timeout=0.2, connect_timeout=2)
    try:
        _, replica = _replica_of_owner(redis_cluster, backend, unique_key)
        replica.pause()  # well within cluster-node-timeout: no failover
        try:
            with pytest.raises(LockBackendUnavailable) as info:
                backend.acquire(unique_key, ttl=10)
        finally:
            replica.resume()
        assert "only 0 of min_replicas=1 replicas acknowledged it within 0.2s" in str(info.value)
        # The grant was applied by the master but is nobody's: released by its token.
        wait_until(lambda: not backend.lock_info(unique_key), 5, "the unacknowledged grant released")
    finally:
        backend.close()


# -- a master's failover ------------------------------------------------------------------


def _renewed(backend: ClusterBackend, held: HeldLock) -> bool:
    try:
        return backend.renew([held]) == [True]
    except LockBackendUnavailable:  # the master is dead and not failed over yet
        return False


@pytest.mark.slow
def test_a_masters_failover_while_held_and_waited_on_carries_on_at_the_promoted_replica(
    redis_cluster, unique_key
):
    backend = connect(redis_cluster.url, connect_timeout=10)
    # Taken with min_replicas=1: the grant is on the replica before the master dies.
    # (The promoted replica has no replica of its own: min_replicas=1 fails there until
    # the old master rejoins, as it should.)
    acknowledged = connect(redis_cluster.url, min_replicas=1)
    master, replica = _replica_of_owner(redis_cluster, backend, unique_key)
    try:
        holder = acknowledged.acquire(unique_key, ttl=30)
        assert holder is not None
        LeaseKeeper.for_process().untrack(holder)  # renewed here, through the failover
        got: list[HeldLock] = []

        def wait() -> None:
            held = backend.acquire(unique_key, ttl=10, blocking=True, timeout=30)
            assert held is not None
            got.append(held)
            backend.release(held)

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_until(lambda: blocked_clients(redis_cluster, master) >= 1, 10, "the waiter blocked there")
        try:
            assert redis_cluster.kill(master) is replica
            # The first call after the kill learns the master is gone; the next goes to the
            # promoted replica (the lease keeper tries again in the same way).
            wait_until(lambda: _renewed(backend, holder), 5, "a renewal at the promoted replica")
            wait_until(lambda: blocked_clients(redis_cluster, replica) >= 1, 10, "the waiter moved")
            assert backend.release(holder) is True
            waiter.join(30)
        finally:
            redis_cluster.rejoin(master, replica)
        assert len(got) == 1
        assert got[0].fencing_token > holder.fencing_token
    finally:
        backend.close()
        acknowledged.close()


def test_redisclusters_reaches_every_master_over_tls(tmp_path, unique_key):
    key_file, certificate = self_signed(tmp_path, "redis")
    with RedisCluster(tls=(str(certificate), str(key_file), str(certificate))) as cluster:
        backend = connect(cluster.tls_url, ssl_ca_certs=str(certificate))
        try:
            held = [backend.acquire(f"{unique_key}:{n}", ttl=10) for n in range(30)]
            assert all(held)
            assert backend.renew(held) == [True] * 30
            assert [backend.release(h) for h in held] == [True] * 30
            assert isinstance(backend, ClusterBackend)
            # The cluster names its masters by their TLS ports to a TLS client.
            assert {n.address[1] for n in backend._slots if n} == {m.tls_port for m in cluster.masters}
        finally:
            backend.close()
