"""A pytest plugin of ``.ci/matrix`` only: the test process ends once pytest has reported.

With Celery 5.3, the results of the worker tests, collected after their Redis stopped,
try to reconnect in ``AsyncResult.__del__`` for minutes (Celery 5.7 does not); nothing the
pair is run for happens after the report, so the process does not wait for them.
"""

from __future__ import annotations

import os
import sys

import pytest

_status = 0


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _status  # noqa: PLW0603 - one value handed from one hook to the next
    _status = int(exitstatus)


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status)
