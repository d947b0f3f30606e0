"""(l) Redis behind Sentinel: the uncontended cycle through ``sentinel://``, and what
``min_replicas=1`` (a WAIT per acquisition) costs.

A Sentinel setup of this scenario's own (a master, one replica, three Sentinels) beside
the suite's single Redis. Four backends take turns in each repetition, one process, one
key each, acquire + release:

- our single Redis (the suite's server): the reference;
- ``redis://`` straight to the Sentinel setup's master: the same, plus the replication
  stream the master writes to its replica;
- ``sentinel://`` to that master, found through the Sentinels;
- ``sentinel://`` with ``min_replicas=1``: every acquisition waits for the replica.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import Goal, ScenarioResult, Table, fmt, median, rotate, spread

BACKENDS = ["single", "master", "sentinel", "sentinel-wait"]
LABELS = {
    "single": "celery-singleton-lock, one Redis (reference)",
    "master": "redis:// to the Sentinel setup's master (replicated)",
    "sentinel": "sentinel:// (master found through 3 Sentinels)",
    "sentinel-wait": "sentinel://, min_replicas=1 (WAIT 1 per acquisition)",
}
CYCLES = 500
CHUNKS = 4
TTL = 30.0


def _cycles(backend: Any, key: str, n: int) -> None:
    for _ in range(n):
        held = backend.acquire(key, TTL)
        if held is None:
            raise RuntimeError(f"uncontended acquire of {key!r} failed")
        backend.release(held)


def run(env: Env, reps: int = 5) -> ScenarioResult:
    from celery_singleton_lock import connect
    from celery_singleton_lock.testing import RedisSentinel

    res = ScenarioResult("l", "(l) Redis behind Sentinel: cycle, and the cost of min_replicas=1")
    reps = env.reps(reps)
    with RedisSentinel() as setup:
        master = setup.master()
        backends = {
            "single": connect(env.url),
            "master": connect(master.url + "/0"),
            "sentinel": connect(setup.url),
            "sentinel-wait": connect(setup.url, min_replicas=1),
        }
        try:
            rate: dict[str, list[float]] = {name: [] for name in BACKENDS}
            # This process's CPU per cycle: what the client code costs, which the load of
            # a shared machine disturbs far less than the wall clock.
            cpu_us: dict[str, list[float]] = {name: [] for name in BACKENDS}
            for name, backend in backends.items():
                _cycles(backend, f"bench:l:{name}", 100)  # warm-up: connections, scripts
            for rep in range(reps):
                elapsed = dict.fromkeys(BACKENDS, 0.0)
                cpu = dict.fromkeys(BACKENDS, 0.0)
                done = dict.fromkeys(BACKENDS, 0)
                for chunk in range(CHUNKS):
                    for name in rotate(BACKENDS, rep + chunk):
                        count = CYCLES // (4 if env.quick else 1)
                        gc.collect()
                        started, cpu_started = time.perf_counter(), time.process_time()
                        _cycles(backends[name], f"bench:l:{name}", count)
                        elapsed[name] += time.perf_counter() - started
                        cpu[name] += time.process_time() - cpu_started
                        done[name] += count
                for name in BACKENDS:
                    rate[name].append(done[name] / elapsed[name])
                    cpu_us[name].append(cpu[name] / done[name] * 1e6)
        finally:
            for backend in backends.values():
                backend.close()

    def ratio(name: str, to: str) -> list[float]:
        return [a / b for a, b in zip(rate[name], rate[to], strict=True)]

    # The WAIT's price per acquisition: the cycle's time with it, less without it.
    wait_us = [
        (1 / w - 1 / s) * 1e6 for w, s in zip(rate["sentinel-wait"], rate["sentinel"], strict=True)
    ]
    table = Table(
        res.title,
        ["backend", "cycles/s (median)", "min-max", "x one Redis", "µs per cycle",
         "client CPU µs/cycle"],
    )
    for name in BACKENDS:
        table.add(
            LABELS[name], fmt(median(rate[name]), 0), spread(rate[name]),
            fmt(median(ratio(name, "single"))), fmt(1e6 / median(rate[name]), 1),
            fmt(median(cpu_us[name]), 1),
        )
    table.notes += [
        f"one process, one key per backend, {CHUNKS} slices of {CYCLES} acquire+release cycles "
        f"per backend per repetition, backends taking turns, {reps} repetitions; ratios within "
        "each repetition, then the median.",
        "The Sentinel setup (a master, one replica, three Sentinels) is this scenario's own, "
        "on the same machine (loopback); the reference is the suite's single Redis.",
        f"min_replicas=1 costs {fmt(median(wait_us), 1)} µs per acquisition here (the cycle "
        "with the WAIT, less the cycle without): one replication round trip on loopback.",
        "client CPU µs/cycle: this process's CPU time (time.process_time) per cycle, the "
        "Sentinel layer's own cost beside redis:// to the same master.",
    ]
    res.tables.append(table)
    res.raw = {"rate": rate, "wait_us": wait_us, "cpu_us": cpu_us}
    through = median(ratio("sentinel", "single"))
    layer = median(ratio("sentinel", "master"))
    res.goals += [
        Goal("l", "sentinel:// uncontended cycles/s ≥ 0.95 x single Redis", f"{through:.2f} x",
             through >= 0.95),
        Goal("l", "sentinel:// ≥ 0.95 x redis:// to the same master (discovery off the hot path)",
             f"{layer:.2f} x", layer >= 0.95),
        Goal("l", "min_replicas=1: cost of one WAIT per acquisition (measured)",
             f"{median(wait_us):.1f} µs/cycle", None if not wait_us else True),
    ]
    return res
