"""worker_app's tasks on a RabbitMQ broker: results, locks and events stay on Redis.

``CSL_WORKER_AMQP_URL`` is the broker (the test's RabbitMQ, or a proxy in front of it),
``CSL_WORKER_AMQP_QUEUE`` the one queue, deleted by RabbitMQ when its last consumer goes.
The task names are worker_app's, so the worker policy contract runs on it unchanged.
``long_acks_late`` is acknowledged after its body: RabbitMQ redelivers it when the
consumer's connection is lost, not after a visibility timeout.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Queue

from celery_singleton_lock import Retry, SingletonTask, Wait
from tests.integration.worker_app import _body, events, record

URL = os.environ["CSL_WORKER_REDIS_URL"]
__all__ = ["app", "events"]

app = Celery("csl_amqp_it", broker=os.environ["CSL_WORKER_AMQP_URL"], backend=URL + "/2")
app.conf.update(
    singleton_lock_backend=URL + "/3",
    singleton_lock_connect_timeout=1,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    task_track_started=True,
    task_queues=[Queue(os.environ["CSL_WORKER_AMQP_QUEUE"], auto_delete=True)],
    task_default_queue=os.environ["CSL_WORKER_AMQP_QUEUE"],
)


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


@app.task(base=SingletonTask, lock_ttl=30)
def killable(run: str) -> str:
    record(run, "start")
    time.sleep(60)
    return "not killed"


@app.task(base=SingletonTask, acks_late=True, lock_ttl=2)
def long_acks_late(run: str, seconds: float) -> str:
    return _body(run, seconds)
