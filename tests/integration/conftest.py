"""Real servers for the integration ring, started once per session, stopped by PID.

``CSL_REDIS_URL`` points the suite at an existing Redis instead (its db 0-6 are used);
etcd always runs as our own single member (``etcd_server`` from our pytest plugin).
PostgreSQL: ``CSL_POSTGRES_URL``, else the server on 127.0.0.1:5432 (database ``test``)
when it answers, else one of our own; each test works in a schema of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from celery_singleton_lock.testing import EtcdCluster, PostgresServer, RedisCluster, RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    existing = os.environ.get("CSL_REDIS_URL")
    if existing:
        yield existing.rstrip("/")
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One Redis Cluster of our own for the session: three masters, a replica each."""
    with RedisCluster(replicas=1) as cluster:
        yield cluster


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url + "/0")
    yield client
    client.close()


@pytest.fixture(scope="session")
def etcd_url(etcd_server: EtcdCluster) -> str:
    return etcd_server.url


#: The PostgreSQL server of a development machine (trust authentication), used when it answers.
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    existing = os.environ.get("CSL_POSTGRES_URL")
    if existing:
        yield existing
        return
    import psycopg

    try:
        psycopg.connect(LOCAL_POSTGRES_URL, connect_timeout=2).close()
    except psycopg.Error:
        with PostgresServer() as server:
            yield server.url
    else:
        yield LOCAL_POSTGRES_URL
