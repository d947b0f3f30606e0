"""(n) Redis Cluster: the uncontended cycle through ``rediscluster://`` beside our single
Redis, same run.

A Redis Cluster of this scenario's own (three masters, no replicas, ``testing.RedisCluster``)
beside the suite's single Redis. Three backends take turns in each repetition, one
process, one key each, acquire + release:

- our single Redis (the suite's server): the reference;
- ``redis://`` straight to the cluster master that owns the key's slot (a cluster node
  answers a key it owns like any Redis): what the cluster server itself costs;
- ``rediscluster://``: the same master, found through the slot table; the difference to
  the line above is our routing layer's cost.

``min_replicas`` is not offered for a cluster (docs/cluster.md says why), so no WAIT is
measured here; scenario (l) measures it behind Sentinel.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import Goal, ScenarioResult, Table, fmt, median, rotate, spread

BACKENDS = ["single", "node", "cluster"]
LABELS = {
    "single": "celery-singleton-lock, one Redis (reference)",
    "node": "redis:// to the cluster master owning the key's slot",
    "cluster": "rediscluster:// (3 masters, routed by slot)",
}
KEY = "bench:n"
CYCLES = 500
CHUNKS = 4
TTL = 30.0


def _cycles(backend: Any, n: int) -> None:
    for _ in range(n):
        held = backend.acquire(KEY, TTL)
        if held is None:
            raise RuntimeError(f"uncontended acquire of {KEY!r} failed")
        backend.release(held)


def run(env: Env, reps: int = 9) -> ScenarioResult:
    from celery_singleton_lock import connect
    from celery_singleton_lock.testing import RedisCluster

    res = ScenarioResult("n", "(n) Redis Cluster: uncontended cycle through rediscluster://")
    reps = env.reps(reps)
    with RedisCluster() as cluster:
        owner = cluster.owner_of(cluster.slot_of("{singleton-lock:" + KEY + "}"))
        backends = {
            "single": connect(env.url),
            "node": connect(owner.url + "/0"),
            "cluster": connect(cluster.url),
        }
        try:
            rate: dict[str, list[float]] = {name: [] for name in BACKENDS}
            cpu_us: dict[str, list[float]] = {name: [] for name in BACKENDS}
            for backend in backends.values():
                _cycles(backend, 100)  # warm-up: connections, scripts, the slot table
            for rep in range(reps):
                elapsed = dict.fromkeys(BACKENDS, 0.0)
                cpu = dict.fromkeys(BACKENDS, 0.0)
                done = dict.fromkeys(BACKENDS, 0)
                for chunk in range(CHUNKS):
                    for name in rotate(BACKENDS, rep + chunk):
                        count = CYCLES // (4 if env.quick else 1)
                        gc.collect()
                        started, cpu_started = time.perf_counter(), time.process_time()
                        _cycles(backends[name], count)
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
        f"one process, one key, {CHUNKS} slices of {CYCLES} acquire+release cycles per "
        f"backend per repetition, backends taking turns, {reps} repetitions; ratios within "
        "each repetition, then the median.",
        "The cluster (three masters, no replicas) is this scenario's own, on the same "
        "machine (loopback); the reference is the suite's single Redis.",
        "client CPU µs/cycle: this process's CPU time (time.process_time) per cycle; the "
        "routing layer's own cost is the cluster row less the redis:// row to the same master.",
    ]
    res.tables.append(table)
    res.raw = {"rate": rate, "cpu_us": cpu_us}
    through = median(ratio("cluster", "single"))
    layer = median(ratio("cluster", "node"))
    res.goals += [
        Goal("n", "rediscluster:// uncontended cycles/s ≥ 0.9 x single Redis", f"{through:.2f} x",
             through >= 0.9),
        Goal("n", "rediscluster:// ≥ 0.9 x redis:// to the same master (routing off the hot path)",
             f"{layer:.2f} x", layer >= 0.9),
    ]
    return res
