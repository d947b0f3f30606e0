"""(j) PostgreSQL: our lease table beside a raw upsert loop and advisory locks, one server.

Started here: one PostgreSQL server of the scenario's own
(:class:`~celery_singleton_lock.testing.PostgresServer`) with the server's default
durability (fsync on, every commit waits for the WAL flush), and ``pg_stat_statements``
loaded to count statements. Three measurements, the libraries interleaved, medians:

1. uncontended acquire+release cycles per second in one process, beside two floors on one
   connection in autocommit: a *raw* ``INSERT ... ON CONFLICT DO NOTHING`` and ``DELETE``
   loop (a lease row without an owner, an expiry or a fencing token: the least a table lock
   can do, two commits per cycle), and ``pg_try_advisory_lock`` / ``pg_advisory_unlock``
   (no write at all: a session lock, which PgBouncer's transaction mode breaks);
   statements per cycle from ``pg_stat_statements``;
2. 8 spawned processes contending for one key (ours: woken by ``NOTIFY``; advisory: a
   blocking ``pg_advisory_lock``, the server's own lock queue): handoff latency from the
   holder's release call to another process's acquire returning, acquisitions per
   process, statements per acquisition;
3. 4 waiters blocked on a held key for 2 s: statements the server ran meanwhile.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import threading
import time
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    Table,
    fmt,
    interleaved,
    median,
    percentile,
    sleep_until_ns,
)

TTL = 30
HOLD_S = 0.001
LIBS = ["raw", "advisory", "ours"]
CONTENDERS = ["ours", "advisory"]
LABELS = {
    "raw": "raw INSERT ON CONFLICT + DELETE (floor)",
    "advisory": "pg_try_advisory_lock / unlock (session lock)",
    "ours": "celery-singleton-lock",
}
TABLE = "bench_locks"


# -- the three clients ---------------------------------------------------------------------


class Raw:
    """A row taken if absent and deleted: a table lock with nothing else to it."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_raw (key text PRIMARY KEY)")

    def cycle(self, key: str) -> None:
        taken = self.conn.execute(
            "INSERT INTO bench_raw (key) VALUES (%s) ON CONFLICT DO NOTHING", (key,)
        ).rowcount
        if taken != 1:
            raise RuntimeError("raw insert found a free key taken")
        self.conn.execute("DELETE FROM bench_raw WHERE key = %s", (key,))

    def close(self) -> None:
        self.conn.close()


def _advisory_key(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


class Advisory:
    """Session-level advisory locks on one connection (what PgBouncer's transaction mode breaks)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def cycle(self, key: str) -> None:
        k = _advisory_key(key)
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (k,)).fetchone()
        if not (row and row[0]):
            raise RuntimeError("advisory lock of a free key refused")
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (k,))

    def blocking(self, key: str, timeout: float) -> Any:
        self.conn.execute("SELECT pg_advisory_lock(%s)", (_advisory_key(key),))
        return key

    def release(self, handle: Any) -> bool:
        row = self.conn.execute("SELECT pg_advisory_unlock(%s)", (_advisory_key(handle),)).fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        self.conn.close()


class Ours:
    def __init__(self, url: str) -> None:
        from celery_singleton_lock import connect

        self.backend = connect(url, table=TABLE)

    def cycle(self, key: str) -> None:
        held = self.backend.acquire(key, ttl=TTL)
        if held is None or not self.backend.release(held):
            raise RuntimeError("uncontended cycle failed")

    def blocking(self, key: str, timeout: float) -> Any:
        return self.backend.acquire(key, ttl=TTL, blocking=True, timeout=timeout)

    def release(self, handle: Any) -> bool:
        return self.backend.release(handle)

    def close(self) -> None:
        self.backend.close()


def _client(lib: str, url: str) -> Any:
    return {"raw": Raw, "advisory": Advisory, "ours": Ours}[lib](url)


def _statements(url: str) -> int:
    """Statements the server has run (pg_stat_statements), this reading left out."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
            "WHERE query NOT LIKE '%pg_stat_statements%'"
        ).fetchone()
        return int(row[0]) if row else 0


# -- contention, inside spawned processes --------------------------------------------------


def contend(lib: str, url: str, key: str, start_ns: int, end_ns: int) -> list[tuple[int, int]]:
    client = _client(lib, url)
    client.release(client.blocking(f"{key}:warm:{os.getpid()}", 5))  # connect before the start
    events: list[tuple[int, int]] = []
    sleep_until_ns(start_ns)
    while time.monotonic_ns() < end_ns:
        handle = client.blocking(key, 5)
        if handle is None:
            continue
        t_acq = time.monotonic_ns()
        time.sleep(HOLD_S)
        t_rel = time.monotonic_ns()
        client.release(handle)
        events.append((t_acq, t_rel))
    client.close()
    return events


def analyse(per_process: list[list[tuple[int, int]]], start_ns: int, end_ns: int) -> dict[str, Any]:
    events = sorted((a, r, w) for w, evs in enumerate(per_process) for a, r in evs)
    inside = [e for e in events if start_ns <= e[0] <= end_ns]
    handoffs = [(n[0] - p[1]) / 1e6 for p, n in itertools.pairwise(inside) if n[2] != p[2]]
    overlaps = sum(1 for p, n in itertools.pairwise(events) if n[0] < p[1])
    per_worker = [sum(1 for e in inside if e[2] == w) for w in range(len(per_process))]
    return {
        "acquisitions": len(inside), "p50": percentile(handoffs, 50), "p99": percentile(handoffs, 99),
        "per_worker": per_worker, "overlaps": overlaps,
    }


# -- the scenario --------------------------------------------------------------------------


def run(env: Env, reps: int = 5, cycles: int = 500, seconds: float = 3.0) -> ScenarioResult:
    from celery_singleton_lock.testing import PostgresServer

    res = ScenarioResult("j", "(j) PostgreSQL: one server, beside raw upserts, advisory locks")
    reps, cycles = env.reps(reps), (150 if env.quick else cycles)
    seconds = 1.0 if env.quick else seconds
    settings = {"shared_preload_libraries": "pg_stat_statements"}
    with PostgresServer(settings=settings, fsync=True) as server:
        server.execute("CREATE EXTENSION pg_stat_statements")
        url = server.url
        res.raw["server"] = str(server.execute("SHOW server_version")[0][0])
        _uncontended(res, url, reps, cycles)
        _contended(res, url, env.reps(3), seconds)
        _idle(res, url)
    return res


def _uncontended(res: ScenarioResult, url: str, reps: int, cycles: int) -> None:
    clients = {lib: _client(lib, url) for lib in LIBS}
    for lib, client in clients.items():  # warm-up: connections, the table, prepared statements
        for _ in range(50):
            client.cycle(f"bench:j:{lib}")
    rate: dict[str, list[float]] = {lib: [] for lib in LIBS}
    statements: dict[str, list[float]] = {lib: [] for lib in LIBS}
    for _, lib in interleaved(LIBS, reps):
        before = _statements(url)
        t0 = time.perf_counter()
        for _ in range(cycles):
            clients[lib].cycle(f"bench:j:{lib}")
        rate[lib].append(cycles / (time.perf_counter() - t0))
        statements[lib].append((_statements(url) - before) / cycles)
    for client in clients.values():
        client.close()
    floor = median(rate["raw"])
    table = Table("(j1) PostgreSQL uncontended acquire+release, one process",
                  ["library", "cycles/s", "x raw", "statements per cycle"])
    for lib in LIBS:
        table.add(LABELS[lib], fmt(median(rate[lib]), 0), fmt(median(rate[lib]) / floor, 2),
                  fmt(median(statements[lib]), 2))
    table.notes += [
        f"{cycles} cycles per run, {reps} repetitions, libraries interleaved; one server with "
        "fsync and synchronous_commit on (the defaults). Statements: pg_stat_statements calls.",
        "raw and ours commit twice per cycle (each waits for the WAL flush); advisory locks "
        "write nothing, which is why they cannot survive a restart or a pooler.",
    ]
    res.tables.append(table)
    ratio = median(rate["ours"]) / floor
    res.goals += [
        Goal("j", "PostgreSQL uncontended ≥ 0.8 x raw upsert+delete", f"{ratio:.2f} x raw", ratio >= 0.8),
        Goal("j", "PostgreSQL statements per uncontended cycle = 2", fmt(median(statements["ours"]), 2),
             median(statements["ours"]) <= 2.05),
    ]
    res.raw["uncontended"] = {"rate": rate, "statements": statements}


def _contended(res: ScenarioResult, url: str, reps: int, seconds: float) -> None:
    context = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in CONTENDERS}
    with context.Pool(8) as pool:
        # A first, unmeasured round: each process imports and connects every client.
        warm_start = time.monotonic_ns() + 3_000_000_000
        for lib in CONTENDERS:
            pool.starmap(contend, [(lib, url, f"bench:j2:warm:{lib}", warm_start, warm_start)] * 8)
        for rep, lib in interleaved(CONTENDERS, reps):
            key = f"bench:j2:{lib}:{rep}"
            start = time.monotonic_ns() + 1_500_000_000  # spawned clients connect first
            end = start + int(seconds * 1e9)
            before = _statements(url)
            per_process = pool.starmap(contend, [(lib, url, key, start, end)] * 8)
            result = analyse(per_process, start, end)
            result["statements_per_acquisition"] = (
                (_statements(url) - before) / max(1, sum(len(p) for p in per_process))
            )
            runs[lib].append(result)
    table = Table("(j2) PostgreSQL: 8 processes contending for one key",
                  ["library", "handoff p50 ms", "p99 ms", "acq/s", "per process min/max",
                   "statements per acquisition", "overlaps"])
    for lib in CONTENDERS:
        rs = runs[lib]
        table.add(
            LABELS[lib], fmt(median([r["p50"] for r in rs]), 2), fmt(median([r["p99"] for r in rs]), 2),
            fmt(median([r["acquisitions"] / seconds for r in rs]), 0),
            f"{fmt(median([min(r['per_worker']) for r in rs]), 0)}/"
            f"{fmt(median([max(r['per_worker']) for r in rs]), 0)}",
            fmt(median([r["statements_per_acquisition"] for r in rs]), 1),
            str(sum(r["overlaps"] for r in rs)),
        )
    table.notes += [
        f"8 spawned processes, {seconds:.0f} s per library per repetition, {reps} repetitions, "
        f"interleaved; hold {HOLD_S * 1000:.0f} ms; ttl {TTL} s.",
        "handoff: from the holder's release call to another process's acquire returning.",
        "ours: waiters queue in the table's _wait table; a release that saw waiters wakes the "
        "oldest by a second statement (NOTIFY with its ticket), so one waiter tries per release. "
        "advisory: the server queues blocked sessions itself and grants the next.",
    ]
    res.tables.append(table)
    ours = runs["ours"]
    p50 = median([r["p50"] for r in ours])
    overlaps = sum(r["overlaps"] for r in ours)
    res.goals += [
        Goal("j", "PostgreSQL handoff p50 ≤ 2 ms (NOTIFY)", f"{p50:.2f} ms", p50 <= 2.0),
        Goal("j", "PostgreSQL mutual exclusion (overlaps = 0)", str(overlaps), overlaps == 0),
    ]
    res.raw["contended"] = runs


def _wait_and_release(client: Any, key: str) -> None:
    handle = client.blocking(key, 10)
    if handle is not None:
        client.release(handle)


def _idle(res: ScenarioResult, url: str) -> None:
    table = Table("(j3) PostgreSQL: 4 waiters blocked on a held key for 2 s", ["library", "statements/s"])
    measured = {}
    for lib in CONTENDERS:
        holder, waiters = _client(lib, url), [_client(lib, url) for _ in range(4)]
        key = f"bench:j3:{lib}"
        held = holder.blocking(key, 5)
        threads = [threading.Thread(target=_wait_and_release, args=(w, key)) for w in waiters]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # let every waiter reach its wait
        before = _statements(url)
        time.sleep(2.0)
        measured[lib] = (_statements(url) - before) / 2.0
        holder.release(held)
        for thread in threads:
            thread.join(10)
        for client in [holder, *waiters]:
            client.close()
        table.add(LABELS[lib], fmt(measured[lib], 1))
    table.notes.append(
        f"statements the server ran (pg_stat_statements) while nothing changed (ttl {TTL} s: no "
        "renewal falls in the window). ours: the waiters' one listening connection is idle in "
        "LISTEN; advisory: each waiter is one statement blocked in pg_advisory_lock (counted when "
        "it ends)."
    )
    res.tables.append(table)
    idle = measured["ours"]
    res.goals.append(Goal("j", "PostgreSQL idle waiters 0 statements", f"{idle:.1f}/s", idle == 0))
