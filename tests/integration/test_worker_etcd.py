"""Every contention policy, unchanged, on a real prefork worker whose locks live in etcd."""

from __future__ import annotations

import pytest

from tests.integration.worker_contract import WorkerPolicyContract, policy_worker_on

QUEUE = "etcd"


@pytest.fixture(scope="module")
def lock_url(etcd_url):
    return etcd_url


@pytest.fixture(scope="module")
def policy_worker(redis_url, lock_url, tmp_path_factory):
    with policy_worker_on(lock_url, redis_url, tmp_path_factory.mktemp("worker-etcd"), QUEUE) as running:
        yield running


class TestEtcdWorker(WorkerPolicyContract):
    """Every policy; the main process releases a killed run's lock with a gRPC client of
    its own, and the replacement child still reaches etcd."""
