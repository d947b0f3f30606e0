"""The Redis backend against a real redis-server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time

import pytest
import redis

from celery_singleton_lock import LockBackendUnavailable, connect
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.testing import RedisServer
from tests.conftest import wait_until
from tests.contract import BackendContract


class TestRedisContract(BackendContract):
    @pytest.fixture
    def backend(self, redis_url):
        backend = connect(redis_url + "/0")
        yield backend
        backend.close()

    @pytest.fixture
    def second_backend(self, redis_url):
        backend = connect(redis_url + "/0")
        yield backend
        backend.close()

    def expire(self, backend, key):
        backend._client.delete("{" + backend._full_key(key) + "}")


def test_lock_stores_token_and_owner_with_a_hash_tag(redis_url, redis_client, unique_key):
    backend = connect(redis_url + "/0", prefix="shop")
    held = backend.acquire(unique_key, ttl=5)
    token, owner = redis_client.get("{shop:" + unique_key + "}").split(b"\n", 1)
    assert token.decode() == held.token
    assert json.loads(owner)["pid"] == os.getpid()
    assert 0 < redis_client.pttl("{shop:" + unique_key + "}") <= 5000
    assert int(redis_client.get("{shop:" + unique_key + "}:fence")) == held.fencing_token
    backend.release(held)
    backend.close()


def test_fencing_tokens_keep_increasing_after_the_counter_is_lost(redis_url, redis_client, unique_key):
    backend = connect(redis_url + "/0")
    first = backend.acquire(unique_key, ttl=5)
    backend.release(first)
    redis_client.delete("{singleton-lock:" + unique_key + "}:fence")  # evicted, or a restart
    second = backend.acquire(unique_key, ttl=5)
    assert second.fencing_token > first.fencing_token
    backend.release(second)
    backend.close()


def _count_under_lock(url: str, key: str, rounds: int, start: threading.Event) -> None:
    backend = connect(url)
    client = redis.Redis.from_url(url)
    start.wait(10)
    for _ in range(rounds):
        with backend.lock(key, ttl=10, timeout=60):
            value = int(client.get("counter:" + key) or 0)  # read ...
            client.set("counter:" + key, value + 1)  # ... then write: not atomic by itself
    backend.close()


def test_eight_processes_times_25_increments_end_at_exactly_200(redis_url, redis_client, unique_key):
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    processes = [
        context.Process(target=_count_under_lock, args=(redis_url + "/0", unique_key, 25, start))
        for _ in range(8)
    ]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert int(redis_client.get("counter:" + unique_key)) == 200


def _hold_forever(url: str, key: str, ttl: float, ready) -> None:
    backend = connect(url)
    held = backend.acquire(key, ttl=ttl)
    ready.set()
    while not held.lost:  # renewing in the background until SIGKILL
        time.sleep(0.05)


def test_sigkilled_holder_frees_the_lock_at_ttl_expiry_not_before(redis_url, redis_client, unique_key):
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_forever, args=(redis_url + "/0", unique_key, 2.0, ready))
    holder.start()
    assert ready.wait(20)
    time.sleep(2.5)  # longer than the TTL: it is alive only through renewal
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(5)
    killed_at = time.monotonic()
    expires_at = killed_at + redis_client.pttl("{singleton-lock:" + unique_key + "}") / 1000
    backend = connect(redis_url + "/0")
    got = backend.acquire(unique_key, ttl=5, blocking=True, timeout=10)
    acquired_at = time.monotonic()
    assert got is not None
    assert acquired_at >= expires_at - 0.05  # never before the lease ended
    assert acquired_at - expires_at < 0.5  # and not a poll interval later
    backend.release(got)
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


def test_idle_waiters_cost_the_server_nothing(redis_url, redis_client, unique_key):
    backend = connect(redis_url + "/0")
    holder = backend.acquire(unique_key, ttl=30)
    waiters = [connect(redis_url + "/0") for _ in range(4)]
    acquired: list[bool] = []

    def wait_then_release(waiter):
        got = waiter.acquire(unique_key, ttl=30, blocking=True, timeout=20)
        acquired.append(got is not None)
        if got is not None:
            got.release()

    threads = [threading.Thread(target=wait_then_release, args=(w,)) for w in waiters]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # let them all block
    before = redis_client.info("stats")["total_commands_processed"]
    time.sleep(2.0)
    after = redis_client.info("stats")["total_commands_processed"]
    # The INFO call itself is one command; the blocked waiters add none.
    assert after - before <= 2
    backend.release(holder)
    for thread in threads:
        thread.join(30)
    assert acquired == [True] * 4  # each release woke the next waiter


def test_refused_connection_fails_fast_with_masked_password(caplog):
    port = _closed_port()
    backend = connect(f"redis://app:s3cret@127.0.0.1:{port}/0", connect_timeout=1)
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    with pytest.raises(LockBackendUnavailable) as info:
        backend.acquire("k", ttl=5)
    assert time.monotonic() - start < 1.5
    assert "s3cret" not in str(info.value)
    assert "***" in info.value.url
    assert "s3cret" not in caplog.text


def test_silent_server_fails_within_the_connect_timeout():
    # A socket that accepts connections and never answers: a hung server.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        backend = connect(f"redis://:pw@127.0.0.1:{port}/0", connect_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire("k", ttl=5)
        elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 1.5
    assert "pw@" not in str(info.value)


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


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
