"""The Celery app and tasks behind ``duplicate_jobs.py``.

One task per contention policy. Every task does the same fake work (sleep ~0.4 s) and
keeps score in a SQLite file, so the demo can check from outside what happened inside the
worker:

* ``executed``          how many times a task body ran,
* ``running:<key>``     how many bodies run *right now* for one key (one more at start,
                        one less at the end), and ``max_concurrent``, the highest value it
                        ever reached (must stay 1: that is the whole point),
* ``skipped``, ``retried``, ``waited``, counted by signal handlers.

No server is needed: the broker is kombu's ``filesystem://`` transport and results are
files, all in ``DEMO_DIR``. The app sets no ``singleton_lock_backend``, so the locks take
the default for a broker that serves one host: ``file://``, kernel file locks. With
``DEMO_LOCK_URL`` set (``make demo BACKEND=redis``...), the locks live on that server.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path

from celery import Celery
from celery.signals import task_prerun, task_retry
from kombu.transport import filesystem
from kombu.utils.json import dumps

from celery_singleton_lock import Raise, Retry, SingletonTask, Wait, singleton_task
from celery_singleton_lock.signals import lock_acquired, lock_contended, task_skipped

WORK_SECONDS = 0.4

DIRECTORY = Path(os.environ.get("DEMO_DIR", "/tmp/csl-demo"))
RUN_ID = os.environ.get("DEMO_RUN_ID", "manual")
SCORE = DIRECTORY / "score.sqlite"



def _put_atomically(self: filesystem.Channel, queue: str, payload: object, **_: object) -> None:
    """kombu's ``_put`` creates the message file, then writes it: a worker polling the
    folder in between reads it empty and dies (celery/kombu#1551). Write it under a name
    no queue matches, then rename it in: a rename is atomic."""
    name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
    partial = os.path.join(self.data_folder_out, f".{name}.partial")
    with open(partial, "wb") as out:
        out.write(dumps(payload).encode())
    os.rename(partial, os.path.join(self.data_folder_out, name))


filesystem.Channel._put = _put_atomically

app = Celery("demo_tasks", broker="filesystem://")
app.conf.update(
    broker_transport_options={
        "data_folder_in": str(DIRECTORY / "queue"),
        "data_folder_out": str(DIRECTORY / "queue"),
        "control_folder": str(DIRECTORY / "control"),
        "polling_interval": 0.05,  # kombu's default (1 s) would make every retry slow
    },
    result_backend=f"file://{DIRECTORY / 'results'}",
    task_default_queue=f"csl-demo-{RUN_ID}",  # this run's worker takes this run's calls only
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
if os.environ.get("DEMO_LOCK_URL"):
    app.conf.singleton_lock_backend = os.environ["DEMO_LOCK_URL"]


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


# --- the score, in SQLite ---------------------------------------------------------------

def create_score() -> None:
    """Make the score table (the demo does it once, before the worker starts)."""
    with sqlite3.connect(SCORE) as db:
        db.execute("CREATE TABLE IF NOT EXISTS score (name TEXT PRIMARY KEY, value INTEGER)")


def _add(db: sqlite3.Connection, name: str, by: int) -> int:
    db.execute(
        "INSERT INTO score VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
        (name, by, by),
    )
    return int(db.execute("SELECT value FROM score WHERE name = ?", (name,)).fetchone()[0])


def add(name: str, by: int = 1) -> int:
    """Add ``by`` to the counter ``name`` (across processes: one SQLite transaction)."""
    with sqlite3.connect(SCORE, timeout=30, isolation_level=None) as db:
        db.execute("BEGIN IMMEDIATE")  # the write lock first: read-modify-write is atomic
        try:
            value = _add(db, name, by)
        finally:
            db.execute("COMMIT")
    return value


def stats(policy: str) -> dict[str, int]:
    """The counters of ``policy`` (``executed``, ``max_concurrent``...)."""
    with sqlite3.connect(SCORE, timeout=30) as db:
        rows = db.execute("SELECT name, value FROM score WHERE name LIKE ?", (f"{policy}:%",))
        return {name.split(":", 1)[1]: value for name, value in rows}


def do_work(policy: str, key: str) -> str:
    with sqlite3.connect(SCORE, timeout=30, isolation_level=None) as db:
        # Atomically: one more body running for this key; count the run; keep the maximum.
        db.execute("BEGIN IMMEDIATE")
        try:
            now = _add(db, f"{policy}:running:{key}", 1)
            _add(db, f"{policy}:executed", 1)
            db.execute(
                "INSERT INTO score VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = max(value, ?)",
                (f"{policy}:max_concurrent", now, now),
            )
        finally:
            db.execute("COMMIT")
    try:
        time.sleep(WORK_SECONDS)  # the "work"
    finally:
        add(f"{policy}:running:{key}", -1)
    return f"done {key}"


def count(sender: object, field: str) -> None:
    """Add one to ``field`` in the score of the policy whose task sent a signal."""
    policy = POLICY_OF_TASK.get(getattr(sender, "name", ""))
    if policy is not None:
        add(f"{policy}:{field}")


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
