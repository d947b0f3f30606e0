"""(g) Redlock on 3 local masters: us against pottery's Redlock, our single Redis for scale.

Three redis-servers of this scenario's own are the masters; the suite's server is the
single-Redis reference. Three measurements, the libraries interleaved in each:

- uncontended acquire+release cycles per second, one process, one key;
- 4 worker processes waiting on a held key: commands per second on the servers (all
  masters summed), nothing else talking to them;
- 8 processes contending for one key: cross-process handoff latency (the analysis of
  scenario (b)).
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import redis

from benchmarks import scenario_handoff
from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    ServerStats,
    Table,
    WorkerContext,
    WorkerError,
    fmt,
    interleaved,
    median,
    rotate,
    spread,
)
from benchmarks.libs import LABELS, WAIT_STYLE, Unavailable, make_adapter

LIBS = ["ours", "ours-redlock", "pottery-redlock"]
#: Cycles per slice of the uncontended run; pottery (a thread pool per call) gets fewer.
CYCLES = {"ours": 500, "ours-redlock": 500, "pottery-redlock": 100}
CHUNKS = 4
TTL = 30.0
WAITERS = 4
SETTLE_S = 0.5
FN = "benchmarks.scenario_redlock"


class Servers:
    """Where each library's locks live, and the counters of those servers."""

    def __init__(self, env: Env, masters: list[Any]) -> None:
        self.url = {
            "ours": env.url,
            "ours-redlock": "redlock://" + ",".join(f"127.0.0.1:{m.port}" for m in masters) + "/0",
        }
        self.url["pottery-redlock"] = self.url["ours-redlock"]
        self.master_clients = [redis.Redis.from_url(m.url + "/0") for m in masters]
        self.single = env.client

    def clients(self, lib: str) -> list[redis.Redis]:
        return [self.single] if lib == "ours" else self.master_clients

    def reset(self) -> None:
        for client in [self.single, *self.master_clients]:
            client.flushall()
            client.config_resetstat()

    def snapshot(self, lib: str) -> list[Any]:
        return [ServerStats(c).snapshot() for c in self.clients(lib)]

    @staticmethod
    def commands(before: list[Any], after: list[Any]) -> int:
        return sum(ServerStats.delta(a, b)[0] for a, b in zip(before, after, strict=True))

    def close(self) -> None:
        for client in self.master_clients:
            client.close()


# -- run inside the worker processes ------------------------------------------------------


def bind(ctx: WorkerContext, urls: dict[str, str]) -> dict[str, str]:
    """Give this worker the adapters of ``urls`` ({lib: url}), so the functions of
    scenarios (b) and (c) find them by name; {lib: why it cannot run}."""
    problems: dict[str, str] = {}
    for lib, url in urls.items():
        try:
            ctx._adapters[lib] = make_adapter(lib, url)
            handle = ctx._adapters[lib].try_acquire(f"bench:g:warm:{ctx.index}", 5.0)
            ctx._adapters[lib].release(handle)
        except Exception as exc:  # reported in the table, the other libraries still run
            problems[lib] = repr(exc)
    return problems


# -- the three measurements ---------------------------------------------------------------


def _cycles(adapter: Any, key: str, n: int) -> None:
    for _ in range(n):
        handle = adapter.try_acquire(key, TTL)
        if handle is None:
            raise RuntimeError(f"uncontended acquire of {key!r} failed")
        adapter.release(handle)


def uncontended(env: Env, servers: Servers, adapters: dict[str, Any], reps: int) -> dict[str, Any]:
    rate: dict[str, list[float]] = {lib: [] for lib in adapters}
    for lib, ad in adapters.items():
        _cycles(ad, f"bench:g:a:{lib}", 100)  # warm-up: connections, scripts
    for rep in range(reps):
        elapsed = dict.fromkeys(adapters, 0.0)
        done = dict.fromkeys(adapters, 0)
        for chunk in range(CHUNKS):
            for lib in rotate(list(adapters), rep + chunk):
                count = CYCLES[lib] // (4 if env.quick else 1)
                gc.collect()
                t0 = time.perf_counter()
                _cycles(adapters[lib], f"bench:g:a:{lib}", count)
                elapsed[lib] += time.perf_counter() - t0
                done[lib] += count
        for lib in adapters:
            rate[lib].append(done[lib] / elapsed[lib])
    ratio = [r / o for r, o in zip(rate.get("ours-redlock", []), rate.get("ours", []), strict=False)]
    return {"rate": rate, "redlock_over_single": ratio}


def waiting(
    env: Env, servers: Servers, adapters: dict[str, Any], reps: int, window: float
) -> dict[str, list[float]]:
    pool = env.pool
    cmds: dict[str, list[float]] = {lib: [] for lib in adapters}
    for _, lib in interleaved(list(adapters), reps):
        servers.reset()
        key = f"bench:g:c:{lib}"
        held = adapters[lib].try_acquire(key, TTL)
        for i in range(WAITERS):
            pool.submit(i, "benchmarks.scenario_waiters:wait_once", lib=lib, key=key, ttl=TTL,
                        timeout=20.0)
        time.sleep(SETTLE_S)
        before = servers.snapshot(lib)
        t0 = time.monotonic()
        time.sleep(window)
        after = servers.snapshot(lib)
        cmds[lib].append(servers.commands(before, after) / (time.monotonic() - t0))
        adapters[lib].release(held)
        for i in range(WAITERS):
            pool.result(i, 30)
    return cmds


def handoff(env: Env, servers: Servers, libs: list[str], reps: int, seconds: float) -> dict[str, Any]:
    pool = env.pool
    workers = list(range(min(8, len(pool))))
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for _, lib in interleaved(libs, reps):
        servers.reset()
        start = time.monotonic_ns() + 300_000_000
        end = start + int(seconds * 1e9)
        before = servers.snapshot(lib)
        results = pool.run_all(
            workers, "benchmarks.scenario_handoff:contend", timeout=seconds + 60,
            lib=lib, key=f"bench:g:b:{lib}", start_ns=start, end_ns=end,
        )
        commands = servers.commands(before, servers.snapshot(lib))
        analysis = scenario_handoff.analyse(results, start, end)
        analysis["cmds_per_acq"] = commands / max(1, sum(len(r["events"]) for r in results))
        runs[lib].append(analysis)
    return runs


def run(env: Env, reps: int = 3) -> ScenarioResult:
    from celery_singleton_lock.testing import RedisServer

    res = ScenarioResult("g", "(g) Redlock on 3 local masters")
    reps = env.reps(reps)
    masters = [RedisServer() for _ in range(3)]
    for master in masters:
        master.start()
    servers = Servers(env, masters)
    errors: dict[str, str] = {}
    try:
        adapters: dict[str, Any] = {}
        for lib in LIBS:
            try:
                adapters[lib] = make_adapter(lib, servers.url[lib])
            except Unavailable as exc:
                errors[lib] = str(exc)
        replies = env.pool.run_all(list(range(len(env.pool))), f"{FN}:bind", timeout=120,
                                   urls={lib: servers.url[lib] for lib in adapters})
        for reply in replies:
            for lib, why in reply.items():
                errors.setdefault(lib, why)
        libs = [lib for lib in LIBS if lib in adapters and lib not in errors]
        adapters = {lib: adapters[lib] for lib in libs}
        try:
            fast = uncontended(env, servers, adapters, reps)
            idle = waiting(env, servers, adapters, min(reps, 2), 1.0 if env.quick else 2.0)
            handoffs = handoff(env, servers, libs, min(reps, 2), 1.0 if env.quick else 2.0)
        except (WorkerError, RuntimeError) as exc:
            res.error = f"{exc!r}"
            return res
        for ad in adapters.values():
            ad.close()
    finally:
        servers.close()
        for master in masters:
            master.stop()

    table = Table(
        res.title,
        ["library", "cycles/s (median)", "min-max", "x single Redis", "4 idle waiters: cmds/s",
         "handoff p50 ms", "p99 ms", "acq/s (8 procs)", "server cmds/acq (8 procs)", "overlaps",
         "wait"],
    )
    for lib in LIBS:
        if lib not in adapters:
            table.add(LABELS[lib], "not run", "", "", "", "", "", "", "", "", errors.get(lib, "")[:60])
            continue
        ratio = [r / o for r, o in zip(fast["rate"][lib], fast["rate"]["ours"], strict=True)]
        hs = handoffs[lib]
        table.add(
            LABELS[lib] if lib != "ours" else "celery-singleton-lock (1 Redis, reference)",
            fmt(median(fast["rate"][lib]), 0), spread(fast["rate"][lib]), fmt(median(ratio)),
            fmt(median(idle[lib]), 1), fmt(median([h["p50"] for h in hs]), 3),
            fmt(median([h["p99"] for h in hs]), 3), fmt(median([h["per_s"] for h in hs]), 0),
            fmt(median([h["cmds_per_acq"] for h in hs]), 1), str(sum(h["overlaps"] for h in hs)),
            WAIT_STYLE[lib],
        )
    table.notes += [
        "3 redis-servers started by this scenario are the masters (same machine, loopback); "
        "the reference is our single-Redis backend on the suite's server.",
        f"cycles/s: one process, {CHUNKS} slices of {CYCLES['ours']} cycles per library per "
        f"repetition ({CYCLES['pottery-redlock']} for pottery), libraries taking turns, {reps} "
        "repetitions; x single Redis: ratio within each repetition, then the median.",
        f"idle waiters: {WAITERS} processes blocked on a key held with ttl {TTL:.0f} s, "
        "total_commands_processed over every server the library uses, per second.",
        "handoff: 8 processes looping acquire (blocking), hold 1 ms, release, as in (b); "
        "overlaps must be 0. server cmds/acq: total_commands_processed over every server the "
        "library uses (script-internal commands included) / acquisitions.",
    ]
    for lib, err in errors.items():
        table.notes.append(f"{LABELS[lib]}: {err[:200]}")
    res.tables.append(table)

    if "ours-redlock" in adapters:
        ratio = median(fast["redlock_over_single"])
        cps = median(idle["ours-redlock"]) / WAITERS
        p99 = median([h["p99"] for h in handoffs["ours-redlock"]])
        overlaps = sum(h["overlaps"] for h in handoffs["ours-redlock"])
        single = handoffs.get("ours", [])
        single_cmds = median([h["cmds_per_acq"] for h in single]) if single else math.nan
        redlock_cmds = median([h["cmds_per_acq"] for h in handoffs["ours-redlock"]])
        res.goals += [
            Goal("g", "Redlock uncontended cycles/s ≥ 0.8 x single Redis", f"{ratio:.2f} x",
                 ratio >= 0.8),
            Goal("g", "Redlock server cmds per contended acquisition ≤ 3 x single Redis",
                 f"{redlock_cmds:.1f} vs {single_cmds:.1f} ({redlock_cmds / single_cmds:.2f} x)",
                 None if math.isnan(single_cmds) else redlock_cmds <= 3 * single_cmds),
            Goal("g", "Redlock idle waiter ≤ 1 server cmd/s each", f"{cps:.2f} cmds/s", cps <= 1.0),
            Goal("g", "Redlock handoff p99 ≤ 10 ms", f"{p99:.3f} ms", p99 <= 10.0),
            Goal("g", "Redlock mutual exclusion (overlaps = 0)", str(overlaps), overlaps == 0),
        ]
    else:
        res.goals.append(Goal("g", "Redlock ≥ 0.8 x single Redis", errors.get("ours-redlock", "")[:80],
                              None))
    res.raw = {
        "reps": reps, "errors": errors, "uncontended": fast, "idle_cmds_per_s": idle,
        "handoff": {lib: [{k: v for k, v in r.items() if k != "handoffs_ms"} for r in rs]
                    for lib, rs in handoffs.items()},
    }
    return res
