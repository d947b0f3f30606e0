"""Shared test set-up. Unit tests need nothing; integration tests start their own servers."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest


def wait_until(predicate: Callable[[], object], timeout: float, message: str) -> None:
    """Wait for ``predicate`` to hold, re-checking on a short tick; fail after ``timeout``."""
    done = threading.Event()
    deadline = timeout
    step = 0.02
    while deadline > 0:
        if predicate():
            return
        done.wait(step)
        deadline -= step
    raise AssertionError(f"timed out after {timeout}s waiting for: {message}")


@pytest.fixture
def unique_key(request: pytest.FixtureRequest) -> str:
    """A lock key no other test uses."""
    return f"{request.node.name[:40]}:{uuid.uuid4().hex[:8]}"
