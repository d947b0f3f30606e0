"""(e) One process holds 1,000 locks (ttl 3 s) for 4 s: what does keeping them alive cost?
Then 10,000 locks for six renewal intervals: the lease keeper thread's CPU (issue 14's goal).

MONITOR records every command the clients send during the 4 s window (nothing but
renewals runs then), with its time and, for a script call, its number of keys. After
the window every lock must still exist on the server: a 3 s lease that was not renewed
would be gone. For comparison python-redis-lock does the same with ``auto_renewal=True``
(a renewal thread per lock, every 2/3 of expire).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import (
    CommandMonitor,
    Goal,
    ScenarioResult,
    Table,
    fmt,
    fmt_cmds,
    interleaved,
    median,
)
from benchmarks.libs import LABELS, available
from celery_singleton_lock import connect
from celery_singleton_lock.lease import LeaseKeeper

LIBS = ["ours", "python-redis-lock"]
N_LOCKS = 1000
TTL = 3.0
WINDOW = 4.0

#: The renewal interval each library documents.
INTERVAL = {"ours": TTL / 3, "python-redis-lock": TTL * 2 / 3}


def _take(ad: Any, lib: str, key: str) -> Any:
    if lib == "python-redis-lock":
        return ad.try_acquire(key, TTL, auto_renewal=True)
    return ad.try_acquire(key, TTL)


def _alive(env: Env, lib: str, ad: Any, handles: list[Any], keys: list[str]) -> int:
    """How many of the locks still exist on the server (and, for ours, are not lost)."""
    if lib == "ours":
        not_lost = sum(1 for h in handles if not h.lost)
        names = [n for n in env.client.scan_iter(match="*bench:e:*", count=5000)]
        pipe = env.client.pipeline(transaction=False)
        for n in names:
            pipe.pttl(n)
        live = sum(1 for n, p in zip(names, pipe.execute(), strict=True)
                   if 0 < p <= TTL * 1000 + 50 and not n.endswith(b":fence"))
        return min(not_lost, live)
    pipe = env.client.pipeline(transaction=False)
    for k in keys:
        pipe.pttl(ad.redis_key(k))
    return sum(1 for p in pipe.execute() if p > 0)


class ThreadErrors:
    """Counts exceptions that kill threads (python-redis-lock's renewal threads) meanwhile,
    instead of letting each print a traceback."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __enter__(self) -> ThreadErrors:
        self._saved = threading.excepthook
        threading.excepthook = self._hook
        return self

    def _hook(self, args: Any) -> None:
        self.counts[f"{args.exc_type.__name__}: {str(args.exc_value)[:60]}"
                    if args.exc_type.__name__ != "NotAcquired" else "NotAcquired"] += 1

    def __exit__(self, *exc: object) -> None:
        threading.excepthook = self._saved


def one(env: Env, lib: str, ad: Any) -> dict[str, Any]:
    with ThreadErrors() as thread_errors:
        out = _one(env, lib, ad)
    out["thread_errors"] = dict(thread_errors.counts)
    return out


def _one(env: Env, lib: str, ad: Any) -> dict[str, Any]:
    env.reset_server()
    keys = [f"bench:e:{lib}:{i}" for i in range(N_LOCKS)]
    t_start = time.monotonic()
    handles = [_take(ad, lib, k) for k in keys]
    acquire_s = time.monotonic() - t_start
    if any(h is None for h in handles):
        raise RuntimeError("some free keys could not be taken")
    time.sleep(0.1)
    me = env.client.client_info()["addr"]  # our INFO reads are not the library's
    with CommandMonitor(env.url) as mon:
        s0 = env.stats.snapshot()
        time.sleep(WINDOW)
        s1 = env.stats.snapshot()
    total, per = env.stats.delta(s0, s1)
    alive = _alive(env, lib, ad, handles, keys)
    calls = [e for e in mon.client_entries
             if f"{e['client_address']}:{e['client_port']}" != me]
    by_command = Counter(e["command"].split(" ", 1)[0].lower() for e in calls)
    renewals: Counter[str] = Counter()  # lock key -> times it was renewed in the window
    keys_per_call = []
    for e in calls:
        words = e["command"].split(" ")
        if words[0].lower() == "evalsha":
            numkeys = int(words[2])
            keys_per_call.append(numkeys)
            renewals.update(
                k for k in words[3:3 + numkeys] if "bench:e:" in k and "signal" not in k
            )
    per_lock = median(list(renewals.values())) if renewals else 0
    t_rel = time.monotonic()
    release_failed = 0
    for h in handles:
        try:
            if not ad.release(h):
                release_failed += 1
        except Exception:
            release_failed += 1
    release_s = time.monotonic() - t_rel
    return {
        "round_trips": len(calls),
        "by_command": dict(by_command),
        "script_calls": len(keys_per_call),
        "keys_per_call": median(keys_per_call) if keys_per_call else None,
        "renewals_per_lock": per_lock,
        "server_cmds": total,
        "server_per": per,
        "observed_interval_s": WINDOW / per_lock if per_lock else None,
        "round_trips_per_interval": len(calls) / per_lock if per_lock else None,
        "release_failed": release_failed,
        "alive": alive,
        "acquire_s": acquire_s,
        "release_s": release_s,
    }


#: The scale goal of issue 14: 10,000 locks held by one process.
SCALE_LOCKS = 10_000
SCALE_TTL = 3.0  # renewed every second: the most a keeper of 10,000 locks is asked
SCALE_INTERVALS = 6
CPU_GOAL = 0.10  # of one core


def _thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) one thread of this process has used."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scale_one(env: Env) -> dict[str, Any]:
    """Hold 10,000 locks for several renewal intervals: the keeper thread's CPU and its
    round trips, the server's script calls and CPU, and the locks still alive after."""
    env.reset_server()
    backend = connect(env.url, prefix="bench-e-scale")
    keeper = LeaseKeeper.for_process()
    t0 = time.monotonic()
    handles = [backend.acquire(f"s:{i}", ttl=SCALE_TTL) for i in range(SCALE_LOCKS)]
    acquire_s = time.monotonic() - t0
    try:
        if any(h is None for h in handles):
            raise RuntimeError("some free keys could not be taken")
        interval = SCALE_TTL / 3
        # Taking them took longer than the batching window (ttl / 6): the first rounds
        # renew them in parts, then they are all due together. Measure from then on.
        time.sleep(2 * interval)
        assert keeper.native_id is not None
        cpu0, calls0, s0 = _thread_cpu(keeper.native_id), keeper.renewal_calls, env.stats.snapshot()
        server0 = env.client.info("cpu")
        w0 = time.monotonic()
        time.sleep(SCALE_INTERVALS * interval)
        window = time.monotonic() - w0
        cpu = _thread_cpu(keeper.native_id) - cpu0
        calls = keeper.renewal_calls - calls0
        server1 = env.client.info("cpu")
        total, per = env.stats.delta(s0, env.stats.snapshot())
        # The lock keys (not their fencing counters or signal lists) still on the server.
        names = [n for n in env.client.scan_iter(match="*bench-e-scale:s:*", count=5000)
                 if not n.endswith((b":fence", b":signal"))]
        pipe = env.client.pipeline(transaction=False)
        for name in names:
            pipe.pttl(name)
        on_server = sum(1 for ttl in pipe.execute() if ttl > 0)
        alive = min(on_server, sum(1 for h in handles if not h.lost))
    finally:
        for h in handles:
            if h is not None:
                backend.release(h)
        backend.close()
    server_cpu = sum(float(server1[k]) - float(server0[k]) for k in ("used_cpu_user", "used_cpu_sys"))
    intervals = window / interval
    return {
        "acquire_s": acquire_s, "window_s": window, "keeper_cpu_s": cpu,
        "keeper_cpu_share": cpu / window, "round_trips": calls,
        "round_trips_per_interval": calls / intervals,
        "keeper_ms_per_round_trip": 1000 * cpu / calls if calls else None,
        "script_calls": per.get("evalsha", 0) + per.get("fcall", 0),
        "server_cmds": total, "server_cpu_share": server_cpu / window, "alive": alive,
    }


def scale_table(res: ScenarioResult, runs: list[dict[str, Any]], error: str | None) -> None:
    table = Table(
        f"(e) Renewing {SCALE_LOCKS:,} held locks in one process (ttl {SCALE_TTL:.0f} s)",
        ["library", "keeper thread CPU (% of one core)", "ms CPU per renewal round trip",
         "round trips per interval", "script calls on the server", "redis-server CPU %",
         f"alive after {SCALE_INTERVALS} intervals", "taking them s"],
    )
    if runs:
        table.add(
            LABELS["ours"],
            f"{100 * median([r['keeper_cpu_share'] for r in runs]):.1f} "
            f"({100 * min(r['keeper_cpu_share'] for r in runs):.1f}-"
            f"{100 * max(r['keeper_cpu_share'] for r in runs):.1f})",
            fmt(median([r["keeper_ms_per_round_trip"] or math.nan for r in runs]), 1),
            fmt(median([r["round_trips_per_interval"] for r in runs]), 2),
            fmt(median([r["script_calls"] for r in runs]), 0),
            fmt(100 * median([r["server_cpu_share"] for r in runs]), 1),
            f"{min(r['alive'] for r in runs)}/{SCALE_LOCKS}",
            fmt(median([r["acquire_s"] for r in runs]), 1),
        )
    else:
        table.add(LABELS["ours"], "ERROR", (error or "")[:80], "", "", "", "", "")
    table.notes += [
        f"{SCALE_LOCKS:,} locks taken one by one, then held {SCALE_INTERVALS} renewal "
        f"intervals ({SCALE_TTL / 3:.0f} s each) after two intervals to settle; medians of "
        f"{len(runs)} repetitions (min-max for CPU).",
        "keeper thread CPU: user+system time of the lease keeper's OS thread "
        "(/proc/self/task/<id>/stat, 10 ms ticks) over the window; it covers the whole round: "
        "choosing the due locks, redis-py packing the script call, reading the reply.",
        "round trips: the keeper's renewal calls; script calls: EVALSHA/FCALL the server ran "
        "meanwhile (one per round trip, or several if a round is one pipeline).",
    ]
    if error:
        table.notes.append(f"error: {error}")
    res.tables.append(table)
    goal = (f"{SCALE_LOCKS:,} locks renewed in 1 round trip per interval with "
            f"≤ {CPU_GOAL:.0%} of one core")
    if runs:
        share = median([r["keeper_cpu_share"] for r in runs])
        rt = median([r["round_trips_per_interval"] for r in runs])
        alive = min(r["alive"] for r in runs)
        res.goals.append(Goal(
            "e", goal, f"{100 * share:.1f}% of a core, {rt:.2f} round trips per interval, "
            f"{alive}/{SCALE_LOCKS} alive",
            share <= CPU_GOAL and round(rt, 2) <= 1.0 and alive == SCALE_LOCKS,
        ))
    else:
        res.goals.append(Goal("e", goal, (error or "")[:80], None))


def run(env: Env, reps: int = 3) -> ScenarioResult:
    res = ScenarioResult("e", "(e) Renewing 1,000 held locks in one process")
    reps = env.reps(reps)
    adapters, missing = available(LIBS, env.url)
    libs = [lib for lib in LIBS if lib in adapters]
    errors: dict[str, str] = {}
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for rep, lib in interleaved(libs, reps, skip=errors):
        if lib != "ours" and rep > 0:  # python-redis-lock once: its 1,000 threads are slow
            continue
        try:
            runs[lib].append(one(env, lib, adapters[lib]))
        except Exception as exc:
            errors[lib] = f"rep {rep}: {exc!r}"[:300]
    for ad in adapters.values():
        ad.close()

    table = Table(
        res.title,
        ["library", "renewal interval s (documented / seen)", f"round trips in {WINDOW:.0f} s",
         "round trips per interval", "keys per call", "server cmds (incl. in-script)",
         f"alive after {WINDOW:.0f} s", "release found lost", "renewal thread deaths"],
    )
    for lib in LIBS:
        if lib in missing:
            table.add(LABELS[lib], "not installed", "", "", "", "", "", "", "")
            continue
        rs = runs[lib]
        if not rs:
            table.add(LABELS[lib], "ERROR", errors.get(lib, "")[:80], "", "", "", "", "", "")
            continue
        table.add(
            LABELS[lib],
            f"{INTERVAL[lib]:.2f} / {fmt(median([r['observed_interval_s'] for r in rs]))}",
            f"{fmt(median([r['round_trips'] for r in rs]), 0)} "
            f"({fmt_cmds(rs[len(rs) // 2]['by_command'])})",
            fmt(median([r["round_trips_per_interval"] for r in rs]), 2),
            fmt(median([r["keys_per_call"] for r in rs]), 0),
            fmt(median([r["server_cmds"] for r in rs]), 0),
            f"{min(r['alive'] for r in rs)}/{N_LOCKS}",
            str(max(r["release_failed"] for r in rs)),
            fmt_cmds(rs[0]["thread_errors"], limit=2) if rs[0]["thread_errors"] else "0",
        )
    table.notes += [
        f"{N_LOCKS} locks, ttl {TTL:.0f} s, held {WINDOW:.0f} s after all were taken; "
        f"celery-singleton-lock {reps} repetitions (medians), python-redis-lock once (its "
        "1,000 renewal threads make a run slow), interleaved.",
        "round trips: commands the library's clients sent in the window (MONITOR; our own INFO "
        "reads left out).",
        "seen interval: window / renewals per lock (how many renewal calls named a lock's key, "
        "median over the locks); round trips per interval: round trips / renewals per lock.",
        "keys per call: keys of one renewal script call (EVALSHA numkeys).",
        "alive: locks whose key still had a TTL after the window (worst repetition); a "
        "lease that was not renewed would have expired. release found lost: releases that "
        "failed because the lock had expired; renewal thread deaths: exceptions that ended "
        "a renewal thread.",
    ]
    for lib, err in errors.items():
        table.notes.append(f"{LABELS[lib]}: {err}")
    for lib, rs in runs.items():
        if any("MaxConnectionsError" in k for r in rs for k in r["thread_errors"]):
            table.notes.append(
                f"{LABELS[lib]}: its renewal threads share one redis-py client, whose pool "
                "allows 100 connections by default (redis-py >= 8); threads that found no "
                "connection died and their locks expired."
            )
    res.tables.append(table)

    ours = runs.get("ours")
    if ours:
        rt = median([r["round_trips_per_interval"] or math.nan for r in ours])
        alive = min(r["alive"] for r in ours)
        res.goals.append(Goal(
            "e", "1 round trip per renewal interval for 1,000 locks",
            f"{rt:.2f} per {INTERVAL['ours']:.0f} s interval, {alive}/{N_LOCKS} alive",
            rt is not None and round(rt, 2) <= 1.0 and alive == N_LOCKS,
        ))
    else:
        why = missing.get("ours") or errors.get("ours", "")
        res.goals.append(Goal("e", "1 round trip per renewal interval", why[:80], None))
    scale_runs: list[dict[str, Any]] = []
    scale_error = None
    if "ours" in libs:
        for rep in range(env.reps(3)):
            try:
                scale_runs.append(scale_one(env))
            except Exception as exc:
                scale_error = f"rep {rep}: {exc!r}"[:300]
                break
        scale_table(res, scale_runs, scale_error)
    res.raw = {"n_locks": N_LOCKS, "ttl": TTL, "window": WINDOW, "runs": runs,
               "errors": errors, "missing": missing,
               "scale": {"n_locks": SCALE_LOCKS, "ttl": SCALE_TTL, "runs": scale_runs,
                         "error": scale_error}}
    return res
