"""The app of the ``celery locks`` command-line tests: ``celery -A tests.integration.cli_app``.

``CSL_CLI_BACKEND`` is its lock server (``CSL_CLI_CONNECT_TIMEOUT`` its connect timeout);
the tests build the same app in their own process with :func:`make_app` and run its
task eagerly, so the command sees a lock taken by a real task call.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from celery import Celery

from celery_singleton_lock import SingletonTask, current_lock

#: The lock TTL of the tasks: short, so that a holder sees a release within 1.4 s (a
#: third of it), and longer than a command's start, so that Redis still has the grant's
#: fencing counter when the command looks (it lives one TTL after the grant).
LOCK_TTL = 4.0


def make_app(backend_url: str, connect_timeout: float = 5.0) -> Celery:
    """An app whose ``cli.report`` task, while it runs, puts its lock on ``app.running``
    and waits for ``app.stop``."""
    app = Celery("csl_cli", broker="memory://", set_as_current=False)
    app.conf.update(
        singleton_lock_backend=backend_url,
        singleton_lock_connect_timeout=connect_timeout,
        task_always_eager=True,
    )
    app.running = queue.Queue()  # type: ignore[attr-defined]
    app.stop = threading.Event()  # type: ignore[attr-defined]

    @app.task(base=SingletonTask, name="cli.report", lock_ttl=LOCK_TTL, shared=False)
    def report(account_id: Any, full: bool = False) -> bool:
        held = current_lock()
        app.running.put(held)  # type: ignore[attr-defined]
        app.stop.wait(30)  # type: ignore[attr-defined]
        return bool(held is not None and held.lost)

    return app


app = make_app(
    os.environ.get("CSL_CLI_BACKEND", "memory://"),
    float(os.environ.get("CSL_CLI_CONNECT_TIMEOUT", "5")),
)
