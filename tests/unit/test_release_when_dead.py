"""The main process frees a killed pool process's lock only once that process is dead,
and only the lock that very process held (host, pid and task id)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.backends.owner import HOST, Owner
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.request import release_when_dead
from tests.conftest import wait_until


@pytest.fixture
def child():
    # A real process standing for a pool child: pidfds watch real processes only.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def held_by(backend: MemoryBackend, key: str, owner: Owner) -> None:
    held = backend.acquire(key, ttl=30, owner=owner)
    assert held is not None
    LeaseKeeper.for_process().untrack(held)  # its "process" renews nothing here


def test_the_lock_stays_while_the_process_lives_and_goes_when_it_dies(child, caplog):
    caplog.set_level(logging.INFO, "celery_singleton_lock.release")
    backend = MemoryBackend()
    owner = Owner(host=HOST, pid=child.pid, task_id="task-1")
    held_by(backend, "k", owner)
    assert release_when_dead(backend, "k", owner, "t[task-1]") is True
    # A soft revoke: the process lives on, so does its body: the lock stays with it.
    with pytest.raises(AssertionError):
        wait_until(lambda: backend.acquire("k", ttl=1) is not None, 0.3, "must not happen")
    child.kill()
    wait_until(lambda: "released the lock of t[task-1]" in caplog.text, 5, "release at death")
    probe = backend.acquire("k", ttl=1)
    assert probe is not None
    probe.release()


def test_a_dead_process_never_frees_a_lock_held_under_its_task_id_elsewhere(child):
    # A redelivered copy of task-1 holds the lock in another process: when our copy's
    # process dies, that lock is not ours to free.
    backend = MemoryBackend()
    held_by(backend, "k", Owner(host=HOST, pid=1, task_id="task-1"))
    dead = Owner(host=HOST, pid=child.pid, task_id="task-1")
    release_when_dead(backend, "k", dead, "t[task-1]")
    child.kill()
    child.wait()
    # The watch has seen the death once a later watch (queued behind it) is served.
    marker = Owner(host=HOST, pid=child.pid, task_id="marker")
    held_by(backend, "m", marker)
    release_when_dead(backend, "m", marker, "t[marker]")
    wait_until(lambda: backend.acquire("m", ttl=1) is not None, 5, "the later watch")
    assert backend.acquire("k", ttl=1) is None  # still the other copy's
