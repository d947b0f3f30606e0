"""The Redis backend against a real redis-server."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from celery_singleton_lock import ConfigurationError, LockBackendUnavailable, connect
from celery_singleton_lock.backends.base import SLOT_MARK, LockBackend
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.backends.redis import SIGNAL_LIFETIME_MS
from celery_singleton_lock.lease import HeldLock, LeaseKeeper
from celery_singleton_lock.testing import RedisServer
from tests.conftest import wait_until
from tests.contract import BackendSpec, CrossProcessContract, ServerOperations


class TestRedisContract(CrossProcessContract):
    @pytest.fixture
    def backend_spec(self, redis_url):
        return BackendSpec(redis_url + "/0")

    @pytest.fixture
    def server_operations(self, redis_client):
        return ServerOperations(count=lambda: commands_served(redis_client))

    def expire(self, backend, key):
        backend._client.delete("{" + backend._full_key(key) + "}")

    def unreachable_url(self, hosts, password):
        return f"redis://app:{password}@{hosts[0]}/0"

    def check_unreachable(self, kind, error, elapsed):
        if kind == "refused":
            assert elapsed < 0.2  # refused at once, not waited on
            assert "refused the connection" in str(error)
            assert "did not answer" not in str(error)
        else:
            assert elapsed >= 0.4  # given the whole connect_timeout (0.5 s)
            assert "did not answer within 0.5s" in str(error)
            assert "refused" not in str(error)


def commands_served(client: redis.Redis) -> int:
    """Commands the server has run, less the INFO calls that read this count."""
    stats = client.info("commandstats")
    return sum(int(stat["calls"]) for name, stat in stats.items() if name != "cmdstat_info")


def test_lock_stores_token_and_owner_with_a_hash_tag(redis_url, redis_client, unique_key):
    backend = connect(redis_url + "/0", prefix="shop")
    held = backend.acquire(unique_key, ttl=5)
    tokens, owner = redis_client.get("{shop:" + unique_key + "}").split(b"\n", 1)
    assert tokens.decode() == f"{held.token}:{held.fencing_token}"
    assert json.loads(owner)["pid"] == os.getpid()
    assert 0 < redis_client.pttl("{shop:" + unique_key + "}") <= 5000
    # The fencing token is the server's clock in microseconds: nothing else is stored.
    seconds, micros = redis_client.time()
    assert 0 < seconds * 1_000_000 + micros - held.fencing_token < 5_000_000
    assert redis_client.keys("*" + unique_key + "*") == [("{shop:" + unique_key + "}").encode()]
    backend.release(held)
    backend.close()


def test_fencing_tokens_keep_increasing_with_nothing_stored_between_grants(
    redis_url, redis_client, unique_key
):
    backend = connect(redis_url + "/0")
    tokens = []
    for _ in range(200):
        held = backend.acquire(unique_key, ttl=5)
        tokens.append(held.fencing_token)
        backend.release(held)
        assert redis_client.keys("*" + unique_key + "*") == []  # nothing left to lose
    assert tokens == sorted(set(tokens))
    backend.close()


def test_renewing_1000_locks_costs_one_round_trip_per_interval(redis_url, redis_client):
    backend = connect(redis_url + "/0")
    keeper = LeaseKeeper.for_process()
    held = [backend.acquire(f"bulk:{i}", ttl=3) for i in range(1000)]
    calls_before = keeper.renewal_calls
    time.sleep(2.2)  # two renewal intervals (ttl / 3 each)
    calls = keeper.renewal_calls - calls_before
    assert 1 <= calls <= 3
    assert not any(h.lost for h in held)
    for h in held:
        backend.release(h)
    backend.close()


def test_password_protected_server():
    with RedisServer(password="pa55word") as server:
        good = connect(server.url + "/0")
        held = good.acquire("k", ttl=5)
        assert held is not None
        good.release(held)
        bad = connect(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(LockBackendUnavailable) as info:
            bad.acquire("k", ttl=5)
        assert "wrong" not in str(info.value)
        good.close()
        bad.close()


def test_a_crowd_of_waiting_threads_never_starves_the_release(redis_url, redis_client, unique_key):
    # Each blocked waiter holds a connection; 120 of them exceed redis-py's default pool
    # of 100, which must not keep the holder from releasing (nor make waiters fail).
    backend = connect(redis_url + "/0")
    holder = backend.acquire(unique_key, ttl=30)
    outcomes: list[bool] = []

    def wait_then_release():
        got = backend.acquire(unique_key, ttl=30, blocking=True, timeout=60)
        outcomes.append(got is not None)
        if got is not None:
            got.release()

    threads = [threading.Thread(target=wait_then_release) for _ in range(120)]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: redis_client.info("clients")["blocked_clients"] >= 120, 30, "120 waiters blocked in BLPOP"
    )
    assert backend.release(holder) is True
    for thread in threads:
        thread.join(90)
    assert outcomes == [True] * 120
    backend.close()


# -- a server of this module's own: paused, filled and counted ----------------------------


@pytest.fixture(scope="module")
def own_server() -> Iterator[RedisServer]:
    """A redis-server for tests that pause it or count every key in it."""
    with RedisServer() as server:
        yield server


def test_fencing_tokens_never_repeat_when_a_replica_that_missed_writes_is_promoted(unique_key):
    with RedisServer() as master, RedisServer(replica_of=master) as replica:
        primary = redis.Redis.from_url(master.url + "/0")
        standby = redis.Redis.from_url(replica.url + "/0")
        wait_until(
            lambda: standby.info("replication")["master_link_status"] == "up", 10, "the replica to sync"
        )
        old = connect(master.url + "/0")
        tokens = []
        for _ in range(3):
            held = old.acquire(unique_key, ttl=30)
            tokens.append(held.fencing_token)
            old.release(held)
        assert primary.wait(1, 5000) == 1  # the replica has every write so far
        standby.replicaof("NO", "ONE")  # cut off: it misses what follows
        for _ in range(3):
            held = old.acquire(unique_key, ttl=30)
            tokens.append(held.fencing_token)
            old.release(held)
        new = connect(replica.url + "/0")  # the failover: clients now talk to the replica
        after = new.acquire(unique_key, ttl=30)
        assert after is not None
        assert after.fencing_token > max(tokens)
        assert tokens == sorted(set(tokens))
        new.release(after)
        for closing in (old, new, primary, standby):
            closing.close()


def test_fencing_tokens_keep_increasing_across_a_restart_without_persistence(own_server, unique_key):
    before = connect(own_server.url + "/0")
    tokens = []
    for _ in range(3):
        held = before.acquire(unique_key, ttl=30)
        tokens.append(held.fencing_token)
        before.release(held)
    before.close()
    own_server.restart()  # no persistence: the counter is gone
    after = connect(own_server.url + "/0")
    held = after.acquire(unique_key, ttl=30)
    assert held.fencing_token > max(tokens)
    after.release(held)
    after.close()


def test_a_released_key_leaves_nothing_behind(own_server):
    client = redis.Redis.from_url(own_server.url + "/8")  # a database nobody else uses
    client.flushdb()
    backend = connect(own_server.url + "/8")
    for i in range(300):
        backend.release(backend.acquire(f"footprint:{i}", ttl=0.5))
    assert client.dbsize() == 0  # no counter, and no signal list where nobody waited
    backend.close()
    client.close()


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command (script-internal ones included), less the test's own."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    return {name: n for name, n in calls.items() if n and name not in ("info", "config|resetstat")}


def test_an_uncontended_acquire_and_release_is_six_server_commands(own_server, unique_key):
    backend = connect(own_server.url + "/0")
    client = redis.Redis.from_url(own_server.url + "/0")
    backend.release(backend.acquire(unique_key, ttl=5))  # connection made, scripts loaded
    client.config_resetstat()
    for _ in range(10):
        backend.release(backend.acquire(unique_key, ttl=5))
    # one script call each way; no counter, and no announcement when nobody waits
    assert command_calls(client) == {"evalsha": 20, "set": 10, "time": 10, "get": 10, "del": 10}
    backend.close()
    client.close()


def test_a_release_announces_itself_only_to_a_marked_lock(own_server, unique_key):
    client = redis.Redis.from_url(own_server.url + "/0")
    holder, waiter = connect(own_server.url + "/0"), connect(own_server.url + "/0")
    held = holder.acquire(unique_key, ttl=30)
    got: list[object] = []
    thread = threading.Thread(
        target=lambda: got.append(waiter.acquire(unique_key, ttl=30, blocking=True, timeout=20))
    )
    thread.start()
    wait_until(lambda: client.info("clients")["blocked_clients"] >= 1, 5, "the waiter to block")
    assert client.get("{singleton-lock:" + unique_key + "}").endswith(b" ")  # marked: one waits
    client.config_resetstat()
    holder.release(held)
    thread.join(10)
    assert got
    assert got[0] is not None
    calls = command_calls(client)
    assert calls["lpush"] == 1
    assert calls.get("evalsha", 0) <= 2  # the release and the waiter's one attempt
    waiter.release(got[0])
    holder.close()
    waiter.close()
    client.close()


def test_the_releasing_process_lets_a_waiter_have_the_lock(own_server, unique_key):
    # Two backends stand for two processes. The holder releases and at once wants the
    # lock again: the waiter, woken by that release, gets it first.
    client = redis.Redis.from_url(own_server.url + "/0")
    first, second = connect(own_server.url + "/0"), connect(own_server.url + "/0")
    order: list[str] = []
    held = first.acquire(unique_key, ttl=30)

    def waiter() -> None:
        mine = second.acquire(unique_key, ttl=30, blocking=True, timeout=20)
        order.append("waiter")
        second.release(mine)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: client.info("clients")["blocked_clients"] >= 1, 5, "the waiter to block")
    first.release(held)
    held = first.acquire(unique_key, ttl=30, blocking=True, timeout=20)
    order.append("releaser")
    thread.join(10)
    assert order[:2] == ["waiter", "releaser"]
    first.release(held)
    first.close()
    second.close()
    client.close()


def test_an_acquire_applied_after_its_client_gave_up_is_released_at_once(own_server, unique_key):
    backend = connect(own_server.url + "/0", connect_timeout=0.3)
    client = redis.Redis.from_url(own_server.url + "/0")
    lock = "{singleton-lock:" + unique_key + "}"
    backend.release(backend.acquire(unique_key, ttl=30))  # a pooled connection, scripts loaded
    grants_before = command_calls(client).get("time", 0)  # a granting acquire reads TIME
    own_server.pause()
    try:
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(unique_key, ttl=30)
        assert "did not answer within 0.3s" in str(info.value)
    finally:
        own_server.resume()
    resumed = time.monotonic()
    # The server ran the attempt once it resumed (its counter moved on) ...
    wait_until(lambda: command_calls(client).get("time", 0) > grants_before, 5, "the late acquire to run")
    # ... and the lock it took is freed long before its 30 s TTL.
    wait_until(lambda: client.get(lock) is None, 5, "the late acquire's lock to be released")
    assert time.monotonic() - resumed < 5
    other = connect(own_server.url + "/0")
    assert other.acquire(unique_key, ttl=5) is not None
    other.close()
    backend.close()
    client.close()


def assert_an_unbounded_wait_is_woken_by_the_release(
    backend: LockBackend, client: redis.Redis, key: str, timeout: float
) -> None:
    """A wait given a huge or infinite bound, on a holder with a lease of years, still
    blocks on the server (in bounded BLPOPs) until the release, and wakes at once then."""
    held = backend.acquire(key, ttl=3e8)
    assert held is not None
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(backend.acquire(key, ttl=30, blocking=True, timeout=timeout))
        except Exception as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: outcome or client.info("clients")["blocked_clients"] >= 1, 5, "the waiter to block")
    assert outcome == []
    released_at = time.monotonic()
    backend.release(held)
    waiter.join(5)
    assert len(outcome) == 1
    assert isinstance(outcome[0], HeldLock)
    assert time.monotonic() - released_at < 1
    backend.release(outcome[0])


@pytest.mark.parametrize("timeout", [math.inf, 3e8])
def test_a_wait_without_a_finite_bound_is_woken_by_the_release(own_server, unique_key, timeout):
    backend = connect(own_server.url + "/0")
    client = redis.Redis.from_url(own_server.url + "/0")
    assert_an_unbounded_wait_is_woken_by_the_release(backend, client, unique_key, timeout)
    backend.close()
    client.close()


# -- URLs that cannot work --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://:s3cret@127.0.0.1:notaport/0", "bad port"),
        ("redis://:s3cret@127.0.0.1:99999/0", "bad port"),
        ("redis://:s3cret@127.0.0.1:6379/abc", "the database"),
        ("redis://:s3cret@127.0.0.1:6379/-1", "the database"),
        ("redis://:s3cret@127.0.0.1:6379?db=one", "the database"),
        ("unix://:s3cret@/tmp/redis.sock?db=-2", "the database"),
    ],
)
def test_a_bad_port_or_database_in_the_url_is_refused_before_any_connection(url, complaint):
    with pytest.raises(ConfigurationError) as info:
        connect(url)
    assert info.value.option == "singleton_lock_backend"
    assert complaint in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_database_the_server_does_not_have_is_a_configuration_error(own_server):
    backend = connect(own_server.url + "/99")  # the server has 16
    for _ in range(2):  # the first use, and every one after it
        with pytest.raises(ConfigurationError) as info:
            backend.acquire("k", ttl=5)
        assert info.value.option == "singleton_lock_backend"
        assert "no database 99" in str(info.value)
    backend.close()


def test_scripts_the_server_forgot_are_sent_again(own_server, unique_key):
    backend = connect(own_server.url + "/0")
    client = redis.Redis.from_url(own_server.url + "/0")
    held = backend.acquire(unique_key, ttl=5)
    client.script_flush()  # as after a restart, or SCRIPT FLUSH by an operator
    assert backend.release(held) is True
    client.script_flush()
    again = backend.acquire(unique_key, ttl=5)
    assert again is not None
    client.script_flush()
    assert backend.renew([again]) == [True]
    assert backend.release(again) is True
    backend.close()
    client.close()


# -- semaphores: what only Redis's keys and commands can show ---------------------------


def test_slot_records_share_the_locks_hash_tag_and_hold_the_limit(redis_url, redis_client, unique_key):
    backend = connect(redis_url + "/0", prefix="shop")
    held = [backend.acquire(unique_key, ttl=5, limit=3, owner=Owner.here(f"t{i}")) for i in range(3)]
    lock = "{shop:" + unique_key + "}"
    # One cluster slot for the whole semaphore: slot 0 is the lock's own record.
    assert sorted(redis_client.keys("*" + unique_key + "*")) == sorted(
        k.encode() for k in (lock, lock + SLOT_MARK + "1", lock + SLOT_MARK + "2")
    )
    for h in held:
        record = lock if h.slot == 0 else lock + SLOT_MARK + str(h.slot)
        tokens = redis_client.get(record).split(b"\n", 1)[0].decode()
        assert tokens == f"{h.token}:{h.fencing_token}:3"  # `celery locks list`: "slot 2 of 3"
    assert {(i.slot, i.limit) for i in backend.lock_info(unique_key)} == {(0, 3), (1, 3), (2, 3)}
    for h in held:
        assert h.release() is True
    assert redis_client.keys("*" + unique_key + "*") == []  # no counter: nothing stored
    backend.close()


def test_an_uncontended_slot_is_one_script_call_each_way(own_server, unique_key):
    backend = connect(own_server.url + "/0")
    client = redis.Redis.from_url(own_server.url + "/0")
    backend.release(backend.acquire(unique_key, ttl=5, limit=4))  # scripts loaded
    client.config_resetstat()
    for _ in range(10):
        backend.release(backend.acquire(unique_key, ttl=5, limit=4))
    calls = command_calls(client)
    assert calls["evalsha"] == 20  # one round trip to acquire, one to release
    assert calls["set"] == 10
    assert calls["del"] == 10
    assert "lpush" not in calls  # nobody waited: nothing announced
    backend.close()
    client.close()


def test_a_released_semaphore_leaves_only_short_lived_signals_behind(own_server):
    client = redis.Redis.from_url(own_server.url + "/9")  # a database nobody else uses
    client.flushdb()
    backend = connect(own_server.url + "/9")
    for i in range(100):
        backend.release(backend.acquire(f"footprint:{i}", ttl=0.5, limit=3))
    assert client.dbsize() == 0
    # With waiters: a signal list is left, and it lives SIGNAL_LIFETIME_MS at most.
    held = [backend.acquire("crowded", ttl=30, limit=2) for _ in range(2)]
    waiter = connect(own_server.url + "/9")
    got: list[object] = []
    thread = threading.Thread(
        target=lambda: got.append(waiter.acquire("crowded", ttl=30, limit=2, blocking=True, timeout=20))
    )
    thread.start()
    wait_until(lambda: client.info("clients")["blocked_clients"] >= 1, 5, "the waiter to block")
    for h in held:
        backend.release(h)
    thread.join(10)
    assert got[0] is not None
    waiter.release(got[0])
    assert 0 < client.pttl("{singleton-lock:crowded}:signal") <= SIGNAL_LIFETIME_MS
    wait_until(lambda: client.dbsize() == 0, SIGNAL_LIFETIME_MS / 1000 + 3, "the signal list to expire")
    backend.close()
    waiter.close()
    client.close()


def test_a_slot_grant_counts_above_every_held_slot_even_one_ahead_of_the_clock(
    redis_url, redis_client, unique_key
):
    # As after a failover onto a server whose clock is behind the old one's: a held slot
    # carries a token ahead of this clock. The next grant of any slot is above it.
    backend = connect(redis_url + "/0")
    seconds, micros = redis_client.time()
    ahead = (seconds + 3600) * 1_000_000 + micros
    record = backend.slot_key(backend._full_key(unique_key), 2)
    redis_client.set(record, f"old:{ahead}:3\n" + Owner.here("elsewhere").as_json(), px=5000)
    held = backend.acquire(unique_key, ttl=5, limit=3)
    assert held.slot == 0
    assert held.fencing_token == ahead + 1
    again = backend.acquire(unique_key, ttl=5, limit=3)
    assert again.fencing_token == ahead + 2
    assert held.release() is True
    assert again.release() is True
    redis_client.delete(record)
    backend.close()
