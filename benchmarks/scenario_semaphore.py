"""(s) Semaphores (``limit=N``) on one Redis, beside the exclusive lock, same run.

Part 1, one process, no contention: acquire+release cycles of a ``limit=4`` semaphore
(and ``limit=16``) against the exclusive lock (``limit=1``), in interleaved slices as in
scenario (a); the goal is the ratio semaphore / lock per repetition, then its median.

Part 2, 16 spawned processes contend for one key, each looping: blocking acquire, hold
(``time.sleep``), release; ``limit=4`` against ``limit=1`` with the same hold, the two
interleaved per repetition. Throughput is acquisitions per second. Handoff: the j-th
acquisition (in time, after the first ``limit``) can only start once ``j - limit + 1``
releases were called, so its handoff is its start minus the release call that made room
for it (the (j - limit)-th release): for ``limit=1`` the release-to-next-holder time of
scenario (b). Holders at once are counted from the same stamps: never more than ``limit``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    Table,
    WorkerContext,
    WorkerError,
    WorkerPool,
    fmt,
    median,
    percentile,
    rotate,
    sleep_until_ns,
    spread,
)
from benchmarks.libs import make_adapter

TTL = 10.0
WAIT_TIMEOUT = 10.0
PROCESSES = 16
#: Part 1: what each cycle takes, by name; 1 is the exclusive lock.
UNCONTENDED = {"lock (limit=1)": 1, "semaphore limit=4": 4, "semaphore limit=16": 16}
#: Part 2: holds (seconds) and limits.
HOLDS = (0.001, 0.005)
LIMITS = (1, 4)
#: Part 1's slices per repetition: many short ones, so a burst of machine noise hits
#: the lock and the semaphores alike.
CHUNKS = 16
FN = "benchmarks.scenario_semaphore"


# -- run inside the worker processes ------------------------------------------------------
#
# ``adapter`` names a library adapter (benchmarks/libs.py) that counts slots: one made on
# the pool's own server (``"ours"``), or one bound to another server beforehand
# (harness.bind), so scenario (t) runs the same loop on every backend.


def warm(ctx: WorkerContext, adapter: str = "ours") -> None:
    """Import, connect and load the scripts before anything is timed."""
    slots = ctx.adapter(adapter)
    for limit in LIMITS:
        key = f"bench:s:warm:{limit}:{ctx.index}"
        for _ in range(20):
            slots.release(slots.try_acquire_slot(key, TTL, limit))


def contend(
    ctx: WorkerContext, key: str, limit: int, hold: float, start_ns: int, end_ns: int,
    adapter: str = "ours",
) -> dict[str, Any]:
    slots = ctx.adapter(adapter)
    events: list[tuple[int, int]] = []
    timeouts = lost = 0
    sleep_until_ns(start_ns)
    while time.monotonic_ns() < end_ns:
        held = slots.acquire_slot_blocking(key, TTL, limit, WAIT_TIMEOUT)
        if held is None:
            timeouts += 1
            continue
        t_acq = time.monotonic_ns()
        time.sleep(hold)
        t_rel = time.monotonic_ns()
        if not slots.release(held):
            lost += 1
        events.append((t_acq, t_rel))
    return {"events": events, "timeouts": timeouts, "lost": lost}


# -- in this process --------------------------------------------------------------------


def cycles(slots: Any, key: str, limit: int, n: int) -> tuple[float, float]:
    """``n`` uncontended acquire+release cycles of ``key`` with ``limit`` through the
    adapter ``slots``: (wall-clock seconds, this process's CPU seconds)."""
    gc.collect()
    t0 = time.perf_counter()
    c0 = time.process_time()
    for _ in range(n):
        held = slots.try_acquire_slot(key, TTL, limit)
        if held is None or not slots.release(held):
            raise RuntimeError(f"uncontended cycle of {key!r} with limit={limit} failed")
    return time.perf_counter() - t0, time.process_time() - c0


def contended_run(
    pool: WorkerPool, key: str, limit: int, hold: float, seconds: float, adapter: str = "ours",
) -> tuple[list[dict[str, Any]], int, int]:
    """Every pool worker contends for ``key`` for ``seconds`` (from a common start half a
    second ahead): their :func:`contend` results, the start and the end."""
    start = time.monotonic_ns() + 500_000_000
    end = start + int(seconds * 1e9)
    results = pool.run_all(
        list(range(len(pool))), f"{FN}:contend", timeout=seconds + 60, key=key, limit=limit,
        hold=hold, start_ns=start, end_ns=end, adapter=adapter,
    )
    return results, start, end


def per_rep_ratios(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[float]:
    """acquisitions/s of each repetition of ``runs`` over those of ``base`` in the same
    repetition."""
    return [r["per_s"] / b["per_s"] for r, b in zip(runs, base, strict=False) if b["per_s"]]


# -- analysis -----------------------------------------------------------------------------


def analyse(results: list[dict[str, Any]], limit: int, start_ns: int, end_ns: int) -> dict[str, Any]:
    events = [e for r in results for e in r["events"]]
    acquired = sorted(t_acq for t_acq, _ in events)
    released = sorted(t_rel for _, t_rel in events)
    handoffs = [
        (acquired[j] - released[j - limit]) / 1e6
        for j in range(limit, len(acquired))
        if start_ns <= acquired[j] <= end_ns
    ]
    # The most holders at once: +1 at each start, -1 at each release call.
    most = inside = 0
    for _, step in sorted([(t, 1) for t in acquired] + [(t, -1) for t in released]):
        inside += step
        most = max(most, inside)
    counted = sum(1 for t in acquired if start_ns <= t <= end_ns)
    return {
        "acquisitions": counted,
        "per_s": counted / ((end_ns - start_ns) / 1e9),
        "p50": percentile(handoffs, 50),
        "p99": percentile(handoffs, 99),
        "most_at_once": most,
        "timeouts": sum(r["timeouts"] for r in results),
        "lost": sum(r["lost"] for r in results),
    }


def _uncontended(env: Env, reps: int, n: int) -> tuple[Table, dict[str, list[float]], dict[str, Any]]:
    slots = make_adapter("ours", env.url)
    names = list(UNCONTENDED)
    rate: dict[str, list[float]] = {name: [] for name in names}
    ratio: dict[str, list[float]] = {name: [] for name in names}
    cmds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    try:
        env.reset_server()
        for limit in UNCONTENDED.values():  # warm-up
            cycles(slots, f"bench:s:{limit}", limit, 200)
        for rep in range(reps):
            elapsed = dict.fromkeys(names, 0.0)
            used = dict.fromkeys(names, 0.0)
            commands = dict.fromkeys(names, 0)
            for chunk in range(CHUNKS):
                for name in rotate(names, rep + chunk):
                    limit = UNCONTENDED[name]
                    s0 = env.stats.snapshot()
                    wall, cpu_s = cycles(slots, f"bench:s:{limit}", limit, n // CHUNKS)
                    elapsed[name] += wall
                    used[name] += cpu_s
                    commands[name] += env.stats.delta(s0, env.stats.snapshot())[0]
            done = (n // CHUNKS) * CHUNKS
            for name in names:
                rate[name].append(done / elapsed[name])
                cmds[name].append(commands[name] / done)
                cpu[name].append(used[name] / done * 1e6)
            for name in names:
                ratio[name].append(rate[name][-1] / rate[names[0]][-1])
    finally:
        slots.close()
    table = Table(
        "(s1) Uncontended acquire+release, one process: semaphore vs lock",
        ["what", "cycles/s (median)", "µs/cycle", "client CPU µs/cycle", "min-max",
         "x lock (median of per-rep ratios)", "server cmds/cycle"],
    )
    for name in names:
        per_s = median(rate[name])
        table.add(name, fmt(per_s, 0), fmt(1e6 / per_s, 1), fmt(median(cpu[name]), 1), spread(rate[name]),
                  fmt(median(ratio[name]), 3), fmt(median(cmds[name]), 1))
    table.notes += [
        f"{n} cycles per kind per repetition in {CHUNKS} slices taken in turn (the first "
        f"rotating), {reps} repetitions; 200 warm-up cycles each; ttl {TTL:.0f} s.",
        "x lock: per repetition, semaphore cycles/s / lock cycles/s; the median of those.",
        "client CPU µs/cycle: this process's user+system time per cycle (less disturbed by a "
        "loaded machine than the wall clock).",
        "server cmds/cycle: total_commands_processed delta / cycles, script-internal commands "
        "included (a slot acquire reads every slot record in one MGET).",
    ]
    return table, ratio, {"rate": rate, "ratio": ratio, "cmds": cmds, "cpu": cpu}


def run(env: Env, reps: int = 7, n: int = 4000, seconds: float = 3.0) -> ScenarioResult:
    res = ScenarioResult("s", "(s) Semaphores on one Redis: limit=4 vs the lock")
    reps = env.reps(reps)
    n = 800 if env.quick else n
    seconds = 1.0 if env.quick else seconds
    table, ratio, raw1 = _uncontended(env, reps, n)
    res.tables.append(table)
    sem = median(ratio["semaphore limit=4"])
    res.goals.append(Goal("s", "semaphore (limit=4) uncontended cycle ≥ 0.9 x the lock",
                          f"{sem:.3f} x", sem >= 0.9))

    contended_reps = env.reps(3)
    pool = WorkerPool(PROCESSES, env.url)
    runs: dict[tuple[float, int], list[dict[str, Any]]] = {(h, lim): [] for h in HOLDS for lim in LIMITS}
    errors: list[str] = []
    try:
        pool.run_all(list(range(PROCESSES)), f"{FN}:warm", timeout=120)
        for rep in range(contended_reps):
            for hold, limit in rotate(list(runs), rep):
                env.reset_server()
                s0 = env.stats.snapshot()
                try:
                    results, start, end = contended_run(
                        pool, f"bench:s:contended:{limit}", limit, hold, seconds)
                except WorkerError as exc:
                    errors.append(f"rep {rep} hold {hold} limit {limit}: {str(exc)[:300]}")
                    continue
                commands = env.stats.delta(s0, env.stats.snapshot())[0]
                analysis = analyse(results, limit, start, end)
                analysis["cmds_per_acq"] = commands / max(1, sum(len(r["events"]) for r in results))
                runs[(hold, limit)].append(analysis)
    finally:
        pool.close()

    table2 = Table(
        f"(s2) {PROCESSES} processes contending for one key: limit=4 vs limit=1, same hold",
        ["hold ms", "limit", "acq/s (median)", "x limit=1 (median of per-rep ratios)",
         "handoff p50 ms", "p99 ms", "most holders at once", "server cmds/acq", "timeouts"],
    )
    speedups: dict[float, float] = {}
    for hold in HOLDS:
        for limit in LIMITS:
            rs = runs[(hold, limit)]
            if not rs:
                table2.add(fmt(hold * 1000, 0), str(limit), "ERROR", "", "", "", "", "", "")
                continue
            per_rep = per_rep_ratios(rs, runs[(hold, 1)])
            if limit == 4:
                speedups[hold] = median(per_rep)
            table2.add(
                fmt(hold * 1000, 0), str(limit), fmt(median([r["per_s"] for r in rs]), 0),
                fmt(median(per_rep), 2), fmt(median([r["p50"] for r in rs]), 3),
                fmt(median([r["p99"] for r in rs]), 3), str(max(r["most_at_once"] for r in rs)),
                fmt(median([r["cmds_per_acq"] for r in rs]), 1),
                str(sum(r["timeouts"] + r["lost"] for r in rs)),
            )
    table2.notes += [
        f"{PROCESSES} spawned processes (2 CPUs: {PROCESSES // 2} per core), {seconds:.0f} s per "
        f"run, {contended_reps} repetitions, the (hold, limit) runs interleaved round-robin; "
        f"blocking acquire (BLPOP on the key's signal list), hold with time.sleep; ttl {TTL:.0f} s.",
        "x limit=1: per repetition, acquisitions/s of this run / those of limit=1 with the "
        "same hold; the median of those.",
        "handoff: the j-th acquisition's start minus the release call that made room for it "
        "(the (j - limit)-th); p50/p99 per run, then the median over repetitions.",
        "most holders at once: from the acquire-returned / release-called stamps; must be ≤ limit.",
    ]
    table2.notes += errors
    res.tables.append(table2)
    for hold in HOLDS:
        if hold in speedups:
            res.goals.append(Goal(
                "s", f"16 processes, limit=4 throughput ≥ 3.5 x limit=1 (hold {hold * 1000:.0f} ms)",
                f"{speedups[hold]:.2f} x", speedups[hold] >= 3.5,
            ))
        rs = runs[(hold, 4)]
        if rs:
            p99 = median([r["p99"] for r in rs])
            res.goals.append(Goal("s", f"limit=4 handoff p99 ≤ 2 ms (hold {hold * 1000:.0f} ms)",
                                  f"{p99:.3f} ms", p99 <= 2.0))
    most = max((r["most_at_once"] - lim for (h, lim), rs in runs.items() for r in rs), default=0)
    res.goals.append(Goal("s", "never more holders than the limit", f"{most:+d} over", most <= 0))
    res.raw = {"uncontended": raw1, "contended": {f"{h}:{lim}": rs for (h, lim), rs in runs.items()}}
    return res
