"""(t) Semaphores on every backend that grants slots: scenario (s)'s two measurements.

For each backend, on servers of this scenario's own (the launchers of
``celery_singleton_lock.testing``, on free loopback ports; ``redis://`` is the suite's
server), one after the other, each stopped before the next starts:

1. one process, no contention: acquire+release cycles of the exclusive lock
   (``limit=1``) and of a ``limit=4`` semaphore, in interleaved slices (the first
   rotating), repeated; ``x lock`` is limit=4 cycles/s over limit=1 cycles/s within a
   repetition, then the median;
2. 16 spawned processes contend for one key (blocking acquire, hold with ``time.sleep``,
   release), ``limit=4`` against ``limit=1`` with the same hold, interleaved, repeated:
   acquisitions/s, handoff (scenario (s)'s definition) and the most holders at once.

On ZooKeeper kazoo's own ``Semaphore`` recipe (its ``Lock`` for ``limit=1``) takes its
turns beside ours, as a peer. The loops, the handoff and holder analysis are scenario
(s)'s (:mod:`benchmarks.scenario_semaphore`); only the servers and the adapters differ.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks import scenario_semaphore as sem
from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    Table,
    WorkerError,
    WorkerPool,
    fmt,
    median,
    rotate,
    spread,
)
from benchmarks.libs import LABELS, make_adapter

LIMIT = 4
LIMITS = (1, LIMIT)
#: One hold for every backend, the longer of (s)'s two: a ZooKeeper, etcd or PostgreSQL
#: handoff takes a millisecond or more, which a 1 ms hold would drown in.
HOLD = 0.005
SECONDS = 2.0
UNCONTENDED_REPS = 5
#: The 16-process part: 3 repetitions on every backend (the least that gives a median of
#: per-repetition ratios), so the whole scenario stays near 5 minutes on 2 cores.
CONTENDED_REPS = 3
#: Part 1's slices per kind and repetition: many short ones, as in (s), so a burst of
#: machine noise hits the lock and the semaphore alike.
CHUNKS = 16
#: Wall-clock seconds a slice aims at; its cycle count comes from the warm-up's pace on
#: that backend (a Redis cycle takes ~0.1-0.2 ms here, a ZooKeeper one ~1.3 ms).
SLICE_S = 0.025
GOAL_UNCONTENDED = 0.9
GOAL_SPEEDUP = 3.5
GOAL_P99_MS = 2.0


@dataclass(frozen=True)
class Backend:
    name: str
    #: A short name for the adapters bound in the pool workers.
    slug: str
    #: Starts the backend's servers on the stack (stopped when it closes): the URL.
    start: Callable[[contextlib.ExitStack[Any], Env], str]
    #: The issue sets the handoff p99 goal on Redis: the Redis-served backends.
    redis: bool
    peers: tuple[str, ...] = ()


def _redis(stack: contextlib.ExitStack[Any], env: Env) -> str:
    return env.url


def _sentinel(stack: contextlib.ExitStack[Any], env: Env) -> str:
    from celery_singleton_lock.testing import RedisSentinel

    return stack.enter_context(RedisSentinel()).url


def _cluster(stack: contextlib.ExitStack[Any], env: Env) -> str:
    from celery_singleton_lock.testing import RedisCluster

    return stack.enter_context(RedisCluster()).url


def _redlock(stack: contextlib.ExitStack[Any], env: Env) -> str:
    from celery_singleton_lock.testing import redis_servers

    masters = stack.enter_context(redis_servers(3))
    return "redlock://" + ",".join(f"127.0.0.1:{m.port}" for m in masters) + "/0"


def _etcd(stack: contextlib.ExitStack[Any], env: Env) -> str:
    from celery_singleton_lock.testing import EtcdCluster

    return stack.enter_context(EtcdCluster(size=1)).url


def _zookeeper(stack: contextlib.ExitStack[Any], env: Env) -> str:
    from celery_singleton_lock.testing import ZooKeeperEnsemble

    return stack.enter_context(ZooKeeperEnsemble(size=1)).url


def _postgres(stack: contextlib.ExitStack[Any], env: Env) -> str:
    from celery_singleton_lock.testing import PostgresServer

    return stack.enter_context(PostgresServer()).url


def _file(stack: contextlib.ExitStack[Any], env: Env) -> str:
    return "file://" + stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-t-"))


BACKENDS = [
    Backend("redis://", "redis", _redis, redis=True),
    Backend("sentinel://", "sentinel", _sentinel, redis=True),
    Backend("rediscluster://", "cluster", _cluster, redis=True),
    Backend("redlock:// (3 masters)", "redlock", _redlock, redis=True),
    Backend("etcd://", "etcd", _etcd, redis=False),
    Backend("zookeeper://", "zookeeper", _zookeeper, redis=False, peers=("kazoo-semaphore",)),
    Backend("postgresql://", "postgres", _postgres, redis=False),
    Backend("file://", "file", _file, redis=False),
]
SETUP = {
    "redis://": "the suite's redis-server",
    "sentinel://": "a master, one replica, three Sentinels (testing.RedisSentinel)",
    "rediscluster://": "three masters (testing.RedisCluster)",
    "redlock:// (3 masters)": "three redis-servers (testing.redis_servers)",
    "etcd://": "one member, fsync off (testing.EtcdCluster)",
    "zookeeper://": "one server, forceSync=no (testing.ZooKeeperEnsemble)",
    "postgresql://": "one server, fsync off (testing.PostgresServer)",
    "file://": "a temporary directory",
}


def _label(lib: str) -> str:
    return "celery-singleton-lock" if lib == "ours" else LABELS[lib]


# -- part 1: one process ------------------------------------------------------------------


def _uncontended(url: str, libs: list[str], reps: int) -> dict[str, Any]:
    """Per (lib, limit): cycles/s and CPU µs/cycle per repetition, and the ratios."""
    kinds = [(lib, limit) for lib in libs for limit in LIMITS]
    adapters = {lib: make_adapter(lib, url) for lib in libs}
    keys = {kind: f"bench:t:{kind[0]}:{kind[1]}" for kind in kinds}
    rate: dict[tuple[str, int], list[float]] = {kind: [] for kind in kinds}
    cpu: dict[tuple[str, int], list[float]] = {kind: [] for kind in kinds}
    try:
        warm_rate = []
        for lib, limit in kinds:  # warm-up: connections, scripts, nodes; and the pace
            sem.cycles(adapters[lib], keys[lib, limit], limit, 20)
            wall, _ = sem.cycles(adapters[lib], keys[lib, limit], limit, 30)
            warm_rate.append(30 / wall)
        per_slice = max(20, min(500, int(SLICE_S * min(warm_rate))))
        for rep in range(reps):
            elapsed = dict.fromkeys(kinds, 0.0)
            used = dict.fromkeys(kinds, 0.0)
            for chunk in range(CHUNKS):
                for lib, limit in rotate(kinds, rep + chunk):
                    wall, cpu_s = sem.cycles(adapters[lib], keys[lib, limit], limit, per_slice)
                    elapsed[lib, limit] += wall
                    used[lib, limit] += cpu_s
            for kind in kinds:
                rate[kind].append(per_slice * CHUNKS / elapsed[kind])
                cpu[kind].append(used[kind] / (per_slice * CHUNKS) * 1e6)
    finally:
        for adapter in adapters.values():
            adapter.close()
    x_lock = {kind: [r / b for r, b in zip(rate[kind], rate[kind[0], 1], strict=True)] for kind in kinds}
    x_ours = {kind: [r / b for r, b in zip(rate[kind], rate["ours", 1], strict=True)] for kind in kinds}
    return {"rate": rate, "cpu": cpu, "x_lock": x_lock, "x_ours": x_ours, "per_slice": per_slice}


# -- part 2: 16 processes -----------------------------------------------------------------


def _contended(pool: WorkerPool, names: dict[str, str], reps: int, seconds: float) -> dict[str, Any]:
    """Per (lib, limit): the analysis of each repetition; errors as text."""
    kinds = [(lib, limit) for lib in names for limit in LIMITS]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {kind: [] for kind in kinds}
    errors: list[str] = []
    for rep in range(reps):
        for lib, limit in rotate(kinds, rep):
            key = f"bench:t:contended:{lib}:{limit}"
            try:
                results, start, end = sem.contended_run(pool, key, limit, HOLD, seconds, adapter=names[lib])
            except WorkerError as exc:
                errors.append(f"rep {rep} {lib} limit={limit}: {str(exc)[:300]}")
                continue
            runs[lib, limit].append(sem.analyse(results, limit, start, end))
    speedup = {kind: sem.per_rep_ratios(runs[kind], runs[kind[0], 1]) for kind in kinds}
    return {"runs": runs, "speedup": speedup, "errors": errors}


def _one_backend(pool: WorkerPool, env: Env, backend: Backend) -> dict[str, Any]:
    everyone = list(range(len(pool)))
    libs = ["ours", *backend.peers]
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        url = backend.start(stack, env)
        started = time.monotonic() - t0
        names = {lib: f"{lib}@{backend.slug}" for lib in libs}
        try:
            problems: dict[str, str] = {}
            for reply in pool.run_all(everyone, "benchmarks.harness:bind", timeout=180,
                                      adapters={names[lib]: [lib, url] for lib in libs}):
                problems.update(reply)
            if problems:
                raise RuntimeError(f"could not set up {problems}")
            for lib in libs:
                pool.run_all(everyone, f"{sem.FN}:warm", timeout=120, adapter=names[lib])
            part1 = _uncontended(url, libs, env.reps(UNCONTENDED_REPS))
            part2 = _contended(pool, names, env.reps(CONTENDED_REPS), 1.0 if env.quick else SECONDS)
        finally:
            pool.run_all(everyone, "benchmarks.harness:unbind", timeout=60, names=list(names.values()))
    return {"libs": libs, "url": url, "start_s": started, "seconds": time.monotonic() - t0,
            "uncontended": part1, "contended": part2}


# -- tables and goals ---------------------------------------------------------------------


def _summary(done: dict[str, dict[str, Any]], failed: dict[str, str]) -> tuple[Table, list[Goal]]:
    table = Table(
        f"(t) Semaphores on every backend: limit={LIMIT} vs the lock, same run",
        ["backend", "library", f"uncontended x lock (≥ {GOAL_UNCONTENDED})",
         f"16 processes x limit=1 (≥ {GOAL_SPEEDUP})", f"handoff p99 ms, limit={LIMIT}",
         "most holders", "verdicts", "seconds"],
    )
    goals: list[Goal] = []
    for backend in BACKENDS:
        if backend.name in failed:
            table.add(backend.name, "", "", "", "", "", "ERROR: " + failed[backend.name][:120], "")
            goals.append(Goal("t", f"{backend.name}: measured", "error", None))
            continue
        result = done[backend.name]
        for lib in result["libs"]:
            x_lock = median(result["uncontended"]["x_lock"][lib, LIMIT])
            runs = result["contended"]["runs"]
            speedup = median(result["contended"]["speedup"][lib, LIMIT])
            p99 = median([r["p99"] for r in runs[lib, LIMIT]])
            over = max((r["most_at_once"] - limit for limit in LIMITS for r in runs[lib, limit]),
                       default=0)
            most = max((r["most_at_once"] for r in runs[lib, LIMIT]), default=0)
            verdicts = []
            if lib == "ours":
                checks = [
                    (f"semaphore (limit={LIMIT}) uncontended cycle ≥ {GOAL_UNCONTENDED} x the lock",
                     f"{x_lock:.3f} x", x_lock >= GOAL_UNCONTENDED),
                    (f"16 processes, limit={LIMIT} throughput ≥ {GOAL_SPEEDUP} x limit=1 "
                     f"(hold {HOLD * 1000:.0f} ms)", f"{speedup:.2f} x", speedup >= GOAL_SPEEDUP),
                    (f"limit={LIMIT} handoff p99 ≤ {GOAL_P99_MS:.0f} ms"
                     + ("" if backend.redis else " (a goal on Redis only: shown)"),
                     f"{p99:.3f} ms", p99 <= GOAL_P99_MS if backend.redis else None),
                    ("never more holders than the limit", f"{over:+d} over", over <= 0),
                ]
                for text, measured, passed in checks:
                    goals.append(Goal("t", f"{backend.name}: {text}", measured, passed))
                verdicts = [{True: "PASS", False: "MISS", None: "n/a"}[passed] for *_, passed in checks]
            table.add(
                backend.name, _label(lib), fmt(x_lock, 3), fmt(speedup, 2), fmt(p99, 3),
                f"{most} of {LIMIT}", " / ".join(verdicts) if verdicts else "peer: no goal",
                fmt(result["seconds"], 0) if lib == "ours" else "",
            )
    table.notes += [
        f"verdicts, in the order of the columns: uncontended ≥ {GOAL_UNCONTENDED} x the lock; "
        f"16 processes ≥ {GOAL_SPEEDUP} x limit=1; handoff p99 ≤ {GOAL_P99_MS:.0f} ms (set for "
        "Redis: judged on the Redis-served backends, n/a elsewhere); never more holders than the "
        "limit (limit=1 runs included).",
        "seconds: the backend's whole part, its servers' start and stop included.",
    ]
    return table, goals


def _detail_tables(done: dict[str, dict[str, Any]], reps: tuple[int, int], seconds: float) -> list[Table]:
    t1 = Table(
        "(t1) Uncontended acquire+release, one process",
        ["backend", "library", "limit", "cycles/s (median)", "µs/cycle", "client CPU µs/cycle",
         "min-max", "x lock (same library)", "x our lock"],
    )
    t2 = Table(
        f"(t2) 16 processes contending for one key, hold {HOLD * 1000:.0f} ms",
        ["backend", "library", "limit", "acq/s (median)", "x limit=1", "handoff p50 ms",
         "p99 ms", "most holders at once", "timeouts + lost", "repetitions"],
    )
    for name, result in done.items():
        part1, part2 = result["uncontended"], result["contended"]
        for lib in result["libs"]:
            for limit in LIMITS:
                rate = part1["rate"][lib, limit]
                per_s = median(rate)
                t1.add(name, _label(lib), str(limit), fmt(per_s, 0), fmt(1e6 / per_s, 1),
                       fmt(median(part1["cpu"][lib, limit]), 1), spread(rate),
                       fmt(median(part1["x_lock"][lib, limit]), 3),
                       fmt(median(part1["x_ours"][lib, limit]), 3))
                rs = part2["runs"][lib, limit]
                t2.add(name, _label(lib), str(limit), fmt(median([r["per_s"] for r in rs]), 0),
                       fmt(median(part2["speedup"][lib, limit]), 2),
                       fmt(median([r["p50"] for r in rs]), 3), fmt(median([r["p99"] for r in rs]), 3),
                       str(max((r["most_at_once"] for r in rs), default=0)),
                       str(sum(r["timeouts"] + r["lost"] for r in rs)), str(len(rs)))
        t2.notes += part2["errors"]
    t1.notes += [
        f"{CHUNKS} slices per kind per repetition, taken in turn (the first rotating), "
        f"{reps[0]} repetitions; a slice's cycle count makes it last about {SLICE_S} s on "
        "that backend (from the warm-up's pace), the same for every kind of the backend.",
        "x lock: per repetition, cycles/s of this row over the same library's limit=1; "
        "x our lock: over celery-singleton-lock's limit=1 on the same backend; the median of those.",
        "client CPU µs/cycle: this process's user+system time per cycle.",
    ]
    t2.notes += [
        f"{sem.PROCESSES} spawned processes (2 CPUs), {seconds:.0f} s per run, {reps[1]} "
        "repetitions, the (library, limit) runs interleaved round-robin; blocking acquire, "
        f"hold with time.sleep({HOLD}), release; ttl {sem.TTL:.0f} s.",
        "x limit=1: per repetition, acquisitions/s over those of the same library's limit=1; "
        "then the median.",
        "handoff: the j-th acquisition's start minus the release call that made room for it "
        "(the (j - limit)-th), p50/p99 per run, then the median over repetitions.",
    ]
    return [t1, t2]


def run(env: Env) -> ScenarioResult:
    res = ScenarioResult("t", "(t) Semaphores on every backend: limit=4 vs the lock")
    seconds = 1.0 if env.quick else SECONDS
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    pool = WorkerPool(sem.PROCESSES, env.url)
    try:
        for backend in BACKENDS:
            print(f"   {backend.name} ...", flush=True)
            try:
                done[backend.name] = _one_backend(pool, env, backend)
            except Exception as exc:  # reported in the table; the other backends still run
                failed[backend.name] = repr(exc)
    finally:
        pool.close()
    summary, goals = _summary(done, failed)
    summary.notes += [f"{name}: {SETUP[name]}" for name in SETUP]
    res.tables = [summary, *_detail_tables(done, (env.reps(UNCONTENDED_REPS), env.reps(CONTENDED_REPS)),
                                           seconds)]
    res.goals = goals
    res.raw = {
        name: {
            "libs": result["libs"], "url": result["url"], "seconds": result["seconds"],
            "start_s": result["start_s"],
            "per_slice": result["uncontended"]["per_slice"],
            "uncontended": {f"{lib}:{limit}": {
                "rate": result["uncontended"]["rate"][lib, limit],
                "cpu_us": result["uncontended"]["cpu"][lib, limit],
                "x_lock": result["uncontended"]["x_lock"][lib, limit],
            } for lib in result["libs"] for limit in LIMITS},
            "contended": {f"{lib}:{limit}": {
                "runs": result["contended"]["runs"][lib, limit],
                "x_limit1": result["contended"]["speedup"][lib, limit],
            } for lib in result["libs"] for limit in LIMITS},
            "errors": result["contended"]["errors"],
        }
        for name, result in done.items()
    }
    res.raw["failed"] = failed
    return res
