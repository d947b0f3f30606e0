"""compose/: the stack is never started here (no Docker), so what can be checked is: the
file parses with the services it promises, each etcd member's flags are flags of the etcd
we test with, and the commands of the workers, beats and ``celery locks`` run, outside
containers, against servers of ours (etcd, Redis) and the RabbitMQ of the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import yaml

from celery_singleton_lock.testing import etcd_binary, free_port
from tests.conftest import wait_until
from tests.integration.test_worker_rabbitmq import amqp_url  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
APP_SERVICES = {"worker1", "worker2", "beat1", "beat2", "flower"}


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]


def test_the_stack_has_every_service_it_promises(services) -> None:
    assert set(services) == {"redis", "rabbitmq", "etcd1", "etcd2", "etcd3", *APP_SERVICES}
    for name in APP_SERVICES:
        assert services[name]["build"]["dockerfile"] == "compose/Dockerfile"
        assert services[name]["command"][:3] == ["celery", "-A", "proj"]
        assert services[name]["environment"]["LOCK_URL"] == "etcd://etcd1:2379,etcd2:2379,etcd3:2379"
    beats = [services[name]["command"] for name in ("beat1", "beat2")]
    assert beats[0] == beats[1]
    assert "celery_singleton_lock.beat:SingletonScheduler" in beats[0]


def test_the_etcd_members_form_one_cluster_with_flags_our_etcd_knows(services) -> None:
    help_text = subprocess.run(
        [etcd_binary(), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    known = set(re.findall(r"--[a-z-]+", help_text.stdout + help_text.stderr))
    clusters = set()
    for name in ("etcd1", "etcd2", "etcd3"):
        flags = dict(arg.split("=", 1) for arg in services[name]["command"][1:])
        assert set(flags) <= known
        assert flags["--name"] == name
        clusters.add(flags["--initial-cluster"])
    assert clusters == {"etcd1=http://etcd1:2380,etcd2=http://etcd2:2380,etcd3=http://etcd3:2380"}


class Service:
    """One compose service's command, run here: ``celery`` as this Python's module."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        assert command[0] == "celery"
        self.log = log
        self.handle = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *command], cwd=COMPOSE, env=env, start_new_session=True,
            stdout=self.handle, stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> None:
        def logged() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.log.name} exited: {self.text()[-2000:]}")
            return re.search(pattern, self.text()) is not None

        wait_until(logged, timeout, f"{self.log.name} to log {pattern!r}")

    def kill(self) -> None:
        """SIGKILL its process group: a warm shutdown would wait for the running report."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.handle.close()


@pytest.fixture
def here(amqp_url, redis_url, etcd_url) -> Iterator[dict[str, str]]:  # noqa: F811
    """The services' environment, pointed at our servers; a queue of this test's own."""
    queue = f"csl-compose-{uuid.uuid4().hex[:8]}"
    yield {
        **os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{COMPOSE}", "BROKER_URL": amqp_url,
        "RESULT_URL": f"{redis_url}/1", "LOCK_URL": etcd_url, "QUEUE": queue,
    }
    with kombu.Connection(amqp_url, connect_timeout=5) as connection:
        connection.default_channel.queue_delete(queue)


def test_a_worker_and_two_beats_run_the_example_app_and_locks_list_shows_its_lock(
    services, here, tmp_path
) -> None:
    port = free_port()
    worker_env = {**here, **services["worker1"]["environment"], "METRICS_PORT": str(port),
                  "METRICS_ADDRESS": "127.0.0.1"}
    for name in ("BROKER_URL", "RESULT_URL", "LOCK_URL"):
        worker_env[name] = here[name]
    started = [Service(services["worker1"]["command"], worker_env, tmp_path / "worker1.log")]
    try:
        started[0].wait_for(r"ready\.")
        started += [
            Service(services[name]["command"], here, tmp_path / f"{name}.log") for name in ("beat1", "beat2")
        ]
        beats = started[1:]
        wait_until(lambda: sum("elected leader" in b.text() for b in beats) == 1, 30, "one beat to lead")
        wait_until(lambda: sum("standing by" in b.text() for b in beats) == 1, 30, "the other to stand by")
        # The report takes 5 s and is sent every second: the next one is skipped.
        started[0].wait_for(r"skipped proj\.rebuild_report\[", 20)
        listed = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "proj", "locks", "list", "--json"],
            cwd=COMPOSE, env=here, capture_output=True, text=True, timeout=60, check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert "proj.rebuild_report" in [entry["task"] for entry in json.loads(listed.stdout)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        skips = [
            line for line in metrics.splitlines()
            if line.startswith("singleton_lock_contended_total{")
            and 'outcome="skipped"' in line and 'task="proj.rebuild_report"' in line
        ]
        assert skips, metrics
    finally:
        for service in started:
            service.kill()


def test_the_flower_command_is_flowers(services) -> None:
    command = services["flower"]["command"]
    assert command[:4] == ["celery", "-A", "proj", "flower"]
    pytest.importorskip("flower", reason="flower is installed in the stack's image, not in the test venv")
