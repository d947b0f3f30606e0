"""The Celery app of the HA-beat and enqueue-once integration tests.

Beats and workers run it as real processes. Redis databases of the test server: 0 events
(shared with worker_app, keys of our own), 4 broker, 5 results, 6 locks; so these tests
never meet worker_app's messages.

* ``scheduled`` is what the beats emit every second; it records the slot it was emitted
  for (the ``singleton_slot`` header) in ``beat:<run>``. It is a plain task: a slot
  emitted twice would run twice, which is what the tests look for.
* The beat processes record every leadership they win in ``beat-leaders:<run>``.
* ``queued_*`` tasks use ``enqueue_once``; the ``once-idle`` queue has no consumer until a
  test asks a worker to consume it, and ``once-lost`` never has one, so messages stay
  countable in the broker.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_singleton_lock import SingletonTask
from celery_singleton_lock.beat import SLOT_HEADER
from celery_singleton_lock.signals import lock_acquired

URL = os.environ["CSL_WORKER_REDIS_URL"]
RUN = os.environ.get("CSL_BEAT_RUN", "none")
IDLE_QUEUE = "once-idle"
#: Never consumed: its messages are "lost" by the tests.
LOST_QUEUE = "once-lost"

app = Celery("csl_beat_it", broker=URL + "/4", backend=URL + "/5")
app.conf.update(
    singleton_lock_backend=URL + "/6",
    singleton_lock_connect_timeout=1,
    singleton_lock_beat_ttl=float(os.environ.get("CSL_BEAT_TTL", "2")),
    beat_schedule={"every-second": {"task": "csl_beat_it.scheduled", "schedule": 1.0, "args": (RUN,)}},
    task_routes={
        "csl_beat_it.queued_short": {"queue": LOST_QUEUE},
        "csl_beat_it.queued_*": {"queue": IDLE_QUEUE},
    },
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    task_track_started=True,
)
events = redis.Redis.from_url(URL + "/0")


def record(name: str, *values: Any) -> None:
    events.rpush(name, json.dumps([time.time(), os.getpid(), *values]))


@lock_acquired.connect
def _on_acquired(sender: Any, key: str, held: Any, **_: Any) -> None:
    if key.startswith("leader:"):
        record(f"beat-leaders:{RUN}", held.fencing_token)


@app.task(bind=True, name="csl_beat_it.scheduled")
def scheduled(self: Any, run: str) -> None:
    record(f"beat:{run}", getattr(self.request, SLOT_HEADER, None), self.request.id)


@app.task(base=SingletonTask, bind=True, enqueue_once=True, name="csl_beat_it.queued_report")
def queued_report(self: Any, run: str, day: int) -> str:
    record(f"once:{run}", "start", self.request.id)
    events.blpop([f"go:{run}:{day}"], timeout=4)  # runs until the test lets it finish (or 4 s)
    return str(self.request.id)


@app.task(base=SingletonTask, enqueue_once=True, enqueue_once_ttl=1.5, name="csl_beat_it.queued_short")
def queued_short(run: str) -> None:
    record(f"once:{run}", "start")


@app.task(base=SingletonTask, bind=True, enqueue_once=True, name="csl_beat_it.once_retrying")
def once_retrying(self: Any, run: str) -> str:
    record(f"once:{run}", "start", self.request.id, self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return f"ran after {self.request.retries} retry"
