"""The Celery app of scenario (f): one no-op task, as a plain task and as a SingletonTask.

Both variants share one body, so they differ only in the base class. Each call INCRs a
per-run counter; the call that brings it to ``n`` pushes a done signal that the
benchmark waits on with BLPOP (no polling). The broker, the lock backend and the
counter all live on the redis-server the benchmark started (``BENCH_REDIS_URL``).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:1/0")
READY_LIST = "bench:f:worker-ready"

app = Celery("bench", broker=URL)
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_redirect_stdouts=False,
    singleton_lock_backend=URL,
)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client  # one client per pool process, made after the fork  # noqa: PLW0603
    if _client is None:
        _client = redis.Redis.from_url(URL)
    return _client


def _count(run_id: str, n: int) -> None:
    client = _redis()
    if client.incr(f"bench:f:count:{run_id}") == n:
        client.rpush(f"bench:f:done:{run_id}", 1)


@app.task(name="bench.noop_plain")
def noop_plain(i: int, run_id: str, n: int) -> None:
    _count(run_id, n)


try:
    from celery_singleton_lock import SingletonTask
except ImportError:  # the library under test is missing: only the plain task exists
    SingletonTask = None


if SingletonTask is not None:

    @app.task(name="bench.noop_singleton", base=SingletonTask)
    def noop_singleton(i: int, run_id: str, n: int) -> None:
        _count(run_id, n)


@worker_ready.connect
def _announce(**_: Any) -> None:
    redis.Redis.from_url(URL).rpush(READY_LIST, os.getpid())
