"""Every contention policy on real prefork and threads workers whose locks are kernel
file locks (file://), a killed task's lock free at once, and the default backend: a
worker on kombu's filesystem broker with no lock setting needs no server at all."""

from __future__ import annotations

import fcntl
import importlib
import os
import struct
import subprocess
import sys
import time
import uuid

import pytest

from celery_singleton_lock import connect
from celery_singleton_lock.backends import file as file_backend
from tests.conftest import wait_until
from tests.integration.processes import ROOT, Worker
from tests.integration.test_worker import count, events_of, max_overlap
from tests.integration.worker_contract import WorkerPolicyContract, policy_worker_on, take_and_release

POOLS = ("prefork", "threads")


@pytest.fixture(scope="module")
def lock_url(tmp_path_factory) -> str:
    return f"file://{tmp_path_factory.mktemp('worker-file-locks')}"


@pytest.fixture(scope="module")
def worker_app(redis_url):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    return importlib.import_module("tests.integration.worker_app")


@pytest.fixture(scope="module", params=POOLS)
def policy_worker(request, redis_url, lock_url, tmp_path_factory):
    pool = request.param
    directory = tmp_path_factory.mktemp(f"worker-file-{pool}")
    with policy_worker_on(lock_url, redis_url, directory, f"file-{pool}", pool=pool) as running:
        yield running


def _hold_is_free(backend, key: str) -> bool:
    """Whether the kernel holds no lock on the key's HOLD byte, asked without taking it
    (``F_OFD_GETLK``): a probe that took the lock would rewrite the record, which the
    worker's main process must still find naming the dead process."""
    fd = os.open(backend.path_of(key), os.O_RDONLY | os.O_CLOEXEC)
    try:
        asked = struct.pack(file_backend._FLOCK, fcntl.F_WRLCK, os.SEEK_SET, file_backend._HOLD, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, asked)
    finally:
        os.close(fd)
    return bool(struct.unpack(file_backend._FLOCK, answer)[0] == fcntl.F_UNLCK)


class TestFileWorker(WorkerPolicyContract):
    """Every policy on prefork and threads workers (threads of one process exclude each
    other: each attempt opens its own open file description)."""

    def test_revoke_terminate_frees_the_lock_and_the_new_child_still_locks(self, policy_worker, observer):
        # Stronger than elsewhere: the kernel frees the lock the moment the child dies,
        # then the main process clears the record that still names the dead process.
        if policy_worker.pool != "prefork":
            pytest.skip("revoke(terminate=True) kills pool processes: prefork only")
        app = policy_worker.app
        run = uuid.uuid4().hex[:12]
        result = policy_worker.send("killable", run)  # lock_ttl=30
        wait_until(lambda: count(policy_worker.events(run), "start") == 1, 20, "the task to start")
        key = app.killable.lock_key_for((run,), {})
        assert observer.acquire(key, ttl=5) is None
        app.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
        killed_at = time.monotonic()
        wait_until(lambda: _hold_is_free(observer, key), 5, "the killed task's lock to be free")
        assert time.monotonic() - killed_at < 2  # the kernel, not its 30 s TTL (a revoke's hops)
        policy_worker.worker.wait_for_log(f"released the lock of {app.killable.name}[{result.id}]", 10)
        assert take_and_release(observer, key)
        after = uuid.uuid4().hex[:12]
        results = [policy_worker.send("sleepy_wait", after, 0.2) for _ in range(4)]
        assert [r.get(timeout=60) for r in results] == ["ran"] * 4
        assert max_overlap(policy_worker.events(after)) == 1


def test_a_sigkilled_worker_frees_its_lock_at_once(worker_app, redis_url, lock_url, tmp_path):
    crashing = Worker(redis_url, tmp_path, queues="file-crash", concurrency=1, CSL_WORKER_LOCK_URL=lock_url)
    run = uuid.uuid4().hex[:12]
    try:
        crashing.wait_ready(worker_app.app)
        worker_app.crashable.apply_async((run,), queue="file-crash")  # lock_ttl=3
        wait_until(lambda: count(events_of(worker_app, run), "start") == 1, 20, "the task to start")
        key = worker_app.crashable.lock_key_for((run,), {})
        backend = connect(lock_url)
        assert backend.acquire(key, ttl=5) is None
        crashing.kill()  # the whole process group (the main process reaped, the child dying)
        killed_at = time.monotonic()
        held = backend.acquire(key, ttl=5, blocking=True, timeout=3)
        assert held is not None
        assert time.monotonic() - killed_at < 0.5  # the kernel freed it, not its 3 s TTL
        backend.release(held)
    finally:
        crashing.stop()


# -- the default backend ---------------------------------------------------------------------

def _default_worker(directory, broker: str) -> Worker:
    return Worker(
        "redis://unused", directory, queues="celery", pool="prefork", concurrency=4,
        app="tests.integration.default_app", CSL_DEFAULT_DIR=str(directory), CSL_DEFAULT_BROKER=broker,
    )


def test_a_filesystem_broker_needs_no_lock_server(tmp_path, monkeypatch):
    monkeypatch.setenv("CSL_DEFAULT_DIR", str(tmp_path))
    monkeypatch.setenv("CSL_DEFAULT_BROKER", "filesystem://")
    for name in ("queue", "control", "results"):
        (tmp_path / name).mkdir()
    default_app = importlib.import_module("tests.integration.default_app")
    worker = _default_worker(tmp_path, "filesystem://")
    try:
        worker.wait_ready()
        run = uuid.uuid4().hex[:12]
        results = [default_app.sleepy.delay(run, 1.5) for _ in range(4)]
        values = [r.get(timeout=30) for r in results]
        assert sorted(values, key=str) == sorted(["ran", None, None, None], key=str)
        events = default_app.events(run)
        assert [e[0] for e in events] == ["start", "end"]  # four processes, one run
        key = default_app.sleepy.lock_key_for((run, 1.5), {})
        assert os.path.exists(connect("file://").path_of(key))  # the embedded default held it
    finally:
        worker.kill()  # (a warm shutdown on the filesystem transport takes Celery ~6-15 s)
    assert default_app.app.conf.get("singleton_lock_backend") is None


def test_a_broker_that_may_serve_several_hosts_stops_the_worker_at_start(tmp_path):
    # Not a silent single-host default: RabbitMQ may feed workers on many hosts.
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "CSL_DEFAULT_DIR": str(tmp_path),
        "CSL_DEFAULT_BROKER": "amqp://guest@127.0.0.1:1//",
    }
    started = time.monotonic()
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.default_app", "worker", "-P", "solo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert worker.returncode != 0
    assert time.monotonic() - started < 30  # before it ever tries the broker
    error = worker.stderr.strip().splitlines()[-1]  # raised while the tasks are bound
    assert error.startswith(
        "celery_singleton_lock.errors.ConfigurationError: singleton_lock_backend is not set"
    )
    assert "file:///" in error
