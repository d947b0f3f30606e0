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

from benchmarks.env import Env
from benchmarks.harness import Goal, ScenarioResult, cycle_table, fmt, median, race_cycles

#: The backends in the order of the table, with their labels.
LABELS = {
    "single": "celery-singleton-lock, one Redis (reference)",
    "master": "redis:// to the Sentinel setup's master (replicated)",
    "sentinel": "sentinel:// (master found through 3 Sentinels)",
    "sentinel-wait": "sentinel://, min_replicas=1 (WAIT 1 per acquisition)",
}
CYCLES = 500
CHUNKS = 4
TTL = 30.0


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
            count = CYCLES // (4 if env.quick else 1)
            rate, cpu_us = race_cycles(
                backends, reps, key=lambda name: f"bench:l:{name}", cycles=count, chunks=CHUNKS, ttl=TTL
            )
        finally:
            for backend in backends.values():
                backend.close()

    def ratio(name: str, to: str) -> list[float]:
        return [a / b for a, b in zip(rate[name], rate[to], strict=True)]

    # The WAIT's price per acquisition: the cycle's time with it, less without it.
    wait_us = [
        (1 / w - 1 / s) * 1e6 for w, s in zip(rate["sentinel-wait"], rate["sentinel"], strict=True)
    ]
    table = cycle_table(res.title, LABELS, rate, cpu_us, "single")
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
