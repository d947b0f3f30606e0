"""The PostgreSQL backend against a real server: the contract, then what only a lease
table promises (fencing across row deletion and restarts, the table made on first use,
PgBouncer mode) and its faults (a restart while held, a terminated connection, a
statement stuck on a lock)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from celery_singleton_lock import (
    ConfigurationError,
    LockBackendUnavailable,
    LockKeyError,
    connect,
)
from celery_singleton_lock.backends.owner import Owner
from celery_singleton_lock.backends.postgres import PostgresBackend
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.testing import PostgresServer
from tests.conftest import wait_until
from tests.contract import BackendSpec, CrossProcessContract, ServerOperations
from tests.contract_processes import lease_started_at


def _sql(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def schema(postgres_url) -> Iterator[str]:
    """A schema of this test's own, dropped with everything in it at the end."""
    name = f"csl_{uuid.uuid4().hex[:12]}"
    _sql(postgres_url, f"CREATE SCHEMA {name}")
    yield name
    _sql(postgres_url, f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of this module's own: to restart, and to count statements on (no other
    client of the machine's server can add to the count). Its commits are asynchronous
    unless a session asks otherwise, as ours do: a crash then forgets no grant."""
    settings = {"shared_preload_libraries": "pg_stat_statements", "synchronous_commit": "off"}
    with PostgresServer(settings=settings) as server:
        server.execute("CREATE EXTENSION pg_stat_statements")
        yield server


def _statements(server: PostgresServer) -> int:
    # The counting statement names the view, so it is not counted itself.
    rows = server.execute(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
        "WHERE query NOT LIKE '%pg_stat_statements%'"
    )
    return int(rows[0][0])


class TestPostgresContract(CrossProcessContract):
    # A lease ends on the server's clock; the waiter tries again at that moment.
    expiry_lateness = 0.3

    @pytest.fixture
    def backend_spec(self, postgres_url, schema):
        return BackendSpec(postgres_url, {"table": f"{schema}.locks"})

    @pytest.fixture
    def server_operations(self, own_server):
        return ServerOperations(count=lambda: _statements(own_server), spec=BackendSpec(own_server.url))

    @pytest.fixture(autouse=True)
    def _url(self, postgres_url):
        self.url = postgres_url

    def expire(self, backend, key):
        _sql(
            self.url,
            f"UPDATE {backend.table} SET expires_at = clock_timestamp() - interval '1 s' WHERE key = %s",
            (backend._full_key(key),),
        )

    def unreachable_url(self, hosts, password):
        return f"postgresql://app:{password}@{hosts[0]}/test"


# -- what a lease table promises -----------------------------------------------------------


@pytest.fixture
def spec(postgres_url, schema) -> BackendSpec:
    return BackendSpec(postgres_url, {"table": f"{schema}.locks"})


@pytest.fixture
def backend(spec) -> Iterator[PostgresBackend]:
    backend = spec.connect()
    yield backend
    backend.close()


def _row(url: str, backend: PostgresBackend, key: str) -> tuple | None:
    statement = f"SELECT token, owner, fence FROM {backend.table} WHERE key = %s"
    rows = _sql(url, statement, (backend._full_key(key),))
    return rows[0] if rows else None


def test_the_table_is_created_on_first_use_and_a_refusal_names_the_holder(
    backend, postgres_url, schema, unique_key
):
    assert _sql(postgres_url, "SELECT to_regclass(%s)::text", (f"{schema}.locks",)) == [(None,)]
    held = backend.acquire(unique_key, ttl=10, owner=Owner.here("task-42"))
    token, owner, fence = _row(postgres_url, backend, unique_key)
    assert token == held.token
    assert owner == Owner.here("task-42").as_json()
    assert fence == held.fencing_token
    refused = backend.attempt(unique_key, ttl=10)
    assert refused.holder_task_id == "task-42"
    assert 9 < refused.holder_ttl <= 10
    assert backend.release(held) is True
    assert _row(postgres_url, backend, unique_key)[:2] == (None, None)  # the row stays, free


def test_fencing_tokens_rise_across_the_rows_deletion(backend, postgres_url, unique_key):
    first = backend.acquire(unique_key, ttl=10)
    backend.release(first)
    _sql(postgres_url, f"DELETE FROM {backend.table}")  # as the clean-up of old free rows does
    second = backend.acquire(unique_key, ttl=10)
    assert second.fencing_token > first.fencing_token
    backend.release(second)


def test_old_free_rows_are_cleaned_up_and_held_ones_are_not(spec, postgres_url, unique_key):
    backend = spec.connect(cleanup_after=0.2)
    try:
        for i in range(3):
            backend.release(backend.acquire(f"{unique_key}:{i}", ttl=10))
        kept = backend.acquire(f"{unique_key}:held", ttl=10)
        time.sleep(0.3)  # the free rows grow older than cleanup_after
        backend._next_cleanup = 0.0  # due now (a release runs it, at most every cleanup_after / 4)
        backend.release(backend.acquire(f"{unique_key}:last", ttl=10))
        keys = {row[0] for row in _sql(postgres_url, f"SELECT key FROM {backend.table}")}
        assert keys == {backend._full_key(f"{unique_key}:held"), backend._full_key(f"{unique_key}:last")}
        assert backend.release(kept) is True
    finally:
        backend.close()


def test_every_lock_of_a_backend_is_renewed_in_one_statement(backend, unique_key, monkeypatch):
    helds = [backend.acquire(f"{unique_key}:{i}", ttl=30) for i in range(50)]
    sent = []
    original = backend._execute

    def counting(query, *args, **kwargs):
        sent.append(query)
        return original(query, *args, **kwargs)

    monkeypatch.setattr(backend, "_execute", counting)
    assert backend.renew(helds) == [True] * 50
    assert sent == [backend._sql["renew"]]
    for held in helds:
        backend.release(held)


def test_a_user_without_create_rights_gets_the_ddl_to_run(postgres_url, schema, unique_key):
    (superuser,) = _sql(postgres_url, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")[0]
    if not superuser:
        pytest.skip("needs a superuser to create a role")
    role = f"csl_{uuid.uuid4().hex[:8]}"
    _sql(postgres_url, f"CREATE ROLE {role} LOGIN")
    _sql(postgres_url, f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    try:
        url = postgres_url.replace("://postgres@", f"://{role}@")
        backend = connect(url, table=f"{schema}.locks")
        with pytest.raises(ConfigurationError) as info:
            backend.acquire(unique_key, ttl=5)
        message = str(info.value)
        assert info.value.option == "singleton_lock_backend"
        assert "permission denied" in message
        assert f'CREATE TABLE IF NOT EXISTS "{schema}"."locks"' in message
        assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.locks" in message
        # The DDL it prints works: run by the owner, it lets this user lock.
        _sql(postgres_url, backend.ddl)
        tables = f"{schema}.locks, {schema}.locks_wait"
        _sql(postgres_url, f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {role}")
        _sql(postgres_url, f"GRANT USAGE ON SEQUENCE {schema}.locks_fence TO {role}")
        held = backend.acquire(unique_key, ttl=5)
        assert held is not None
        assert backend.release(held) is True
        backend.close()
    finally:
        _sql(postgres_url, f"DROP OWNED BY {role}")
        _sql(postgres_url, f"DROP ROLE {role}")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"table": "a.b.c"}, "table must be"),
        ({"table": ""}, "table must be"),
        ({"table": "x" * 60}, "at most 57 bytes"),
        ({"bogus": 1}, 'invalid connection option "bogus"'),
        ({"poll_interval": 0}, "poll_interval"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_bad_options_are_configuration_errors(postgres_url, options, named):
    with pytest.raises(ConfigurationError) as info:
        connect(postgres_url, **options)
    assert named in str(info.value)
    assert info.value.option == "singleton_lock_backend_options"


def test_a_bad_url_is_refused_before_connecting_with_the_password_masked():
    for url in ("postgresql://u:s3cret@h:5432/db?nosuch=1", "postgresql://u:s3cret@h:99999/db"):
        with pytest.raises(ConfigurationError) as info:
            PostgresBackend.check_url(url, option="singleton_lock_backend")
        assert "s3cret" not in str(info.value)
        assert "***" in str(info.value)


def test_a_missing_database_is_a_configuration_error_not_an_outage(postgres_url):
    backend = connect(postgres_url.rpartition("/")[0] + "/csl_no_such_database")
    with pytest.raises(ConfigurationError) as info:
        backend.acquire("k", ttl=5)
    assert 'database "csl_no_such_database" does not exist' in str(info.value)
    backend.close()


def test_a_key_postgres_cannot_store_is_a_key_error(backend):
    with pytest.raises(LockKeyError):
        backend.acquire("nul\x00inside", ttl=5)


def test_pgbouncer_mode_prepares_nothing_and_waits_by_timed_retries(spec, unique_key):
    backend = spec.connect(pgbouncer=True, poll_interval=0.2)
    other = spec.connect()
    try:
        for _ in range(8):  # more than psycopg's prepare threshold (5)
            backend.release(backend.acquire(unique_key, ttl=5))
        conn = backend._pool.take(time.monotonic() + 5)
        try:
            assert conn.prepare_threshold is None
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        finally:
            backend._pool.give(conn)
        held = other.acquire(unique_key, ttl=30)
        threading.Timer(0.3, other.release, (held,)).start()
        start = time.monotonic()
        got = backend.acquire(unique_key, ttl=5, blocking=True, timeout=5)
        assert got is not None
        assert time.monotonic() - start < 0.3 + 0.2 + 0.2  # within one poll_interval of the release
        backend.release(got)
    finally:
        backend.close()
        other.close()


def test_pgbouncer_mode_listens_on_listen_url(spec, postgres_url, unique_key):
    backend = spec.connect(pgbouncer=True, listen_url=postgres_url, poll_interval=30)
    try:
        held = backend.acquire(unique_key, ttl=30)
        released_at = []
        threading.Timer(0.3, lambda: (released_at.append(time.monotonic()), backend.release(held))).start()
        got = backend.acquire(unique_key, ttl=5, blocking=True, timeout=10)
        assert got is not None
        assert time.monotonic() - released_at[0] < 0.2  # woken by NOTIFY, not the 30 s poll
        backend.release(got)
    finally:
        backend.close()


# -- faults --------------------------------------------------------------------------------


def test_a_terminated_connection_is_replaced_renewal_goes_on_and_waiters_are_still_woken(
    spec, postgres_url, unique_key
):
    name = f"csl-terminate-{uuid.uuid4().hex[:8]}"
    backend = spec.connect(application_name=name)
    waiter = spec.connect(application_name=name)
    try:
        held = backend.acquire(unique_key, ttl=1.5)
        got: list = []
        thread = threading.Thread(
            target=lambda: got.append(waiter.acquire(unique_key, ttl=5, blocking=True, timeout=20))
        )
        thread.start()
        wait_until(lambda: _sessions(postgres_url, name, "LISTEN%") >= 1, 5, "the waiter to listen")
        for round_ in range(2):  # every session of both: pooled, renewing and listening
            terminated = _sql(
                postgres_url,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                (name,),
            )
            assert terminated[0][0] >= (2 if round_ == 0 else 1)
            renewed_after = time.monotonic()
            wait_until(
                lambda after=renewed_after: lease_started_at(held) > after, 3, "a renewal on a new connection"
            )
        assert not held.lost
        assert got == []  # still waiting: the lease was kept
        wait_until(lambda: _sessions(postgres_url, name, "LISTEN%") >= 1, 5, "the waiter to listen again")
        released_at = time.monotonic()
        assert backend.release(held) is True
        thread.join(10)
        assert got
        assert got[0] is not None
        assert time.monotonic() - released_at < 1.0  # woken by the release, not its 1.5 s lease
        waiter.release(got[0])
    finally:
        backend.close()
        waiter.close()


def _sessions(url: str, application: str, query_like: str) -> int:
    return _sql(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND query LIKE %s",
        (application, query_like),
    )[0][0]


def test_a_lost_acquire_still_waiting_on_the_server_is_released_once_it_applies(
    backend, postgres_url, unique_key
):
    # The row is locked, not the table: the late release's UPDATE finds no row with its
    # token and answers "nothing" at once, while the acquire it follows still waits on
    # the server and applies later. That answer must not end the late release.
    backend.release(backend.acquire(unique_key, ttl=5))  # the row exists, free
    blocker = psycopg.connect(postgres_url)
    short = connect(postgres_url, table=backend.table, connect_timeout=0.5)
    try:
        blocker.execute(
            f"SELECT 1 FROM {backend.table} WHERE key = %s FOR UPDATE", (backend._full_key(unique_key),)
        )
        releases: list[tuple[str, ...]] = []
        release = short._release
        short._release = lambda *args: releases.append(args) or release(*args)
        with pytest.raises(LockBackendUnavailable):
            short.acquire(unique_key, ttl=30)
        wait_until(lambda: len(releases) >= 2, 5, "two late releases that found nothing")
        assert short.late_releases.pending()  # the acquire's session still runs it
        blocker.commit()  # the acquire now takes the row on the server
        wait_until(lambda: not short.late_releases.pending(), 5, "the late release")
        assert backend.acquire(unique_key, ttl=5) is not None  # free at once, not in 30 s
    finally:
        short.close()  # also when it failed: a connection left open fails a later test
        blocker.close()


def test_an_acquire_stuck_behind_a_table_lock_fails_in_time_and_leaves_nothing(
    backend, postgres_url, unique_key
):
    backend.release(backend.acquire(unique_key, ttl=5))  # the table exists
    blocker = psycopg.connect(postgres_url)
    short = connect(postgres_url, table=backend.table, connect_timeout=0.5)
    try:
        blocker.execute(f"LOCK TABLE {backend.table} IN ACCESS EXCLUSIVE MODE")
        start = time.monotonic()
        with pytest.raises(LockBackendUnavailable):
            short.acquire(unique_key, ttl=30)
        assert time.monotonic() - start < 1.0
        assert short.late_releases.pending()
        blocker.rollback()  # the stuck statement now runs on the server, and takes the row
        wait_until(lambda: not short.late_releases.pending(), 5, "the late release")
        assert backend.acquire(unique_key, ttl=5) is not None  # free at once, not in 30 s
    finally:
        short.close()  # also when it failed: a connection left open fails a later test
        blocker.close()


@pytest.fixture
def own_spec(own_server) -> Iterator[BackendSpec]:
    name = f"csl_{uuid.uuid4().hex[:12]}"
    own_server.execute(f"CREATE SCHEMA {name}")
    yield BackendSpec(own_server.url, {"table": f"{name}.locks", "connect_timeout": 1})
    if own_server.process is None:
        own_server.start()
    own_server.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.mark.parametrize("crash", [False, True], ids=["fast shutdown", "crash"])
def test_a_lock_held_across_a_server_restart_survives_it(own_server, own_spec, unique_key, crash):
    holder, other = own_spec.connect(), own_spec.connect()
    try:
        held = holder.acquire(unique_key, ttl=3)
        own_server.restart(crash=crash)
        restarted_at = time.monotonic()
        wait_until(lambda: lease_started_at(held) > restarted_at, 3, "a renewal after the restart")
        assert not held.lost
        assert other.acquire(unique_key, ttl=3) is None  # the row, and the lease, survived
        assert holder.release(held) is True
        after = other.acquire(unique_key, ttl=3)
        assert after.fencing_token > held.fencing_token  # the sequence survived too
        other.release(after)
    finally:
        holder.close()
        other.close()


def test_a_lock_whose_server_is_down_past_its_ttl_is_lost_before_anyone_else_holds_it(
    own_server, own_spec, unique_key
):
    holder, other = own_spec.connect(), own_spec.connect()
    try:
        held = holder.acquire(unique_key, ttl=1.5)
        own_server.halt()
        wait_until(lambda: held.lost, 3, "the holder to declare its lock lost")
        own_server.start()
        successor = other.acquire(unique_key, ttl=5, blocking=True, timeout=5)
        assert successor is not None
        assert successor.fencing_token > held.fencing_token
        assert held.lost  # never two holders: it knew before the successor got it
        assert holder.release(held) is False
        other.release(successor)
    finally:
        holder.close()
        other.close()
        LeaseKeeper.for_process().untrack(held)


# -- semaphores ----------------------------------------------------------------------------


def test_a_slot_attempt_sent_again_with_its_token_takes_its_slot_again_not_a_second(backend, unique_key):
    # A reply lost after the statement applied: _execute sends it again, with the token.
    full_key = backend._full_key(unique_key)
    owner = Owner.here("task-z")
    lower = backend.acquire(unique_key, ttl=10, limit=3)
    first = backend._try_acquire_slot(full_key, "again", 10, owner, 3)
    assert lower.slot == 0
    assert first.slot == 1
    assert lower.release() is True  # slot 0 is free now, and lower
    again = backend._try_acquire_slot(full_key, "again", 10, owner, 3)
    assert again.slot == 1
    assert again.fencing_token > first.fencing_token
    assert [(info.slot, info.owner.task_id) for info in backend.lock_info(unique_key)] == [(1, "task-z")]
    assert backend._release(backend.slot_key(full_key, 1), "token", again.token) is True


def test_a_full_semaphore_refuses_with_its_soonest_expiry(backend, unique_key):
    held = [backend.acquire(unique_key, ttl=ttl, limit=2) for ttl in (30, 5)]
    try:
        refused = backend.attempt(unique_key, ttl=10, limit=2)
        assert 4 < refused.holder_ttl <= 5  # the waiter's bound: the first slot to end
    finally:
        for each in held:
            each.release()


# -- one waiter woken per release ------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2])
def test_a_release_wakes_one_waiter_the_oldest_and_skips_entries_of_sessions_gone(
    spec, postgres_url, unique_key, limit
):
    holder = spec.connect()
    waiters = [spec.connect() for _ in range(5)]
    attempts = [0]
    guard = threading.Lock()

    def counting(attempt):
        def counted(*args):
            with guard:
                attempts[0] += 1
            return attempt(*args)

        return counted

    for waiter in waiters:
        for name in ("_try_acquire", "_try_acquire_slot"):
            setattr(waiter, name, counting(getattr(waiter, name)))
    full_key = holder._full_key(unique_key)
    queue = f"{holder.table}_wait"

    def queued() -> int:
        rows = _sql(postgres_url, f"SELECT count(*) FROM {queue} WHERE key = %s AND NOT woken", (full_key,))
        return rows[0][0]

    order: list[int] = []
    done = [threading.Event() for _ in waiters]

    def wait(index: int) -> None:
        got = waiters[index].acquire(unique_key, ttl=30, blocking=True, timeout=30, limit=limit)
        assert got is not None
        order.append(index)
        done[index].wait(30)
        waiters[index].release(got)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(waiters))]
    try:
        held = [holder.acquire(unique_key, ttl=30, limit=limit) for _ in range(limit)]
        assert None not in held
        # The oldest entry is a waiter that died: its session does not exist.
        _sql(
            postgres_url,
            f"INSERT INTO {queue} (key, ticket, pid, expires_at) "
            "VALUES (%s, 0, 2147483647, now() + interval '1 h')",
            (full_key,),
        )
        for index, thread in enumerate(threads):  # one at a time: the queue's order is known
            thread.start()
            wait_until(lambda n=index + 2: queued() == n, 10, f"waiter {index} to queue")
        for round_ in range(len(waiters)):
            before = attempts[0]
            if round_ == 0:
                assert holder.release(held[0]) is True
            else:
                done[order[-1]].set()
            wait_until(lambda n=round_ + 1: len(order) == n, 10, f"release {round_} to wake a waiter")
            # No other waiter tries: each release woke one (a quiet moment to let a herd show).
            threading.Event().wait(0.3)
            assert attempts[0] - before == 1, (round_, attempts[0] - before)
        assert order == list(range(len(waiters)))  # FIFO
        done[order[-1]].set()
        for thread in threads:
            thread.join(10)
        assert queued() == 1  # the dead waiter's entry; each live one left the queue
        for each in held[1:]:
            assert holder.release(each) is True
    finally:
        for event in done:
            event.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(10)
        for backend in (holder, *waiters):
            backend.close()
