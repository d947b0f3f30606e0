"""The Redlock backend against real redis-server masters: the contract on 3 and 5 of them,
then what happens when masters die, hang or come back empty."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from celery_singleton_lock import ConfigurationError, LockBackendUnavailable, connect
from celery_singleton_lock.backends.base import MAX_LIMIT, Refused
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.backends.redlock import RedlockBackend, node_urls
from celery_singleton_lock.config import read_settings
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.testing import RedisServer, redis_servers
from tests.conftest import wait_until
from tests.contract import (
    BackendContract,
    BackendSpec,
    CrossProcessContract,
    ServerOperations,
    clean_context,
)
from tests.contract_processes import count_under_lock
from tests.integration.test_redis_backend import (
    assert_an_unbounded_wait_is_woken_by_the_release,
    commands_served,
)

#: Short per-master timeout: a hung master costs this much per call.
NODE_TIMEOUT = 0.2


def redlock_url(servers: list[RedisServer], db: int = 0) -> str:
    return "redlock://" + ",".join(f"127.0.0.1:{s.port}" for s in servers) + f"/{db}"


def lock_key(backend: RedlockBackend, key: str) -> str:
    return "{" + backend._full_key(key) + "}"


@pytest.fixture(scope="module")
def shared_masters() -> Iterator[list[RedisServer]]:
    """Five masters for the whole module, for tests that leave them running."""
    with redis_servers(5) as servers:
        yield servers


@pytest.fixture
def masters() -> Iterator[list[RedisServer]]:
    """Three masters of this test's own: the test kills, pauses or restarts them."""
    with redis_servers(3, password="s3cret") as servers:
        yield servers


@pytest.fixture
def redlock(masters: list[RedisServer]) -> Iterator[RedlockBackend]:
    backend = connect([s.url + "/0" for s in masters], node_timeout=NODE_TIMEOUT)
    assert isinstance(backend, RedlockBackend)
    yield backend
    backend.close()


class _Redlock:
    """The contract's fixtures on ``size`` of the module's masters."""

    size = 3

    @pytest.fixture
    def backend_spec(self, shared_masters):
        return BackendSpec(redlock_url(shared_masters[: self.size]))

    @pytest.fixture
    def backend(self, backend_spec):
        backend = backend_spec.connect()
        yield backend
        backend.close()

    @pytest.fixture
    def second_backend(self, backend_spec):
        backend = backend_spec.connect()
        yield backend
        backend.close()

    def expire(self, backend, key):
        for node in backend.nodes:
            node._client.delete(lock_key(backend, key))


class TestRedlockContractOn3Masters(_Redlock, CrossProcessContract):
    unreachable_hosts = 3

    @pytest.fixture
    def server_operations(self, shared_masters):
        clients = [redis.Redis.from_url(s.url + "/0") for s in shared_masters[: self.size]]
        yield ServerOperations(count=lambda: sum(commands_served(c) for c in clients))
        for client in clients:
            client.close()

    def unreachable_url(self, hosts, password):
        return f"redlock://:{password}@{','.join(hosts)}/0"

    def check_unreachable(self, kind, error, elapsed):
        if kind == "refused":
            assert elapsed < 0.2  # refused at once: no node_timeout spent
            assert str(error).count("refused the connection") == 3
            assert "did not answer" not in str(error)
        else:
            assert str(error).count("did not answer") == 3
            # The three connects went out together: one node_timeout (0.25 s), not three.
            assert elapsed < 0.5, elapsed


class TestRedlockContractOn5Masters(_Redlock, BackendContract):
    size = 5


# -- URLs and settings ------------------------------------------------------------------


def test_redlock_url_names_every_master_with_shared_credentials_and_db():
    assert node_urls("redlock://u:pw@h1:6379,h2,[::1]:7000/2?socket_keepalive=true") == [
        "redis://u:pw@h1:6379/2?socket_keepalive=true",
        "redis://u:pw@h2/2?socket_keepalive=true",
        "redis://u:pw@[::1]:7000/2?socket_keepalive=true",
    ]


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("redlock://h1:6379,h2:6379/0", "at least 3"),
        (["redis://h1", "redis://h2"], "at least 3"),
        ("redlock://h1,h2,h1/0", "twice"),
        (["redis://h1", "redis://h2:6379/0", "redis://h2/1"], "twice"),
        (["redis://h1", "redis://h2", "http://h3"], "redis://, rediss:// or unix://"),
        ("redlock://h1,,h3/0", "empty host"),
        ([1, 2, 3], "a redlock:// URL or a list of Redis URLs"),
        ("redlock://:s3cret@h1:6379,h2:notaport,h3/0", "port"),
        ("redlock://:s3cret@h1,h2,h3/abc", "database"),
        (["redis://h1/0", "redis://h2/-1", "redis://h3/0"], "database"),
    ],
)
def test_bad_redlock_settings_name_the_setting(value, complaint):
    conf = Celery("redlock-config", broker="memory://", set_as_current=False).conf
    conf.singleton_lock_backend = value
    with pytest.raises(ConfigurationError) as info:
        read_settings(conf)
    assert info.value.option == "singleton_lock_backend"
    assert complaint in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("redlock://:s3cret@h1:6379,h2:notaport,h3/0", "bad port"),
        ("redlock://:s3cret@h1,h2,h3/abc", "the database"),
        (["redis://h1/0", "redis://:s3cret@h2/-1", "redis://h3/0"], "the database"),
    ],
)
def test_a_bad_port_or_database_of_a_master_is_refused_before_any_connection(value, complaint):
    with pytest.raises(ConfigurationError) as info:
        connect(value)
    assert info.value.option == "singleton_lock_backend"
    assert complaint in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_list_of_redis_urls_as_the_setting_means_redlock(shared_masters):
    conf = Celery("redlock-config", broker="memory://", set_as_current=False).conf
    conf.singleton_lock_backend = [s.url + "/0" for s in shared_masters[:3]]
    settings = read_settings(conf)
    backend = settings.backend()
    assert isinstance(backend, RedlockBackend)
    assert backend.quorum == 2
    held = backend.acquire("from-settings", ttl=5)
    assert held is not None
    assert backend.release(held) is True


def test_passwords_are_masked_in_the_backend_url():
    backend = connect("redlock://:pw1@127.0.0.1:1,127.0.0.1:2,127.0.0.1:3/0")
    assert "pw1" not in backend.url
    listed = connect([f"redis://:pw{i}@127.0.0.1:{i}/0" for i in range(1, 4)])
    assert "pw" not in listed.url.replace("***", "")
    backend.close()
    listed.close()


# -- the quorum on healthy masters ------------------------------------------------------


def test_the_lock_and_its_fencing_counter_are_on_every_master(redlock, masters, unique_key):
    held = redlock.acquire(unique_key, ttl=5)
    for server in masters:
        client = redis.Redis.from_url(server.url + "/0")
        value = client.get(lock_key(redlock, unique_key))
        assert value is not None
        token, _, fence = value.split(b"\n", 1)[0].decode().partition(":")
        assert token == held.token
        assert int(fence) <= held.fencing_token // MAX_LIMIT  # this master's count, then raised
        # The token is the quorum's count, times MAX_LIMIT, plus the slot (0 for a lock).
        assert int(client.get(lock_key(redlock, unique_key) + ":fence")) * MAX_LIMIT == held.fencing_token
        client.close()
    assert redlock.release(held) is True


def test_a_master_counting_ahead_sets_the_token_and_the_others_catch_up(redlock, masters, unique_key):
    first = redlock.acquire(unique_key, ttl=5)
    redlock.release(first)
    ahead = redis.Redis.from_url(masters[2].url + "/0")
    ahead.incrby(lock_key(redlock, unique_key) + ":fence", 1_000_000)  # as if its clock ran ahead
    second = redlock.acquire(unique_key, ttl=5)
    assert second.fencing_token == first.fencing_token + 1_000_001 * MAX_LIMIT
    redlock.release(second)
    masters[2].stop()  # the master that counted highest is gone ...
    third = redlock.acquire(unique_key, ttl=5)
    assert third.fencing_token > second.fencing_token  # ... and tokens still go up
    redlock.release(third)
    ahead.close()


def test_split_votes_hold_nobody_and_are_undone(redlock, masters, unique_key):
    # Two other clients each hold the lock on one master: nobody has a quorum.
    clients = [redis.Redis.from_url(s.url + "/0") for s in masters]
    clients[0].set(lock_key(redlock, unique_key), "other-1\n{}", px=5000)
    clients[1].set(lock_key(redlock, unique_key), "other-2\n{}", px=5000)
    result = redlock.attempt(unique_key, ttl=5)
    assert isinstance(result, Refused)
    assert result.holder_ttl <= redlock.retry_delay  # re-check soon, jittered
    assert clients[2].get(lock_key(redlock, unique_key)) is None  # our one grant was undone
    for client in clients:
        client.close()


# -- masters failing --------------------------------------------------------------------


def test_one_master_killed_acquire_renew_and_release_still_work(redlock, masters, unique_key):
    keeper = LeaseKeeper.for_process()
    held = redlock.acquire(unique_key, ttl=0.6)
    masters[0].stop()
    calls = keeper.renewal_calls
    wait_until(lambda: keeper.renewal_calls >= calls + 3, 5, "three renewals with one master dead")
    assert not held.lost
    other = connect([s.url + "/0" for s in masters], node_timeout=NODE_TIMEOUT)
    assert other.acquire(unique_key, ttl=1) is None
    assert redlock.release(held) is True
    again = other.acquire(unique_key, ttl=5)
    assert again is not None
    assert other.release(again) is True
    other.close()


def test_two_masters_killed_fail_closed_within_the_bound_then_recover(redlock, masters, unique_key):
    masters[0].stop()
    masters[1].stop()
    start = time.monotonic()
    with pytest.raises(LockBackendUnavailable) as info:
        redlock.acquire(unique_key, ttl=5)
    assert time.monotonic() - start < 3 * NODE_TIMEOUT + 1.0
    message = str(info.value)
    assert f":{masters[0].port}" in message
    assert f":{masters[1].port}" in message
    assert f":{masters[2].port}" not in message.split("unreachable:")[1]
    assert "s3cret" not in message
    survivor = redis.Redis.from_url(masters[2].url + "/0")
    assert survivor.get(lock_key(redlock, unique_key)) is None  # its grant was undone
    with pytest.raises(LockBackendUnavailable):
        redlock.acquire(unique_key, ttl=5, blocking=True, timeout=2)
    masters[0].restart()
    masters[1].restart()
    held = redlock.acquire(unique_key, ttl=5)
    assert held is not None
    assert redlock.release(held) is True
    survivor.close()


def test_a_held_lock_is_lost_not_kept_when_two_masters_die(redlock, masters, unique_key):
    held = redlock.acquire(unique_key, ttl=1.0)
    masters[1].stop()
    masters[2].stop()
    wait_until(lambda: held.lost, 3, "the lease to be declared lost (no quorum to renew it)")
    with pytest.raises(LockBackendUnavailable):
        redlock.release(held)


def test_a_master_restarted_empty_does_not_let_a_second_client_in(redlock, masters, unique_key):
    held = redlock.acquire(unique_key, ttl=30)
    masters[0].restart()  # no persistence: it forgot the lock (and its scripts)
    second = connect([s.url + "/0" for s in masters], node_timeout=NODE_TIMEOUT)
    assert second.acquire(unique_key, ttl=30) is None  # the other two still hold it
    restarted = redis.Redis.from_url(masters[0].url + "/0")
    assert restarted.get(lock_key(redlock, unique_key)) is None  # its one grant was undone
    assert redlock.renew([held]) == [True]  # a quorum still confirms it
    assert redlock.release(held) is True
    after = second.acquire(unique_key, ttl=30)
    assert after is not None
    assert after.fencing_token > held.fencing_token
    second.release(after)
    second.close()
    restarted.close()


def test_a_hung_master_costs_at_most_the_node_timeout_per_call(redlock, masters, unique_key):
    redlock.release(redlock.acquire(unique_key, ttl=5))  # connections to every master open
    masters[1].pause()
    try:
        slowest = 0.0
        for _ in range(3):
            start = time.monotonic()
            held = redlock.acquire(unique_key, ttl=5)
            assert held is not None
            assert redlock.release(held) is True
            slowest = max(slowest, (time.monotonic() - start) / 2)
        assert slowest < NODE_TIMEOUT + 0.5
    finally:
        masters[1].resume()
    held = redlock.acquire(unique_key, ttl=5)  # and the resumed master is used again
    assert held is not None
    redlock.release(held)


def test_eight_processes_times_25_increments_with_a_master_killed_midway(masters, unique_key, tmp_path):
    spec = BackendSpec([s.url + "/0" for s in masters], {"node_timeout": NODE_TIMEOUT})
    counter = tmp_path / "counter"
    counter.write_text("0 0")
    context = clean_context()
    start = context.Barrier(9)
    processes = [
        context.Process(target=count_under_lock, args=(spec, unique_key, str(counter), 25, start))
        for _ in range(8)
    ]
    try:
        for process in processes:
            process.start()
        start.wait(60)
        wait_until(lambda: int((counter.read_text().split() or ["0"])[0]) >= 60, 60, "a third of the work")
        masters[2].stop()
        for process in processes:
            process.join(90)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    assert counter.read_text().split()[0] == "200"


def test_waiters_are_woken_by_a_release_with_one_master_dead(redlock, masters, unique_key):
    held = redlock.acquire(unique_key, ttl=30)
    masters[2].stop()
    got: list[object] = []
    waiter = threading.Thread(
        target=lambda: got.append(redlock.acquire(unique_key, ttl=30, blocking=True, timeout=10))
    )
    waiter.start()
    clients = [redis.Redis.from_url(m.url + "/0") for m in masters[:2]]
    wait_until(
        lambda: sum(c.info("clients")["blocked_clients"] for c in clients) >= 1, 5, "the waiter to block"
    )
    for client in clients:
        client.close()
    released_at = time.monotonic()
    redlock.release(held)
    waiter.join(10)
    assert got[0] is not None
    assert time.monotonic() - released_at < 2  # woken by the release, not by the 30 s TTL
    redlock.release(got[0])


def test_waiters_are_woken_by_a_release_when_the_keys_herald_is_dead(redlock, masters, unique_key):
    # Waiters mark the lock and block on one master of the key: here that very master is
    # down, so they must move to the next one, and the release must announce itself there.
    key = next(
        f"{unique_key}:{n}" for n in range(1000)
        if redlock._heralds(redlock._full_key(f"{unique_key}:{n}"))[0] == 2
    )
    held = redlock.acquire(key, ttl=30)
    masters[2].stop()
    got: list[object] = []
    waiter = threading.Thread(
        target=lambda: got.append(redlock.acquire(key, ttl=30, blocking=True, timeout=10))
    )
    waiter.start()
    clients = [redis.Redis.from_url(m.url + "/0") for m in masters[:2]]
    wait_until(
        lambda: sum(c.info("clients")["blocked_clients"] for c in clients) >= 1, 5, "the waiter to block"
    )
    for client in clients:
        client.close()
    released_at = time.monotonic()
    redlock.release(held)
    waiter.join(10)
    assert got[0] is not None
    assert time.monotonic() - released_at < 2  # woken by the release, not by the 30 s TTL
    redlock.release(got[0])


# -- unknown outcomes, refusals, unbounded waits, counters that expire ------------------


def test_an_acquire_the_hung_masters_apply_after_the_client_gave_up_is_released_there(
    redlock, masters, unique_key
):
    clients = [redis.Redis.from_url(s.url + "/0") for s in masters]
    lock = lock_key(redlock, unique_key)
    redlock.release(redlock.acquire(unique_key, ttl=30))  # connections open, scripts loaded
    fences = [int(c.get(lock + ":fence")) for c in clients]
    masters[0].pause()
    masters[1].pause()
    try:
        with pytest.raises(LockBackendUnavailable):
            redlock.acquire(unique_key, ttl=30)
    finally:
        masters[0].resume()
        masters[1].resume()
    resumed = time.monotonic()
    for i in (0, 1):  # the hung masters ran the attempt once they resumed ...
        wait_until(lambda i=i: int(clients[i].get(lock + ":fence")) > fences[i], 5, "the late acquire")
    # ... and the lock it took there is freed long before its 30 s TTL.
    wait_until(lambda: all(c.get(lock) is None for c in clients), 5, "the late grants to be released")
    assert time.monotonic() - resumed < 5
    held = redlock.acquire(unique_key, ttl=5)
    assert held is not None
    redlock.release(held)
    for client in clients:
        client.close()


@pytest.mark.parametrize("timeout", [math.inf, 3e8])
def test_a_wait_without_a_finite_bound_is_woken_by_the_release(shared_masters, unique_key, timeout):
    backend = connect(redlock_url(shared_masters[:3]))
    herald = backend._heralds(backend._full_key(unique_key))[0]  # where its waiters block
    client = redis.Redis.from_url(shared_masters[herald].url + "/0")
    assert_an_unbounded_wait_is_woken_by_the_release(backend, client, unique_key, timeout)
    client.close()
    backend.close()


def test_counters_expire_after_the_ttl_and_tokens_still_go_up(shared_masters, unique_key):
    backend = connect(redlock_url(shared_masters[:3]))
    clients = [redis.Redis.from_url(s.url + "/0") for s in shared_masters[:3]]
    fence = lock_key(backend, unique_key) + ":fence"
    first = backend.acquire(unique_key, ttl=0.5)
    backend.release(first)
    wait_until(lambda: not any(c.exists(fence) for c in clients), 3, "the counters to expire")
    second = backend.acquire(unique_key, ttl=5)
    assert second.fencing_token > first.fencing_token  # reseeded from the masters' clocks
    assert [int(c.get(fence)) * MAX_LIMIT for c in clients] == [second.fencing_token] * 3  # in step again
    backend.release(second)
    for client in clients:
        client.close()
    backend.close()


def test_a_database_the_masters_do_not_have_is_a_configuration_error(shared_masters):
    backend = connect(redlock_url(shared_masters[:3], db=99))  # they have 16
    with pytest.raises(ConfigurationError) as info:
        backend.acquire("k", ttl=5)
    assert info.value.option == "singleton_lock_backend"
    assert "no database 99" in str(info.value)
    backend.close()


# -- semaphores: the same slot on a quorum ------------------------------------------------


def test_a_slot_is_held_on_the_slot_most_masters_granted_and_the_other_grant_is_released(
    shared_masters, unique_key
):
    backend = connect(redlock_url(shared_masters[:3]))
    clients = [redis.Redis.from_url(s.url + "/0") for s in shared_masters[:3]]
    lock = lock_key(backend, unique_key)
    # Master 0 alone has slot 0 taken (it saw another contender first): it grants us slot
    # 1, the other two slot 0.
    clients[0].set(lock, "other:1:3\n" + Owner.here("elsewhere").as_json(), px=10_000)
    held = backend.acquire(unique_key, ttl=10, limit=3)
    assert held is not None
    assert held.slot == 0
    assert held.fencing_token % MAX_LIMIT == 0  # count * MAX_LIMIT + slot 0
    slot_1 = backend.slot_key(backend._full_key(unique_key), 1)
    assert not clients[0].exists(slot_1)  # the stray grant of slot 1 was released at once
    assert [c.get(lock).split(b":", 1)[0] for c in clients[1:]] == [held.token.encode()] * 2
    assert backend.renew([held]) == [True]  # a quorum (2 of 3) renews it
    assert backend.release(held) is True
    clients[0].delete(lock)
    for client in clients:
        client.close()
    backend.close()

