"""A Celery app that sets no ``singleton_lock_backend``: its broker decides the default.

``CSL_DEFAULT_BROKER`` is the broker URL (``CSL_DEFAULT_TRANSPORT_OPTIONS``, JSON, adds
to its transport options); with ``filesystem://`` the messages live in ``CSL_DEFAULT_DIR``
(results always do), so the worker needs no server at all. Task bodies append
``["start" | "end", time, pid]`` lines to ``CSL_DEFAULT_DIR/events-<run>``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from celery import Celery
from kombu.transport import filesystem
from kombu.utils.json import dumps

from celery_singleton_lock import Retry, SingletonTask, Wait

DIRECTORY = Path(os.environ["CSL_DEFAULT_DIR"])



def _put_atomically(self, queue, payload, **_):
    # kombu writes a message file after creating it, and a polling worker can read it
    # empty and die (celery/kombu#1551): write it aside, then rename it in.
    name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
    partial = os.path.join(self.data_folder_out, f".{name}.partial")
    with open(partial, "wb") as out:
        out.write(dumps(payload).encode())
    os.rename(partial, os.path.join(self.data_folder_out, name))


filesystem.Channel._put = _put_atomically

app = Celery("csl_default", broker=os.environ["CSL_DEFAULT_BROKER"])
app.conf.update(
    broker_transport_options={
        "data_folder_in": str(DIRECTORY / "queue"),
        "data_folder_out": str(DIRECTORY / "queue"),
        "control_folder": str(DIRECTORY / "control"),
        "polling_interval": 0.05,
        # more for other brokers: a Sentinel broker's {"master_name": ...}
        **json.loads(os.environ.get("CSL_DEFAULT_TRANSPORT_OPTIONS", "{}")),
    },
    result_backend=f"file://{DIRECTORY / 'results'}",
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)


def events(run: str) -> list[list]:
    path = DIRECTORY / f"events-{run}"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _record(run: str, event: str) -> None:
    # One short O_APPEND write per line: lines of several processes never interleave.
    with open(DIRECTORY / f"events-{run}", "a") as out:
        out.write(json.dumps([event, time.time(), os.getpid()]) + "\n")


def _body(run: str, seconds: float) -> str:
    _record(run, "start")
    time.sleep(seconds)
    _record(run, "end")
    return "ran"


# shared=False: a test imports this module afresh for another broker, and shared tasks
# would be registered twice into every app made later (DuplicateTaskNameWarning).
@app.task(base=SingletonTask, shared=False)
def sleepy(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, on_contention=Wait(timeout=30), shared=False)
def sleepy_wait(run: str, seconds: float) -> str:
    return _body(run, seconds)


@app.task(base=SingletonTask, on_contention=Retry(countdown=0.2, max_retries=200, jitter=0.5), shared=False)
def sleepy_retry(run: str, seconds: float) -> str:
    return _body(run, seconds)
