"""The Celery app and tasks behind ``duplicate_jobs.py``.

One task per contention policy. Every task does the same fake work (sleep ~0.4 s) and
keeps score in Redis, so the demo can check from outside what happened inside the
worker:

* ``executed``        how many times a task body ran,
* ``running:<key>``   how many bodies run *right now* for one key (INCR at start,
                      DECR at the end), and ``max_concurrent``, the highest value
                      it ever reached (must stay 1: that is the whole point),
* ``skipped``, ``retried``, ``waited``, counted by signal handlers.

The worker finds its Redis through two environment variables that
``duplicate_jobs.py`` sets: ``DEMO_REDIS_URL`` (a server URL without a db number)
and ``DEMO_RUN_ID`` (a prefix for this run's score keys).
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import redis
from celery import Celery
from celery.signals import task_prerun, task_retry

from celery_singleton_lock import Raise, Retry, SingletonTask, Wait, singleton_task
from celery_singleton_lock.signals import lock_acquired, lock_contended, task_skipped

WORK_SECONDS = 0.4

REDIS_URL = os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379")
RUN_ID = os.environ.get("DEMO_RUN_ID", "manual")

# Four databases on one server, so the demo's keys never mix.
BROKER_DB, RESULTS_DB, LOCKS_DB, SCORE_DB = 0, 1, 2, 3


def redis_db_url(db: int) -> str:
    """``REDIS_URL`` pointing at database ``db``."""
    return urlsplit(REDIS_URL)._replace(path=f"/{db}").geturl()


app = Celery("demo_tasks")
app.conf.update(
    broker_url=redis_db_url(BROKER_DB),
    result_backend=redis_db_url(RESULTS_DB),
    singleton_lock_backend=redis_db_url(LOCKS_DB),  # where the leases live
    task_default_queue=f"csl-demo-{RUN_ID}",  # this run's worker takes this run's calls only
    broker_connection_retry_on_startup=True,
    result_expires=600,
)


# --- the tasks: same body, one contention policy each ---------------------------------

@app.task(base=SingletonTask)  # on_contention="skip" is the default
def skip_job(key: str) -> str:
    return do_work("skip", key)


# singleton_task(app, ...) is a shorthand for app.task(base=SingletonTask, ...).
@singleton_task(app, on_contention=Retry(countdown=0.5, max_retries=40))
def retry_job(key: str) -> str:
    return do_work("retry", key)


# lock_key: a template names the resource itself, here one lock per report.
@app.task(base=SingletonTask, lock_key="report:{key}", on_contention=Wait(timeout=20))
def wait_job(key: str) -> str:
    return do_work("wait", key)


@app.task(base=SingletonTask, on_contention=Raise())
def raise_job(key: str) -> str:
    return do_work("raise", key)


TASKS = {"skip": skip_job, "retry": retry_job, "wait": wait_job, "raise": raise_job}
POLICY_OF_TASK = {task.name: policy for policy, task in TASKS.items()}


# --- the score kept in Redis ------------------------------------------------------------

score = redis.Redis.from_url(redis_db_url(SCORE_DB))


def score_key(policy: str, *parts: str) -> str:
    """``csl-demo:<run>:<policy>[:part...]``: the stats hash, or a per-key counter."""
    return ":".join(["csl-demo", RUN_ID, policy, *parts])


# Atomically: one more body running for this key; count the run; remember the maximum.
# KEYS[1] = the key's "running now" counter, KEYS[2] = the policy's stats hash.
_enter = score.register_script("""
local now = redis.call('INCR', KEYS[1])
redis.call('HINCRBY', KEYS[2], 'executed', 1)
local max = tonumber(redis.call('HGET', KEYS[2], 'max_concurrent') or '0')
if now > max then redis.call('HSET', KEYS[2], 'max_concurrent', now) end
return now
""")


def do_work(policy: str, key: str) -> str:
    running = score_key(policy, "running", key)
    _enter(keys=[running, score_key(policy)])
    try:
        time.sleep(WORK_SECONDS)  # the "work"
    finally:
        score.decr(running)
    return f"done {key}"


def count(sender: object, field: str) -> None:
    """Add one to ``field`` in the stats of the policy whose task sent a signal."""
    policy = POLICY_OF_TASK.get(getattr(sender, "name", ""))
    if policy is not None:
        score.hincrby(score_key(policy), field, 1)


# --- signal handlers: they run in the worker's child processes --------------------------

# Task ids that found their lock taken during the current run of this process. A Wait
# task that then acquires the lock has *waited*; one that skips, retries or raises has not.
_contended: set[str] = set()


@task_prerun.connect
def _new_run(task_id: str, **_: object) -> None:
    _contended.discard(task_id)  # a retried task comes back with the same id


@lock_contended.connect
def _on_contended(sender: object, key: str, task_id: str, **_: object) -> None:
    _contended.add(task_id)


@lock_acquired.connect
def _on_acquired(sender: object, key: str, **_: object) -> None:
    task_id = getattr(getattr(sender, "request", None), "id", None)
    if task_id in _contended:
        _contended.discard(task_id)
        count(sender, "waited")


@task_skipped.connect
def _on_skipped(sender: object, key: str, task_id: str, **_: object) -> None:
    count(sender, "skipped")


@task_retry.connect
def _on_retry(sender: object, **_: object) -> None:
    count(sender, "retried")
