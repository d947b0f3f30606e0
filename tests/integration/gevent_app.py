"""The Celery app that the gevent worker of tests/integration/test_worker_gevent.py runs.

Its task spins on the CPU without yielding to the gevent hub (no sleep, no I/O), then
naps. Events go to Redis db 0 under ``events:<run>`` as ``[event, time, extra]``; the
``lock_lost`` receiver pushes the key onto ``lost``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_singleton_lock import SingletonTask, current_lock
from celery_singleton_lock.signals import lock_lost

URL = os.environ["CSL_WORKER_REDIS_URL"]

app = Celery("csl_gevent", broker=URL + "/1", backend=URL + "/2")
app.conf.update(
    singleton_lock_backend=os.environ.get("CSL_WORKER_LOCK_URL", URL + "/3"),
    singleton_lock_connect_timeout=1,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    task_track_started=True,
)
events = redis.Redis.from_url(URL + "/0")


def record(run: str, event: str, extra: Any = None) -> None:
    events.rpush(f"events:{run}", json.dumps([event, time.time(), extra]))


@lock_lost.connect
def _on_lost(sender: Any, key: str, held: Any, reason: str, **_: Any) -> None:
    # Runs on the worker's main thread (a greenlet), where this client's sockets live.
    events.rpush("lost", key)


@app.task(base=SingletonTask, lock_ttl=2)
def spin_then_nap(run: str, spin: float, nap: float) -> dict[str, Any]:
    """Burn the CPU for ``spin`` seconds without one switch to the hub, then sleep
    (yielding to it) for ``nap`` seconds; say whether the lock was still ours at the end."""
    held = current_lock()
    assert held is not None
    record(run, "start")
    end = time.monotonic() + spin
    while time.monotonic() < end:
        pass
    record(run, "spun")
    time.sleep(nap)  # gevent's sleep: the hub runs
    return {"lost": held.lost, "reason": held.lost_reason}
