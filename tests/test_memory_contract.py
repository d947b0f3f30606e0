"""The backend contract on the in-process memory backend (unit ring: no server)."""

from __future__ import annotations

import pytest

from celery_singleton_lock.backends.memory import MemoryBackend
from tests.contract import BackendContract


class TestMemoryContract(BackendContract):
    @pytest.fixture
    def backend(self):
        return MemoryBackend("memory://contract", shared=True)

    @pytest.fixture
    def second_backend(self):
        return MemoryBackend("memory://contract", shared=True)

    def expire(self, backend, key):
        backend.expire_now(key)
