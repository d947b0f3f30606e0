"""(a) Uncontended acquire+release cycles per second, one process, one key.

Each library takes and releases the same free key a few thousand times in a row; the
libraries take turns (round-robin, the first one changing each repetition). A second,
untimed pass counts the round trips of a cycle with MONITOR.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import (
    CommandMonitor,
    Goal,
    ScenarioResult,
    Table,
    fmt,
    fmt_cmds,
    median,
    rotate,
    spread,
)
from benchmarks.libs import LABELS, available

LIBS = ["socket", "raw", "ours", "redis-py", "python-redis-lock", "pottery", "celery-once"]
TTL = 30.0
#: Cycles per run; pottery (a thread pool per call) gets fewer to keep the suite short.
CYCLES = {"pottery": 800}
#: Slices per repetition (see run).
CHUNKS = 4


def cycles(adapter: Any, key: str, n: int) -> int:
    """``n`` acquire+release cycles; returns how many releases found the lock lost."""
    lost = 0
    for _ in range(n):
        handle = adapter.try_acquire(key, TTL)
        if handle is None:
            raise RuntimeError(f"uncontended acquire of {key!r} failed")
        if not adapter.release(handle):
            lost += 1
    return lost


def run(
    env: Env, reps: int = 5, n: int = 2000, warmup: int = 200, rt_cycles: int = 200
) -> ScenarioResult:
    res = ScenarioResult("a", "(a) Uncontended acquire+release, one process")
    reps = env.reps(reps)
    n = 500 if env.quick else n
    adapters, missing = available(LIBS, env.url)
    errors: dict[str, str] = {}
    env.reset_server()
    for lib, ad in adapters.items():  # warm-up: connections, script loads, code paths
        try:
            cycles(ad, f"bench:a:{lib}", warmup)
        except Exception as exc:
            errors[lib] = f"warm-up failed: {exc!r}"

    rate: dict[str, list[float]] = {lib: [] for lib in adapters}
    server_cmds: dict[str, list[float]] = {lib: [] for lib in adapters}
    client_cpu: dict[str, list[float]] = {lib: [] for lib in adapters}
    lost: dict[str, int] = dict.fromkeys(adapters, 0)
    for rep in range(reps):
        # Each repetition runs every library's cycles in CHUNKS slices, the libraries
        # taking turns slice by slice: a burst of machine noise hits them all alike.
        elapsed: dict[str, float] = dict.fromkeys(adapters, 0.0)
        cpu: dict[str, float] = dict.fromkeys(adapters, 0.0)
        commands: dict[str, int] = dict.fromkeys(adapters, 0)
        done: dict[str, int] = dict.fromkeys(adapters, 0)
        for chunk in range(CHUNKS):
            for lib in rotate(list(adapters), rep + chunk):
                if lib in errors:
                    continue
                count = (n if env.quick else CYCLES.get(lib, n)) // CHUNKS
                gc.collect()
                s0 = env.stats.snapshot()
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    lost[lib] += cycles(adapters[lib], f"bench:a:{lib}", count)
                except Exception as exc:
                    errors[lib] = f"rep {rep}: {exc!r}"
                    continue
                elapsed[lib] += time.perf_counter() - t0
                cpu[lib] += time.process_time() - c0
                s1 = env.stats.snapshot()
                commands[lib] += env.stats.delta(s0, s1)[0]
                done[lib] += count
        for lib in adapters:
            if lib not in errors and done[lib]:
                rate[lib].append(done[lib] / elapsed[lib])
                client_cpu[lib].append(cpu[lib] / done[lib] * 1e6)
                server_cmds[lib].append(commands[lib] / done[lib])

    # untimed pass: round trips per cycle, from the commands clients sent (MONITOR)
    round_trips: dict[str, float] = {}
    breakdown: dict[str, str] = {}
    for lib, ad in adapters.items():
        if lib in errors:
            continue
        with CommandMonitor(env.url) as mon:
            cycles(ad, f"bench:a:{lib}", rt_cycles)
        counts = mon.client_commands()
        round_trips[lib] = sum(counts.values()) / rt_cycles
        breakdown[lib] = fmt_cmds(dict(counts), scale=rt_cycles)

    for ad in adapters.values():
        ad.close()

    ratios: dict[str, list[float]] = {lib: [] for lib in adapters}
    for lib in adapters:
        for i, r in enumerate(rate[lib]):
            if i < len(rate.get("raw", [])):
                ratios[lib].append(r / rate["raw"][i])

    table = Table(
        res.title,
        ["library", "cycles/s (median)", "µs/cycle", "client CPU µs/cycle", "min-max", "x raw",
         "server cmds/cycle",
         "round trips/cycle", "commands sent per cycle"],
    )
    for lib in LIBS:
        if lib in missing:
            table.add(LABELS[lib], "not installed", "", "", "", "", "", "", missing[lib][:60])
            continue
        if lib in errors and not rate[lib]:
            table.add(LABELS[lib], "ERROR", "", "", "", "", "", "", errors[lib][:80])
            continue
        table.add(
            LABELS[lib], fmt(median(rate[lib]), 0), fmt(1e6 / median(rate[lib]), 1),
            fmt(median(client_cpu[lib]), 1), spread(rate[lib]), fmt(median(ratios[lib])),
            fmt(median(server_cmds[lib])), fmt(round_trips.get(lib)), breakdown.get(lib, ""),
        )
    table.notes += [
        "bare socket: SET NX PX + DEL pre-packed on one socket, one recv per reply, no client "
        "library (the physical floor of 2 round trips).",
        f"{n} cycles per library per repetition ({CYCLES.get('pottery', n)} for pottery), "
        f"{reps} repetitions; within a repetition the libraries take turns in {CHUNKS} slices "
        f"(round-robin, first one rotating); {warmup} warm-up cycles each first; ttl "
        f"{TTL:.0f} s.",
        "x raw: median over repetitions of (library / raw loop of the same repetition).",
        "client CPU µs/cycle: this process's user+system time per cycle (time.process_time): "
        "what the library costs the caller, whatever else the machine runs.",
        "server cmds/cycle: total_commands_processed delta / cycles; it includes the commands "
        "a Lua script runs inside the server.",
        f"round trips/cycle: commands the client itself sent (MONITOR, {rt_cycles} untimed "
        "cycles), script-internal commands excluded.",
    ]
    for lib, err in errors.items():
        table.notes.append(f"{LABELS[lib]}: {err}")
    for lib, count in lost.items():
        if count:
            table.notes.append(f"{LABELS[lib]}: {count} releases reported the lock as lost")
    res.tables.append(table)

    if "ours" in adapters and "ours" not in errors and rate.get("raw"):
        ratio = median(ratios["ours"])
        micros = {lib: 1e6 / median(rate[lib]) for lib in ("socket", "raw", "ours") if rate.get(lib)}
        floor = f", floor {micros['socket']:.0f} µs" if "socket" in micros else ""
        res.goals.append(Goal(
            "a", "uncontended cycle ≥ 1.5 x raw redis-py",
            f"{ratio:.2f} x raw ({micros['ours']:.0f} µs vs {micros['raw']:.0f} µs{floor})",
            ratio >= 1.5,
        ))
        rt = round_trips.get("ours")
        res.goals.append(Goal("a", "round trips per cycle = 2", fmt(rt),
                              None if rt is None else round(rt, 2) <= 2.0))
        cmds = median(server_cmds["ours"])
        res.goals.append(Goal("a", "server commands per uncontended cycle ≤ 6 (no fence key, no LPUSH)",
                              fmt(cmds), round(cmds, 2) <= 6.0))
    else:
        why = missing.get("ours") or errors.get("ours", "")
        res.goals.append(Goal("a", "uncontended cycle ≥ 1.5 x raw redis-py", why[:80], None))
    res.raw = {
        "cycles": n, "reps": reps, "rate": rate, "ratio_to_raw": ratios,
        "server_cmds_per_cycle": server_cmds, "client_cpu_us_per_cycle": client_cpu,
        "round_trips_per_cycle": round_trips,
        "round_trip_breakdown": breakdown, "errors": errors, "missing": missing, "lost": lost,
    }
    return res
