"""(c) Four processes wait on a held key: what waiting costs the server, how fast they wake.

The main process takes the key (ttl 30 s, so no renewal falls in the window) with the
same library; four worker processes then wait for it with the library's blocking
acquire. After 0.5 s of settling, the server's ``total_commands_processed`` is read
before and after a 3 s window in which nothing else talks to the server. Then the
holder releases; the wake latency is the first waiter's acquire return minus the
holder's release call.
"""

from __future__ import annotations

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
    fmt_cmds,
    interleaved,
    median,
)
from benchmarks.libs import LABELS, WAIT_STYLE, available

LIBS = ["ours", "redis-py", "python-redis-lock", "pottery"]
HOLDER_TTL = 30.0
WAITERS = 4
SETTLE_S = 0.5
WAIT_TIMEOUT = 20.0
FN = "benchmarks.scenario_waiters"


def wait_once(ctx: WorkerContext, lib: str, key: str, ttl: float, timeout: float | None) -> Any:
    """Block until the key is ours, stamp the time, release at once."""
    ad = ctx.adapter(lib)
    handle = ad.acquire_blocking(key, ttl, timeout)
    t_acq = time.monotonic_ns()
    if handle is None:
        return {"t_acq": None}
    ad.release(handle)
    return {"t_acq": t_acq}


def run(env: Env, reps: int = 3, window: float = 3.0) -> ScenarioResult:
    res = ScenarioResult("c", "(c) 4 waiters blocked on a held key")
    reps = env.reps(reps)
    window = 1.0 if env.quick else window
    holders, missing = available(LIBS, env.url)
    libs = [lib for lib in LIBS if lib in holders]
    pool = env.pool
    waiters = list(range(WAITERS))
    errors = pool.prepare(waiters, libs)
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for rep, lib in interleaved(libs, reps, skip=errors):
        env.reset_server()
        key = f"bench:c:{lib}"
        holder = holders[lib]
        try:
            held = holder.try_acquire(key, HOLDER_TTL)
            if held is None:
                raise RuntimeError("the holder could not take the free key")
            for i in waiters:
                pool.submit(i, f"{FN}:wait_once", lib=lib, key=key, ttl=HOLDER_TTL,
                            timeout=WAIT_TIMEOUT)
            time.sleep(SETTLE_S)
            s0 = env.stats.snapshot()
            t0 = time.monotonic()
            time.sleep(window)
            s1 = env.stats.snapshot()
            elapsed = time.monotonic() - t0
            t_rel = time.monotonic_ns()
            holder.release(held)
            replies = [pool.result(i, WAIT_TIMEOUT + 10) for i in waiters]
        except (WorkerError, RuntimeError) as exc:
            errors[lib] = f"rep {rep}: {str(exc)[:300]}"
            continue
        total, per = env.stats.delta(s0, s1)
        stamps = sorted(r["t_acq"] for r in replies if r["t_acq"] is not None)
        runs[lib].append({
            "cmds_per_s": total / elapsed,
            "per_command": {k: v / elapsed for k, v in per.items()},
            "wake_ms": (stamps[0] - t_rel) / 1e6 if stamps else None,
            "all_ms": (stamps[-1] - t_rel) / 1e6 if len(stamps) == WAITERS else None,
            "acquired": len(stamps),
        })
    for ad in holders.values():
        ad.close()

    table = Table(
        res.title,
        ["library", "wait", "server cmds/s while waiting", "commands/s by name",
         "first wake ms", "all 4 served ms"],
    )
    for lib in LIBS:
        if lib in missing:
            table.add(LABELS[lib], WAIT_STYLE[lib], "not installed", "", "", "")
            continue
        rs = runs[lib]
        if not rs:
            table.add(LABELS[lib], WAIT_STYLE[lib], "ERROR", errors.get(lib, "")[:80], "", "")
            continue
        names = {k for r in rs for k in r["per_command"]}
        per = {k: median([r["per_command"].get(k, 0.0) for r in rs]) for k in names}
        table.add(
            LABELS[lib], WAIT_STYLE[lib], fmt(median([r["cmds_per_s"] for r in rs]), 1),
            fmt_cmds({k: round(v, 1) for k, v in per.items()}),
            fmt(median([r["wake_ms"] for r in rs]), 3), fmt(median([r["all_ms"] for r in rs]), 1),
        )
    table.notes += [
        f"{WAITERS} waiter processes, {window:.0f} s window after {SETTLE_S} s settling, {reps} "
        f"repetitions, libraries interleaved; holder ttl {HOLDER_TTL:.0f} s (no renewal in the "
        "window), so every command counted comes from the waiters.",
        "server cmds/s: total_commands_processed delta / window (script-internal commands "
        "included, the INFO reads excluded).",
        "first wake: the holder's release call to the first waiter's acquire return; "
        "all 4 served: to the last of the four (each releases at once).",
    ]
    for lib, err in errors.items():
        table.notes.append(f"{LABELS[lib]}: {err}")
    res.tables.append(table)

    ours = runs.get("ours")
    if ours:
        cps = median([r["cmds_per_s"] for r in ours])
        wake = median([r["wake_ms"] for r in ours])
        res.goals += [
            Goal("c", "waiting costs ≈ 0 server cmds/s (≤ 1/s; re-checks bounded by TTL)",
                 f"{cps:.2f} cmds/s", cps <= 1.0),
            Goal("c", "first waiter wakes ≤ 1 ms after release", f"{wake:.3f} ms", wake <= 1.0),
        ]
    else:
        why = missing.get("ours") or errors.get("ours", "")
        res.goals.append(Goal("c", "waiting costs ≈ 0 server cmds/s", why[:80], None))
    res.raw = {"window": window, "reps": reps, "runs": runs, "errors": errors,
               "missing": missing}
    return res
