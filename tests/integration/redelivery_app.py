"""A Celery app whose broker really redelivers: ``acks_late`` tasks and a visibility
timeout shorter than the tasks (Redis transport), swept every second.

Its own broker database (7), so its short visibility timeout never restores the
messages of the other test apps. Events are recorded like worker_app's.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from celery_singleton_lock import SingletonTask
from tests.integration.worker_app import events, record

URL = os.environ["CSL_WORKER_REDIS_URL"]
VISIBILITY_TIMEOUT = 1.5
__all__ = ["app", "events", "long_acks_late"]

app = Celery("csl_redelivery_it", broker=URL + "/7", backend=URL + "/2")
app.conf.update(
    singleton_lock_backend=URL + "/3",
    singleton_lock_connect_timeout=1,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 0.5,
        "unacked_restore_throttle": 1,
    },
    result_expires=600,
    task_acks_late=True,
)


@app.task(base=SingletonTask)
def long_acks_late(run: str, seconds: float) -> str:
    record(run, "start")
    time.sleep(seconds)
    record(run, "end")
    return "ran"
