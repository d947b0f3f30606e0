"""The ZooKeeper backend against a real standalone ZooKeeper (the ensemble's faults are
in test_zookeeper_ensemble.py)."""

from __future__ import annotations

import pytest
from kazoo.client import KazooClient

from celery_singleton_lock import connect
from tests.contract import BackendContract


@pytest.fixture(scope="module")
def zk_url(zookeeper_server):
    return zookeeper_server.url


@pytest.fixture(scope="module")
def raw(zookeeper_server):
    """A plain kazoo client of the same server, to look at and break nodes directly."""
    client = KazooClient(hosts=zookeeper_server.hosts)
    client.start(10)
    yield client
    client.stop()
    client.close()


def _line(backend, raw, key: str) -> list[str]:
    directory = backend._full_key(key)
    if not raw.exists(directory):
        return []
    return sorted(raw.get_children(directory), key=lambda name: name[-10:])


class TestZooKeeperContract(BackendContract):
    expiry_lateness = 0.5

    @pytest.fixture
    def backend(self, zk_url):
        backend = connect(zk_url)
        yield backend
        backend.close()

    @pytest.fixture
    def second_backend(self, zk_url):
        backend = connect(zk_url)
        yield backend
        backend.close()

    @pytest.fixture(autouse=True)
    def _raw(self, raw):
        self.raw = raw

    def expire(self, backend, key):
        directory = backend._full_key(key)
        for name in self.raw.get_children(directory):
            self.raw.delete(f"{directory}/{name}")
