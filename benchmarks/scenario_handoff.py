"""(b) Eight processes contend for ONE key: cross-process handoff latency and fairness.

Each worker process loops: blocking acquire (the library's own wait), hold ~1 ms,
release. Every acquisition is stamped with ``time.monotonic_ns()`` (one clock for all
processes on Linux) right after acquire returns and right before release is called.
Handoff latency = next acquisition by ANOTHER process - the release stamp before it, so
it includes the release round trip, the wake-up and the winner's acquire.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    Table,
    WorkerContext,
    WorkerError,
    fmt,
    interleaved,
    median,
    percentile,
    sleep_until_ns,
)
from benchmarks.libs import LABELS, WAIT_STYLE

LIBS = ["ours", "redis-py", "python-redis-lock", "pottery", "celery-once"]
TTL = 10.0
HOLD_S = 0.001
WAIT_TIMEOUT = 5.0
FN = "benchmarks.scenario_handoff"


# -- run inside the worker processes ------------------------------------------------------


def contend(
    ctx: WorkerContext, lib: str, key: str, start_ns: int, end_ns: int
) -> dict[str, Any]:
    ad = ctx.adapter(lib)
    events: list[tuple[int, int]] = []
    timeouts = lost = 0
    sleep_until_ns(start_ns)
    while time.monotonic_ns() < end_ns:
        handle = ad.acquire_blocking(key, TTL, WAIT_TIMEOUT)
        if handle is None:
            timeouts += 1
            continue
        t_acq = time.monotonic_ns()
        time.sleep(HOLD_S)
        t_rel = time.monotonic_ns()
        if not ad.release(handle):
            lost += 1
        events.append((t_acq, t_rel))
    return {"events": events, "timeouts": timeouts, "lost": lost}


# -- analysis -----------------------------------------------------------------------------


def analyse(results: list[dict[str, Any]], start_ns: int, end_ns: int) -> dict[str, Any]:
    events = sorted(
        (t_acq, t_rel, w) for w, r in enumerate(results) for t_acq, t_rel in r["events"]
    )
    inside = [e for e in events if start_ns <= e[0] <= end_ns]
    handoffs: list[float] = []
    overlaps = same_worker = 0
    for prev, nxt in itertools.pairwise(events):
        if nxt[0] > end_ns:
            break
        if nxt[0] < prev[1]:
            overlaps += 1  # the next holder got the lock before the previous one let go
        if nxt[2] == prev[2]:
            same_worker += 1
        else:
            handoffs.append((nxt[0] - prev[1]) / 1e6)
    per_worker = [sum(1 for e in inside if e[2] == w) for w in range(len(results))]
    lo, hi = min(per_worker), max(per_worker)
    return {
        "acquisitions": len(inside),
        "per_s": len(inside) / ((end_ns - start_ns) / 1e9),
        "handoffs_ms": handoffs,
        "p50": percentile(handoffs, 50),
        "p99": percentile(handoffs, 99),
        "per_worker": per_worker,
        "fair_ratio": hi / lo if lo else float("inf"),
        "same_worker": same_worker,
        "overlaps": overlaps,
        "timeouts": sum(r["timeouts"] for r in results),
        "lost": sum(r["lost"] for r in results),
    }


def run(env: Env, reps: int = 3, seconds: float = 3.0) -> ScenarioResult:
    res = ScenarioResult("b", "(b) 8 processes contending for one key")
    reps = env.reps(reps)
    seconds = 1.0 if env.quick else seconds
    pool = env.pool
    workers = list(range(min(8, len(pool))))
    errors = pool.prepare(workers, LIBS)
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in LIBS}
    for rep, lib in interleaved(LIBS, reps, skip=errors):
        env.reset_server()
        start = time.monotonic_ns() + 300_000_000
        end = start + int(seconds * 1e9)
        s0 = env.stats.snapshot()
        try:
            results = pool.run_all(
                workers, f"{FN}:contend", timeout=seconds + 60,
                lib=lib, key=f"bench:b:{lib}", start_ns=start, end_ns=end,
            )
        except WorkerError as exc:
            errors[lib] = f"rep {rep}: {str(exc)[:300]}"
            continue
        commands = env.stats.delta(s0, env.stats.snapshot())[0]
        analysis = analyse(results, start, end)
        analysis["cmds_per_acq"] = commands / max(1, sum(len(r["events"]) for r in results))
        runs[lib].append(analysis)

    table = Table(
        res.title,
        ["library", "wait", "handoff p50 ms", "p99 ms", "acq/s", "per worker min/max",
         "max/min", "same-process re-acquire %", "server cmds/acq", "overlaps"],
    )
    pooled: dict[str, list[float]] = {}
    for lib in LIBS:
        rs = runs[lib]
        if not rs:
            table.add(LABELS[lib], WAIT_STYLE[lib], "ERROR", "", "", "", "", "", "",
                      errors.get(lib, "")[:80])
            continue
        pooled[lib] = [x for r in rs for x in r["handoffs_ms"]]
        same = median([100 * r["same_worker"] / max(1, r["acquisitions"]) for r in rs])
        table.add(
            LABELS[lib], WAIT_STYLE[lib], fmt(median([r["p50"] for r in rs]), 3),
            fmt(median([r["p99"] for r in rs]), 3), fmt(median([r["per_s"] for r in rs]), 0),
            f"{fmt(median([min(r['per_worker']) for r in rs]), 0)}/"
            f"{fmt(median([max(r['per_worker']) for r in rs]), 0)}",
            fmt(median([r["fair_ratio"] for r in rs]), 2), fmt(same, 1),
            fmt(median([r["cmds_per_acq"] for r in rs]), 1), str(sum(r["overlaps"] for r in rs)),
        )
    table.notes += [
        f"8 spawned processes, {seconds:.0f} s per library per repetition, {reps} repetitions, "
        f"libraries interleaved; hold {HOLD_S * 1000:.0f} ms (time.sleep); ttl {TTL:.0f} s.",
        "handoff: from the holder's release call to the return of another process's acquire "
        "(p50/p99 per repetition, then the median over repetitions).",
        "per worker min/max: acquisitions of the least and most served process; max/min is "
        "the fairness ratio (median over repetitions).",
        "same-process re-acquire: the releasing process itself took the lock next (no "
        "handoff). Pollers mostly re-take their own lock, so their few cross-process handoffs "
        "are the lucky polls: read their latency together with this column and max/min.",
        "server cmds/acq: total_commands_processed over the run (script-internal commands "
        "included) / acquisitions.",
        "overlaps: an acquire that returned before the previous holder's release call "
        "(mutual exclusion broken): must be 0.",
    ]
    for lib, err in errors.items():
        table.notes.append(f"{LABELS[lib]}: {err}")
    for lib in LIBS:
        for r in runs[lib]:
            if r["timeouts"] or r["lost"]:
                table.notes.append(
                    f"{LABELS[lib]}: {r['timeouts']} waits timed out ({WAIT_TIMEOUT:.0f} s) and "
                    f"{r['lost']} releases found the lock lost in one repetition"
                )
    res.tables.append(table)

    ours = runs["ours"]
    if ours:
        p50 = median([r["p50"] for r in ours])
        p99 = median([r["p99"] for r in ours])
        fair = median([r["fair_ratio"] for r in ours])
        same = median([100 * r["same_worker"] / max(1, r["acquisitions"]) for r in ours])
        cmds = median([r["cmds_per_acq"] for r in ours])
        res.goals += [
            Goal("b", "handoff p50 ≤ 0.4 ms", f"{p50:.3f} ms", p50 <= 0.4),
            Goal("b", "handoff p99 ≤ 1 ms", f"{p99:.3f} ms", p99 <= 1.0),
            Goal("b", "acquisitions per worker max/min ≤ 2", f"{fair:.2f}", fair <= 2.0),
            Goal("b", "lock goes to a waiter: releaser re-takes it ≤ 10 %", f"{same:.1f} %",
                 same <= 10.0),
            Goal("b", "server commands per contended acquisition ≤ 8", f"{cmds:.1f}", cmds <= 8.0),
        ]
        overlaps = sum(r["overlaps"] for r in ours)
        res.goals.append(Goal("b", "mutual exclusion (overlaps = 0)", str(overlaps), overlaps == 0))
    else:
        res.goals.append(Goal("b", "handoff p50 ≤ 0.4 ms", errors.get("ours", "")[:80], None))
    res.raw = {
        "seconds": seconds, "reps": reps, "errors": errors,
        "runs": {lib: [{k: v for k, v in r.items() if k != "handoffs_ms"} for r in rs]
                 for lib, rs in runs.items()},
        "pooled_percentiles_ms": {
            lib: {str(q): percentile(v, q) for q in (50, 90, 99, 99.9)} for lib, v in pooled.items()
        },
    }
    env.extra["handoff_pooled_ms"] = pooled
    return res
