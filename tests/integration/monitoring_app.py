"""worker_app's app and tasks, with lock metrics served on ``CSL_WORKER_METRICS_PORT``
(tests/integration/test_worker_monitoring.py)."""

from __future__ import annotations

import os

from tests.integration.worker_app import app

__all__ = ["app"]

app.conf.singleton_lock_metrics_port = os.environ.get("CSL_WORKER_METRICS_PORT")
