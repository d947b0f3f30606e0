"""The project the compose stack runs: two workers and two beats of it (HA beat).

Every URL comes from the environment, with defaults for running it by hand next to a
local Redis and RabbitMQ (and one etcd):

    BROKER_URL   amqp://guest:guest@127.0.0.1:5672//   the broker (RabbitMQ)
    RESULT_URL   redis://127.0.0.1:6379/1              the result backend
    LOCK_URL     etcd://127.0.0.1:2379                 the locks (compose: 3 etcd members)
    METRICS_PORT unset: no /metrics                    a worker's Prometheus port
    QUEUE        celery                                the queue of every task

The beat sends ``rebuild_report`` every second, for a report that takes 5 s to build:
about four calls in five find the lock held and are skipped, whichever worker they reach.
``sync_account`` retries while its account is busy; ``charge`` waits for its invoice.
"""

from __future__ import annotations

import datetime as dt
import os
import time

from celery import Celery

from celery_singleton_lock import Retry, SingletonTask, Wait

app = Celery(
    "proj",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_URL", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    singleton_lock_backend=os.environ.get("LOCK_URL", "etcd://127.0.0.1:2379"),
    singleton_lock_ttl=15,
    # A standby beat takes over at most this long after the leading one died.
    singleton_lock_beat_ttl=10,
    beat_schedule={
        "rebuild-today": {"task": "proj.rebuild_report", "schedule": 1.0},
        "sync-account-7": {"task": "proj.sync_account", "schedule": 3.0, "args": (7,)},
    },
    task_default_queue=os.environ.get("QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
)
if os.environ.get("METRICS_PORT"):
    app.conf.singleton_lock_metrics_port = int(os.environ["METRICS_PORT"])
    app.conf.singleton_lock_metrics_address = os.environ.get("METRICS_ADDRESS", "0.0.0.0")  # noqa: S104


@app.task(base=SingletonTask, name="proj.rebuild_report")
def rebuild_report(day: str | None = None) -> str:
    """One build per day at a time; a second call while it builds is skipped."""
    day = day or dt.date.today().isoformat()
    time.sleep(5)
    return f"report {day} rebuilt"


@app.task(
    base=SingletonTask, name="proj.sync_account", lock_key=("account_id",),
    on_contention=Retry(countdown=2, max_retries=5),
)
def sync_account(account_id: int, full: bool = False) -> int:
    """One sync per account at a time; a busy account is retried 2 s later."""
    time.sleep(4)
    return account_id


@app.task(
    base=SingletonTask, name="proj.charge", lock_key="invoice:{invoice_id}", on_contention=Wait(timeout=60)
)
def charge(invoice_id: int, amount: str) -> str:
    """Charges of one invoice one after another, each waiting for the one before."""
    time.sleep(1)
    return f"charged {amount} on invoice {invoice_id}"
