"""(n) Redis Cluster: the uncontended cycle through ``rediscluster://`` beside our single
Redis, same run, and what ``min_replicas=1`` (a WAIT per acquisition) costs.

Redis Clusters of this scenario's own (``testing.RedisCluster``: three masters, then
three masters with a replica each) beside the suite's single Redis. In round 1 three
backends take turns in each repetition, one process, one key, acquire + release:

- our single Redis (the suite's server): the reference;
- ``redis://`` straight to the cluster master that owns the key's slot (a cluster node
  answers a key it owns like any Redis): what the cluster server itself costs;
- ``rediscluster://``: the same master, found through the slot table; the difference to
  the line above is our routing layer's cost.

In round 2, on the cluster with replicas, ``rediscluster://`` takes turns with
``rediscluster://`` and ``min_replicas=1``: every acquisition waits for the master's
replica; the difference is the WAIT's price.
"""

from __future__ import annotations

from typing import Any

from benchmarks.env import Env
from benchmarks.harness import Goal, Rates, ScenarioResult, cycle_table, fmt, median, race_cycles

#: The backends in the order of the table, with their labels.
LABELS = {
    "single": "celery-singleton-lock, one Redis (reference)",
    "node": "redis:// to the cluster master owning the key's slot",
    "cluster": "rediscluster:// (3 masters, routed by slot)",
    "cluster-wait": "rediscluster://, a replica each, min_replicas=1 (round 2)",
}
KEY = "bench:n"
CYCLES = 500
CHUNKS = 4
TTL = 30.0


def run(env: Env, reps: int = 9) -> ScenarioResult:
    from celery_singleton_lock import connect
    from celery_singleton_lock.testing import RedisCluster

    res = ScenarioResult("n", "(n) Redis Cluster: uncontended cycle through rediscluster://")
    reps = env.reps(reps)
    count = CYCLES // (4 if env.quick else 1)

    def race(backends: dict[str, Any]) -> tuple[Rates, Rates]:
        return race_cycles(backends, reps, key=lambda _: KEY, cycles=count, chunks=CHUNKS, ttl=TTL)

    # Round 1, masters only (the reference has no replica either): what routing costs.
    with RedisCluster() as cluster:
        owner = cluster.owner_of(cluster.slot_of("{singleton-lock:" + KEY + "}"))
        backends = {
            "single": connect(env.url), "node": connect(owner.url + "/0"), "cluster": connect(cluster.url),
        }
        try:
            rate, cpu_us = race(backends)
        finally:
            for backend in backends.values():
                backend.close()
    # Round 2, a replica per master: what a WAIT costs, against the same cluster without it.
    with RedisCluster(replicas=1) as cluster:
        backends = {"replicated": connect(cluster.url), "cluster-wait": connect(cluster.url, min_replicas=1)}
        try:
            waits, waits_cpu = race(backends)
        finally:
            for backend in backends.values():
                backend.close()
    rate["cluster-wait"], cpu_us["cluster-wait"] = waits["cluster-wait"], waits_cpu["cluster-wait"]

    def ratio(name: str, to: str) -> list[float]:
        return [a / b for a, b in zip(rate[name], rate[to], strict=True)]

    # The WAIT's price per acquisition: the cycle's time with it, less without it (round 2).
    wait_us = [(1 / w - 1 / c) * 1e6 for w, c in zip(waits["cluster-wait"], waits["replicated"], strict=True)]
    table = cycle_table(res.title, LABELS, rate, cpu_us, "single")
    table.notes += [
        f"one process, one key, {CHUNKS} slices of {CYCLES} acquire+release cycles per "
        f"backend per repetition, backends taking turns, {reps} repetitions; ratios within "
        "each repetition, then the median.",
        "The clusters (three masters; round 2: a replica each) are this scenario's own, on "
        "the same machine (loopback); the reference is the suite's single Redis. The "
        "min_replicas row's ratio is against round 1's reference.",
        f"min_replicas=1 costs {fmt(median(wait_us), 1)} µs per acquisition here (the cycle "
        "with the WAIT, less the cycle without): one replication round trip on loopback.",
        "client CPU µs/cycle: this process's CPU time (time.process_time) per cycle; the "
        "routing layer's own cost is the cluster row less the redis:// row to the same master.",
    ]
    res.tables.append(table)
    res.raw = {"rate": rate, "wait_us": wait_us, "cpu_us": cpu_us}
    through = median(ratio("cluster", "single"))
    layer = median(ratio("cluster", "node"))
    res.goals += [
        Goal("n", "rediscluster:// uncontended cycles/s ≥ 0.9 x single Redis", f"{through:.2f} x",
             through >= 0.9),
        Goal("n", "rediscluster:// ≥ 0.9 x redis:// to the same master (routing off the hot path)",
             f"{layer:.2f} x", layer >= 0.9),
        Goal("n", "min_replicas=1: cost of one WAIT per acquisition (measured)",
             f"{median(wait_us):.1f} µs/cycle", None if not wait_us else True),
    ]
    return res
