"""(d) A holder is SIGKILLed while holding a renewed lock (ttl 2 s): how soon is it taken?

A fresh holder process takes the key with renewal on (ours: its lease keeper;
python-redis-lock: ``auto_renewal=True``), a pool worker starts waiting for it, and the
holder is killed at a random moment between ttl and 4/3 ttl after it acquired, so it
must have renewed at least once. Right after the kill is reaped, PTTL of the lock key
tells when the server will expire it: expiry = that moment + PTTL. Takeover latency =
the waiter's acquire return - expiry.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
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
)
from benchmarks.libs import LABELS, make_adapter

LIBS = ["ours", "python-redis-lock"]
TTL = 2.0
WAIT_TIMEOUT = 10.0
FN = "benchmarks.scenario_crash"

WAIT_STYLE = {
    "ours": "blocking acquire, timeout 10 s (each BLPOP bounded by the holder's PTTL)",
    "python-redis-lock": "blocking acquire, no timeout (its documented use: BLPOP bounded "
    "by expire)",
}


def _acquire(ad: Any, lib: str, key: str, *, blocking: bool) -> Any:
    if lib == "python-redis-lock":
        if blocking:
            return ad.acquire_blocking(key, TTL, None, auto_renewal=True)
        return ad.try_acquire(key, TTL, auto_renewal=True)
    if blocking:
        return ad.acquire_blocking(key, TTL, WAIT_TIMEOUT)
    return ad.try_acquire(key, TTL)


def holder_main(conn: Any, url: str, lib: str, key: str) -> None:
    """Take the key with renewal on, say so, then hold it until killed."""
    ad = make_adapter(lib, url)
    handle = _acquire(ad, lib, key, blocking=False)
    conn.send({"held": handle is not None, "t_acq": time.monotonic_ns()})
    while True:
        time.sleep(3600)


def wait_for_crash(ctx: WorkerContext, lib: str, key: str) -> dict[str, Any]:
    ad = ctx.adapter(lib)
    handle = _acquire(ad, lib, key, blocking=True)
    t_acq = time.monotonic_ns()
    if handle is None:
        return {"t_acq": None}
    ad.release(handle)
    return {"t_acq": t_acq}


def find_lock_key(env: Env, lib: str, key: str) -> str | None:
    """The server key that holds the lease: it contains ``key`` and lives ≤ the TTL."""
    known = make_adapter_key(lib, key)
    if known is not None:
        return known
    for name in env.client.scan_iter(match=f"*{key}*", count=1000):
        pttl = env.client.pttl(name)
        if 0 < pttl <= TTL * 1000 + 50:
            return name.decode()
    return None


def make_adapter_key(lib: str, key: str) -> str | None:
    return {"python-redis-lock": "lock:" + key}.get(lib)


def trial(env: Env, lib: str, waiter: int) -> dict[str, Any]:
    env.reset_server()
    key = f"bench:d:{lib}"
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=holder_main, args=(child, env.url, lib, key), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the holder process did not report within 60 s")
        hello = parent.recv()
        if not hello["held"]:
            raise RuntimeError("the holder could not take the free key")
        lock_key = find_lock_key(env, lib, key)
        env.pool.submit(waiter, f"{FN}:wait_for_crash", lib=lib, key=key)
        kill_at = hello["t_acq"] + int(random.uniform(TTL, TTL * 4 / 3) * 1e9)
        time.sleep(max(0.0, (kill_at - time.monotonic_ns()) / 1e9))
        t_kill = time.monotonic_ns()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        t0 = time.monotonic_ns()
        pttl = env.client.pttl(lock_key) if lock_key else -2
        t1 = time.monotonic_ns()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
    reply = env.pool.result(waiter, WAIT_TIMEOUT + TTL + 10)
    # PTTL -2: the key was already gone when we looked (expired before or at the kill)
    expiry = (t0 + t1) // 2 + max(pttl, 0) * 1_000_000
    t_acq = reply["t_acq"]
    return {
        "held_for_s": (t_kill - hello["t_acq"]) / 1e9,
        "pttl_ms": pttl,
        "lock_key": lock_key,
        "takeover_ms": None if t_acq is None else (t_acq - expiry) / 1e6,
        "kill_to_acquire_ms": None if t_acq is None else (t_acq - t_kill) / 1e6,
    }


def run(env: Env, reps: int = 3) -> ScenarioResult:
    res = ScenarioResult("d", "(d) Holder SIGKILLed: takeover after lease expiry")
    reps = env.reps(reps)
    errors = env.pool.prepare([0], LIBS)
    trials: dict[str, list[dict[str, Any]]] = {lib: [] for lib in LIBS}
    for rep, lib in interleaved(LIBS, reps, skip=errors):
        try:
            trials[lib].append(trial(env, lib, waiter=0))
        except (WorkerError, RuntimeError, ImportError) as exc:
            errors[lib] = f"rep {rep}: {str(exc)[:300]}"

    table = Table(
        res.title,
        ["library", "waiter", "takeover after expiry ms (median)", "per trial ms",
         "kill → acquire ms", "PTTL at kill ms"],
    )
    for lib in LIBS:
        ts = trials[lib]
        if not ts:
            table.add(LABELS[lib], WAIT_STYLE[lib], "ERROR", errors.get(lib, "")[:80], "", "")
            continue
        table.add(
            LABELS[lib], WAIT_STYLE[lib], fmt(median([t["takeover_ms"] for t in ts]), 1),
            ", ".join(fmt(t["takeover_ms"], 1) for t in ts),
            fmt(median([t["kill_to_acquire_ms"] for t in ts]), 0),
            ", ".join(str(t["pttl_ms"]) for t in ts),
        )
    table.notes += [
        f"ttl {TTL:.0f} s; the holder is killed {TTL:.0f}-{TTL * 4 / 3:.2f} s after it acquired "
        f"(so it renewed at least once; a positive PTTL at the kill shows it); {reps} trials "
        "per library, interleaved.",
        "takeover after expiry: waiter's acquire return minus (kill reaped + PTTL read then).",
    ]
    for lib, err in errors.items():
        table.notes.append(f"{LABELS[lib]}: {err}")
    res.tables.append(table)

    ours = trials["ours"]
    if ours and all(t["takeover_ms"] is not None for t in ours):
        worst = max(t["takeover_ms"] for t in ours)
        med = median([t["takeover_ms"] for t in ours])
        res.goals.append(Goal("d", "takeover ≤ 50 ms after the crashed holder's lease expires",
                              f"median {med:.1f} ms, worst {worst:.1f} ms", worst <= 50))
        renewed = all(t["pttl_ms"] > 0 for t in ours)
        res.goals.append(Goal("d", "holder's lease was renewed until the kill (PTTL > 0)",
                              ", ".join(str(t["pttl_ms"]) for t in ours), renewed))
    else:
        res.goals.append(Goal("d", "takeover ≤ 50 ms after lease expiry",
                              errors.get("ours", "waiter timed out")[:80], False))
    res.raw = {"ttl": TTL, "trials": trials, "errors": errors}
    return res
