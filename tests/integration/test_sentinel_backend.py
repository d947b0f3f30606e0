"""Redis behind Sentinel (a master, a replica, three Sentinels; one setup per session):
the contract suite, then failovers while locks are held and waited on.

The fault tests leave the setup whole again (a killed master rejoins as a replica), so
their order does not matter; each asks the Sentinels which server is the master now.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_singleton_lock import LockBackendUnavailable, LockLost, connect
from celery_singleton_lock.backends.base import LockBackend
from celery_singleton_lock.lease import HeldLock
from celery_singleton_lock.testing import RedisSentinel, RedisServer
from tests.conftest import wait_until
from tests.contract import BackendSpec, CrossProcessContract, ServerOperations
from tests.contract_processes import lease_started_at
from tests.integration.processes import Worker

#: What the Sentinels and the replica ask of the master on their own (pings, INFO, hello
#: messages, replication acknowledgements): not lock operations.
_MONITORING = {"cmdstat_info", "cmdstat_ping", "cmdstat_publish", "cmdstat_replconf"}


def client_of(setup: RedisSentinel, server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=setup.password, socket_timeout=5)


def lock_operations_served(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stat["calls"]) for name, stat in stats.items() if name not in _MONITORING)


class TestSentinelContract(CrossProcessContract):
    unreachable_hosts = 3  # Sentinels asked one after the other, all within connect_timeout

    @pytest.fixture
    def backend_spec(self, redis_sentinel):
        redis_sentinel.wait_settled()
        return BackendSpec(redis_sentinel.url + "/0")

    @pytest.fixture
    def server_operations(self, redis_sentinel):
        client = client_of(redis_sentinel, redis_sentinel.master())
        yield ServerOperations(count=lambda: lock_operations_served(client))
        client.close()

    def expire(self, backend, key):
        backend._client.delete("{" + backend._full_key(key) + "}")

    def unreachable_url(self, hosts, password):
        return f"sentinel://:{password}@{','.join(hosts)}/mymaster/0"

    def check_unreachable(self, kind, error, elapsed):
        assert "no Sentinel of" in str(error)
        if kind == "silent":
            assert elapsed >= 0.4  # each silent Sentinel had its share of the 0.5 s


# -- failovers -----------------------------------------------------------------------------


@pytest.fixture
def backends(redis_sentinel) -> Iterator[list[LockBackend]]:
    """Backends made by the test (``connect`` them into this list); closed after it."""
    redis_sentinel.wait_settled()
    made: list[LockBackend] = []
    yield made
    for backend in made:
        backend.close()


def _waiters(
    backend: LockBackend, key: str, count: int, got: list[tuple[HeldLock, float]]
) -> list[threading.Thread]:
    """``count`` threads that wait for ``key``, note when they got it, and release it."""

    def wait() -> None:
        held = backend.acquire(key, ttl=10, blocking=True, timeout=40)
        assert held is not None
        got.append((held, time.monotonic()))
        backend.release(held)

    threads = [threading.Thread(target=wait) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _blocked_clients(setup: RedisSentinel, server: RedisServer) -> int:
    client = client_of(setup, server)
    try:
        return int(client.info("clients")["blocked_clients"])
    finally:
        client.close()


@pytest.mark.slow
def test_a_sentinel_failover_while_held_and_waited_on_carries_on_at_the_new_master(
    redis_sentinel, backends, unique_key
):
    backend = connect(redis_sentinel.url, connect_timeout=5)
    backends.append(backend)
    old = redis_sentinel.master()
    holder = backend.acquire(unique_key, ttl=3)  # renewed every second, through the failover
    assert holder is not None
    got: list[tuple[HeldLock, float]] = []
    threads = _waiters(backend, unique_key, 3, got)
    wait_until(lambda: _blocked_clients(redis_sentinel, old) >= 3, 10, "3 waiters blocked on the old master")

    redis_sentinel.sentinels[0].ask("SENTINEL", "FAILOVER", redis_sentinel.master_name)
    new = redis_sentinel.wait_for_master_other_than(old)
    switched_at = time.monotonic()
    # The old master still takes writes until Sentinel demotes it (about 10 s later):
    # once the +switch-master announcement is in, nothing of ours goes there any more.
    wait_until(lambda: backend.watch.master == ("127.0.0.1", new.port), 5, "the switch announced")
    late = backend.acquire(f"{unique_key}:after-switch", ttl=10)
    assert late is not None
    assert _stored_on(redis_sentinel, new, late.key)
    assert not _stored_on(redis_sentinel, old, late.key)
    redis_sentinel.demote(old, new)
    redis_sentinel.wait_settled()
    # The holder's lease is renewed at the new master, and the waiters wait there.
    wait_until(lambda: lease_started_at(holder) > switched_at, 5, "a renewal at the new master")
    wait_until(lambda: _blocked_clients(redis_sentinel, new) >= 3, 5, "the waiters blocked on the new master")
    assert not holder.lost
    released_at = time.monotonic()
    assert backend.release(holder) is True
    for thread in threads:
        thread.join(30)
    # Each release woke the next waiter: all three ran one after another, at once (their
    # 10 s leases show that none waited for an expiry), with rising fencing tokens.
    assert len(got) == 3
    assert got[-1][1] - released_at < 3
    tokens = [holder.fencing_token, *(held.fencing_token for held, _ in got)]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 4
    assert _blocked_clients(redis_sentinel, old) == 0  # nothing of ours is left on the old master
    assert backend.release(late) is True


def _stored_on(setup: RedisSentinel, server: RedisServer, key: str) -> bool:
    client = client_of(setup, server)
    try:
        return bool(client.exists("{singleton-lock:" + key + "}"))
    finally:
        client.close()


@pytest.mark.slow
def test_a_sigkilled_master_keeps_acknowledged_locks_and_may_lose_the_others(
    redis_sentinel, backends, unique_key
):
    setup = redis_sentinel
    acknowledged = connect(setup.url, connect_timeout=5, min_replicas=1, min_replicas_timeout=0.5)
    plain = connect(setup.url, connect_timeout=5)
    rival = connect(setup.url, connect_timeout=5)
    backends += [acknowledged, plain, rival]
    kept_key, lost_key = f"{unique_key}:acknowledged", f"{unique_key}:plain"
    kept = acknowledged.acquire(kept_key, ttl=10)
    assert kept is not None
    got: list[tuple[HeldLock, float]] = []
    threads = _waiters(rival, kept_key, 1, got)
    master = setup.master()
    (replica,) = setup.replicas()
    wait_until(lambda: _blocked_clients(setup, master) >= 1, 10, "the waiter blocked")

    # Replication stops: the replica is paused (it cannot reconnect) and the master drops
    # its link, so what the master grants now, the replica never sees.
    replica.pause()
    try:
        master_client = client_of(setup, master)
        master_client.client_kill_filter(_type="replica")
        master_client.close()
        unreplicated = plain.acquire(lost_key, ttl=10)
        assert unreplicated is not None
        killed = setup.kill_master()
    finally:
        replica.resume()
    killed_at = time.monotonic()
    setup.rejoin(killed)  # promoted, then the old master back as its replica
    recovered_at = time.monotonic()

    # The acknowledged lock is on the new master: renewed there, nobody else gets it ...
    wait_until(lambda: lease_started_at(kept) > recovered_at, 10, "a renewal acknowledged at the new master")
    assert not kept.lost
    assert rival.acquire(kept_key, ttl=5) is None
    # ... and its waiter carries on there: woken by the release, not by an expiry.
    released_at = time.monotonic()
    assert acknowledged.release(kept) is True
    threads[0].join(20)
    assert len(got) == 1
    assert got[0][1] - released_at < 3
    # The lock the replica never saw is gone (docs/sentinel.md): a second holder gets
    # it, with a higher fencing token, and the first learns that it lost it.
    second = rival.acquire(lost_key, ttl=5)
    assert second is not None
    assert second.fencing_token > unreplicated.fencing_token
    wait_until(lambda: unreplicated.lost, 10, "the first holder to see its lock lost")
    with pytest.raises(LockLost):
        unreplicated.ensure_held()
    rival.release(second)
    assert recovered_at - killed_at < 20  # down-after 1 s, an election, a resync


def test_an_acknowledged_lock_is_on_the_replica_when_acquire_returns(redis_sentinel, backends, unique_key):
    backend = connect(redis_sentinel.url, min_replicas=1)
    backends.append(backend)
    held = backend.acquire(unique_key, ttl=10)
    assert held is not None
    (replica,) = redis_sentinel.replicas()
    client = client_of(redis_sentinel, replica)
    try:
        stored = client.get("{singleton-lock:" + unique_key + "}")
    finally:
        client.close()
    assert stored is not None
    assert stored.split(b"\n", 1)[0].split(b":", 1)[0].decode() == held.token
    assert backend.release(held) is True


def test_an_acknowledged_semaphore_slot_is_on_the_replica_when_acquire_returns(
    redis_sentinel, backends, unique_key
):
    backend = connect(redis_sentinel.url, min_replicas=1)
    backends.append(backend)
    first = backend.acquire(unique_key, ttl=10, limit=2)
    second = backend.acquire(unique_key, ttl=10, limit=2)  # slot 1: a record of its own
    assert first is not None
    assert second is not None
    assert second.slot == 1
    (replica,) = redis_sentinel.replicas()
    client = client_of(redis_sentinel, replica)
    try:
        stored = client.get(backend.slot_key(backend._full_key(unique_key), 1))
    finally:
        client.close()
    assert stored is not None
    assert stored.split(b"\n", 1)[0].split(b":", 1)[0].decode() == second.token
    assert backend.release(second) is True
    assert backend.release(first) is True


def test_without_a_replica_to_acknowledge_it_a_lock_is_not_granted(redis_sentinel, backends, unique_key):
    backend = connect(redis_sentinel.url, connect_timeout=1, min_replicas=1, min_replicas_timeout=0.2)
    backends.append(backend)
    master = redis_sentinel.master()
    (replica,) = redis_sentinel.replicas()
    replica.pause()
    try:
        started = time.monotonic()
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(unique_key, ttl=10)
        elapsed = time.monotonic() - started
    finally:
        replica.resume()
    assert "acknowledged" in str(info.value)
    assert "min_replicas=1" in str(info.value)
    assert elapsed < 1 + 0.5  # tried again until connect_timeout, then failed closed
    client = client_of(redis_sentinel, master)
    try:  # what the master applied is released again, not left for its TTL
        wait_until(lambda: not client.exists("{singleton-lock:" + unique_key + "}"), 5, "the lock released")
    finally:
        client.close()


# -- a real worker whose broker is Sentinel ------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_worker(redis_sentinel, tmp_path_factory):
    """A prefork worker of tests/integration/default_app.py: broker ``sentinel://``
    (kombu's form, the master's name in the transport options), no singleton_lock_backend."""
    directory = tmp_path_factory.mktemp("sentinel-worker")
    environment = {
        "CSL_DEFAULT_DIR": str(directory),
        "CSL_DEFAULT_BROKER": redis_sentinel.kombu_url,
        "CSL_DEFAULT_TRANSPORT_OPTIONS": json.dumps({"master_name": redis_sentinel.master_name}),
    }
    (directory / "results").mkdir()
    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    # The module reads its broker when imported: a fresh import for this broker, and
    # none left behind for the other tests of the default backend.
    sys.modules.pop("tests.integration.default_app", None)
    default_app = importlib.import_module("tests.integration.default_app")
    worker = Worker("redis://unused", directory, app="tests.integration.default_app", **environment)
    try:
        worker.wait_ready()
        yield default_app
    finally:
        worker.stop()
        default_app.app.close()  # the broker connections .delay() opened, before the app goes
        sys.modules.pop("tests.integration.default_app", None)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_a_worker_with_a_sentinel_broker_locks_on_its_master_by_default(redis_sentinel, sentinel_worker):
    app = sentinel_worker
    assert app.app.conf.get("singleton_lock_backend") is None
    master = client_of(redis_sentinel, redis_sentinel.master())
    scripts_before = _scripts_run(master)
    run = uuid.uuid4().hex[:12]
    skipped = [app.sleepy.delay(run, 1.5) for _ in range(3)]
    assert sorted(map(str, (r.get(timeout=30) for r in skipped))) == ["None", "None", "ran"]
    assert [e[0] for e in app.events(run)] == ["start", "end"]  # four processes, one run
    for task in (app.sleepy_wait, app.sleepy_retry):
        run = uuid.uuid4().hex[:12]
        calls = [task.delay(run, 0.3) for _ in range(3)]
        assert [r.get(timeout=60) for r in calls] == ["ran"] * 3
        events = app.events(run)
        assert [e[0] for e in events] == ["start", "end"] * 3  # one after another
    # The locks were the Sentinel master's: 3 + 3 + 3 runs, each an acquire and a release.
    try:
        assert _scripts_run(master) - scripts_before >= 18
    finally:
        master.close()


def _scripts_run(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_the_lease_keepers_copy_for_a_native_thread_renews_and_releases_on_the_master(
    redis_sentinel, backends, unique_key
):
    # A gevent worker's keeper renews from an OS thread, through this copy (lease.py),
    # which must still find the master through the Sentinels.
    backend = connect(redis_sentinel.url)
    backends.append(backend)
    held = backend.acquire(unique_key, ttl=10)
    assert held is not None
    native = backend.for_native_thread()
    assert native.renew([held]) == [True]
    assert native.release(held) is True
    again = backend.acquire(unique_key, ttl=5)
    assert again is not None
    assert backend.release(again) is True
    native.close()  # its connections (the rest it shares with the original, closed again after)
