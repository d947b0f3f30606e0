"""(m) 1,000,000 distinct signatures, each locked and released once: what stays on the server.

A Celery task run once per new argument set (a signature seen once) takes and releases a
lock of its own key. On a redis-server of this scenario's own, one process does that for
1,000,000 distinct keys of the length SingletonTask derives (task name + sha256), with the
default TTL (60 s), and ``INFO memory`` ``used_memory`` is read before and right after the
last release: nothing may wait for a TTL to go away. Not extrapolated: every key is run.
"""

from __future__ import annotations

import hashlib
import time

import redis

from benchmarks.env import Env
from benchmarks.harness import Goal, ScenarioResult, Table, fmt

KEYS = 1_000_000
TTL = 60.0
#: The goal: at most this much server memory left behind by the whole run.
LIMIT_MB = 50.0


def run(env: Env) -> ScenarioResult:
    from celery_singleton_lock import connect
    from celery_singleton_lock.testing import RedisServer

    res = ScenarioResult("m", "(m) 1,000,000 signatures run once: server memory left behind")
    keys = 20_000 if env.quick else KEYS
    with RedisServer() as server:
        url = server.url + "/0"
        client = redis.Redis.from_url(url)
        backend = connect(url)
        for i in range(100):  # connection, script cache, allocator warmed up
            backend.release(backend.acquire(f"warm:{i}", ttl=TTL))
        before = client.info("memory")["used_memory"]
        started = time.monotonic()
        for i in range(keys):
            digest = hashlib.sha256(b"%d" % i).hexdigest()
            held = backend.acquire(f"bench.noop_singleton:{digest}", ttl=TTL)
            if held is None:
                raise RuntimeError(f"key {i} was taken: distinct keys must be free")
            backend.release(held)
        seconds = time.monotonic() - started
        after = client.info("memory")["used_memory"]
        left_keys = client.dbsize()
        backend.close()
        client.close()
    left_mb = (after - before) / 1e6
    table = Table(res.title, ["keys run", "run s", "cycles/s", "used_memory before MB",
                              "after MB", "left behind MB", "keys left"])
    table.add(f"{keys:,}", fmt(seconds, 1), fmt(keys / seconds, 0), fmt(before / 1e6),
              fmt(after / 1e6), fmt(left_mb), f"{left_keys:,}")
    table.notes += [
        f"one process, keys 'bench.noop_singleton:<sha256>' under the default prefix, ttl "
        f"{TTL:.0f} s, each acquired and released once; redis-server of its own; "
        "used_memory read before the first and right after the last release.",
        "A release leaves nothing: no fencing counter (the token is the server's clock) and "
        "no signal list where nobody waited.",
    ]
    res.tables.append(table)
    res.goals.append(Goal(
        "m", f"{KEYS:,} signatures run once leave ≤ {LIMIT_MB:.0f} MB on the server",
        f"{left_mb:.2f} MB, {left_keys:,} keys after {keys:,}",
        None if env.quick else left_mb <= LIMIT_MB,
    ))
    res.raw = {"keys": keys, "seconds": seconds, "used_memory_before": before,
               "used_memory_after": after, "keys_left": left_keys}
    return res
