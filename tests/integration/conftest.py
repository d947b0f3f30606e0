"""Real servers for the integration ring, started once per session, stopped by PID.

``CSL_REDIS_URL`` points the suite at an existing Redis instead (its db 0-6 are used);
etcd always runs as our own single member (``etcd_server`` from our pytest plugin).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from celery_singleton_lock.testing import EtcdCluster, RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    existing = os.environ.get("CSL_REDIS_URL")
    if existing:
        yield existing.rstrip("/")
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url + "/0")
    yield client
    client.close()


@pytest.fixture(scope="session")
def etcd_url(etcd_server: EtcdCluster) -> str:
    return etcd_server.url
