"""A Celery project with a 1-second schedule, meant to run with several beats.

    celery -A proj worker -l info                                               # x2
    celery -A proj beat -S celery_singleton_lock.beat:SingletonScheduler -l info   # x2

``REDIS_URL`` (default ``redis://127.0.0.1:6379``): db 0 broker, 1 results, 2 locks,
3 the list ``ha-beat:runs`` where every run records the slot it was emitted for.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from celery_singleton_lock import SingletonTask

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")

app = Celery("ha_beat", broker=f"{REDIS_URL}/0", backend=f"{REDIS_URL}/1")
app.conf.update(
    singleton_lock_backend=f"{REDIS_URL}/2",
    # A standby takes over at most this long after the leader died (default 30 s).
    singleton_lock_beat_ttl=3,
    beat_schedule={"heartbeat": {"task": "proj.heartbeat", "schedule": 1.0}},
    broker_connection_retry_on_startup=True,
)
runs = redis.Redis.from_url(f"{REDIS_URL}/3")


@app.task(bind=True, name="proj.heartbeat")
def heartbeat(self):
    """Emitted by the leading beat once per second; records its slot."""
    runs.rpush("ha-beat:runs", f"{self.request.singleton_slot} {time.time():.3f}")


@app.task(base=SingletonTask, enqueue_once=True, name="proj.rebuild_report")
def rebuild_report(day):
    """``rebuild_report.delay(day)`` twice before it starts: one message, one result id."""
    time.sleep(2)
    return f"report {day} rebuilt"
