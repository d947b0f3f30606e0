"""The task that the gevent worker of tests/integration/test_worker_gevent.py runs, on the
app (configuration, ``events``, ``record`` and the ``lock_lost`` receiver) of worker_app.

Its task spins on the CPU without yielding to the gevent hub (no sleep, no I/O), then
naps.
"""

from __future__ import annotations

import time
from typing import Any

from celery_singleton_lock import SingletonTask, current_lock
from tests.integration.worker_app import app, events, record

__all__ = ["app", "events", "spin_then_nap"]


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
