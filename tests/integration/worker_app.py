"""The Celery app that the integration tests' real workers run.

Every task takes a ``run`` id (unique per test) and records what happened in Redis db 0
under ``events:<run>``: ``["start" | "end", time, pid, extra]``. Signal handlers record
skips and losses the same way (the key of each lost lock goes onto ``lost``), so the
tests can count runs and measure overlap. gevent_app adds its task to this app.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_singleton_lock import Retry, SingletonTask, Skip, Wait, current_lock, singleton_task
from celery_singleton_lock.errors import LockLost
from celery_singleton_lock.signals import lock_contended, lock_lost, task_skipped

URL = os.environ["CSL_WORKER_REDIS_URL"]

app = Celery("csl_it", broker=URL + "/1", backend=URL + "/2")
app.conf.update(
    singleton_lock_backend=os.environ.get("CSL_WORKER_LOCK_URL", URL + "/3"),
    singleton_lock_connect_timeout=1,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    task_track_started=True,
)
# Outage retries, shortened for the tests that stop the lock server.
for _name in ("outage_timeout", "outage_backoff_max"):
    if os.environ.get(f"CSL_WORKER_{_name.upper()}"):
        app.conf[f"singleton_lock_{_name}"] = float(os.environ[f"CSL_WORKER_{_name.upper()}"])
events = redis.Redis.from_url(URL + "/0")


def record(run: str, event: str, extra: Any = None) -> None:
    events.rpush(f"events:{run}", json.dumps([event, time.time(), os.getpid(), extra]))


def _body(run: str, seconds: float) -> str:
    record(run, "start")
    time.sleep(seconds)
    record(run, "end")
    return "ran"


def _until_killed(run: str) -> str:
    """A body that outlives any test: the test kills it (or the task's time limit does)."""
    record(run, "start")
    time.sleep(60)
    return "not killed"


def _retry_once(task: Any, run: str) -> str:
    """A body that retries itself once (``self.retry()``), then runs."""
    record(run, "start", task.request.retries)
    if task.request.retries == 0:
        raise task.retry(countdown=0)
    return f"ran after {task.request.retries} retry"


@task_skipped.connect
def _on_skipped(sender: Any, key: str, task_id: str, **_: Any) -> None:
    run = sender.request.args[0] if sender.request.args else sender.request.kwargs.get("run")
    record(run, "skipped", task_id)


@lock_lost.connect
def _on_lost(sender: Any, key: str, held: Any, reason: str, **_: Any) -> None:
    # In a gevent worker (gevent_app) this runs on the main thread's hub, where this
    # client's sockets live.
    events.rpush("lost", key)


@app.task(base=SingletonTask)
def sleepy_skip(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, on_contention=Wait(timeout=30))
def sleepy_wait(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, on_contention=Retry(countdown=0.2, max_retries=200, jitter=0.5))
def sleepy_retry(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, on_contention="raise")
def sleepy_raise(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, on_contention=Retry(countdown=0.2, max_retries=1) | Skip("retried, skipped"))
def retry_then_skip(run: str) -> str:
    return _body(run, 0)


@singleton_task(app)
def keyed(run: str, a: int, b: int = 2, seconds: float = 1.5) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, lock_ttl=2)
def long_renewing(run: str, seconds: float) -> bool:
    _body(run, seconds)
    held = current_lock()
    return held is not None and not held.lost


@app.task(base=SingletonTask, lock_ttl=1.5)
def watch_loss(run: str) -> str:
    record(run, "start")
    held = current_lock()
    assert held is not None
    deadline = time.monotonic() + 20
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        held.ensure_held()
    except LockLost:
        return "LockLost"
    return "still held"


@app.task(base=SingletonTask, bind=True)
def retry_self(self: Any, run: str) -> str:
    return _retry_once(self, run)


@app.task(base=SingletonTask, lock_ttl=30)
def killable(run: str) -> str:
    return _until_killed(run)


@app.task(base=SingletonTask, lock_ttl=3)
def crashable(run: str) -> str:
    return _until_killed(run)


@app.task(base=SingletonTask, max_retries=1)
def guarded(run: str) -> str:
    record(run, "start")
    return "ran"


@app.task(base=SingletonTask, bind=True, max_retries=1)
def retries_once(self: Any, run: str) -> str:
    """Spends its own single retry: lock-server outages before it must not have."""
    return _retry_once(self, run)


@app.task(base=SingletonTask, lock_ttl=2)
def stubborn(run: str, seconds: float) -> str:
    """Catches a soft revoke (SIGUSR1) and keeps working, as a body may."""
    record(run, "start")
    try:
        time.sleep(60)
    except SoftTimeLimitExceeded:
        record(run, "soft-limit")
        time.sleep(seconds)
    record(run, "end")
    return "finished anyway"


@app.task(base=SingletonTask, lock_ttl=30, time_limit=1.5)
def hard_limited(run: str) -> str:
    return _until_killed(run)


@lock_contended.connect
def _on_contended(sender: Any, key: str, task_id: str, **_: Any) -> None:
    run = sender.request.args[0] if sender.request.args else sender.request.kwargs.get("run")
    record(run, "contended", task_id)


@app.task(base=SingletonTask, throttle=2)
def throttled(run: str, fail: bool = False) -> str:
    record(run, "start")
    record(run, "end")
    if fail:
        raise ValueError("this run fails")
    return "ran"


@app.task(base=SingletonTask, debounce=1, lock_key="debounced:{run}")
def debounced(run: str, n: int) -> int:
    record(run, "start", n)
    record(run, "end", n)
    return n


@app.task(base=SingletonTask, debounce=1, debounce_max_wait=2, lock_key="capped:{run}")
def debounced_capped(run: str, n: int) -> int:
    record(run, "start", n)
    time.sleep(0.3)
    record(run, "end", n)
    return n


@app.task(base=SingletonTask, bind=True, max_retries=1, on_contention=Retry(countdown=0.2, jitter=0))
def contends_then_retries(self: Any, run: str) -> str:
    """Its own budget is one self.retry(); contention retries have Retry()'s own (100)."""
    return _retry_once(self, run)


@app.task(base=SingletonTask, lock_limit=3, on_contention=Wait(timeout=30))
def limited_wait(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, lock_limit=3, on_contention=Retry(countdown=0.2, max_retries=200, jitter=0.5))
def limited_retry(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, lock_limit=3)
def limited_skip(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, throttle=2, on_contention=Wait(timeout=30))
def throttled_wait(run: str) -> str:
    record(run, "start")
    record(run, "end")
    return "ran"


@app.task(base=SingletonTask, lock_limit=3, lock_ttl=30)
def limited_killable(run: str) -> str:
    return _until_killed(run)
