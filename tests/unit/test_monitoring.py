"""Metrics settings, the metrics observer in one process, the skip mark, the skip log line.

The prefork worker, its /metrics over HTTP and its events: tests/integration/test_worker_monitoring.py.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock import ConfigurationError, SingletonTask, Skip
from celery_singleton_lock import metrics as metrics_module
from celery_singleton_lock.config import settings_for
from celery_singleton_lock.metrics import MetricsSettings, read_metrics_settings
from celery_singleton_lock.results import skip_info
from tests.conftest import wait_until

ADDRESS = "singleton_lock_metrics_address"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({}, None),
        ({"singleton_lock_metrics_port": 9808}, MetricsSettings(9808, "127.0.0.1")),
        ({"singleton_lock_metrics_port": "9808"}, MetricsSettings(9808, "127.0.0.1")),
        (
            {"singleton_lock_metrics_port": 9808, "singleton_lock_metrics_address": "0.0.0.0"},
            MetricsSettings(9808, "0.0.0.0"),
        ),
    ],
)
def test_metrics_settings(conf: dict[str, Any], expected: MetricsSettings | None) -> None:
    assert read_metrics_settings(conf) == expected


@pytest.mark.parametrize(
    ("conf", "option"),
    [
        ({"singleton_lock_metrics_port": 0}, "singleton_lock_metrics_port"),
        ({"singleton_lock_metrics_port": 70000}, "singleton_lock_metrics_port"),
        ({"singleton_lock_metrics_port": "metrics"}, "singleton_lock_metrics_port"),
        ({"singleton_lock_metrics_port": True}, "singleton_lock_metrics_port"),
        ({"singleton_lock_metrics_port": 9808, ADDRESS: ""}, ADDRESS),
        ({"singleton_lock_metrics_port": 9808, ADDRESS: 1}, ADDRESS),
    ],
)
def test_bad_metrics_settings_name_the_option(conf: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        read_metrics_settings(conf)
    assert caught.value.option == option
    assert option in str(caught.value)


def test_an_address_that_cannot_be_listened_on_names_the_setting() -> None:
    with pytest.raises(ConfigurationError) as caught:
        metrics_module.MetricsServer(MetricsSettings(free_port(), "192.0.2.1"), pool_processes=False)
    assert caught.value.option == "singleton_lock_metrics_address"


def test_a_port_in_use_names_the_port_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError) as caught:
            metrics_module.MetricsServer(MetricsSettings(port), pool_processes=False)
    assert caught.value.option == "singleton_lock_metrics_port"


def test_without_the_port_nothing_starts_and_prometheus_client_is_not_imported() -> None:
    code = (
        "import sys; from celery import Celery; import celery_singleton_lock.task; "
        "from celery_singleton_lock import metrics, _observe; "
        "assert metrics.start(Celery('x', broker='memory://'), pool_processes=True) is None; "
        "assert _observe.observer is None; "
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture
def metrics_server(eager_app: Celery) -> Iterator[metrics_module.MetricsServer]:
    eager_app.conf.singleton_lock_metrics_port = free_port()
    server = metrics_module.start(eager_app, pool_processes=False)
    assert server is not None
    try:
        yield server
    finally:
        metrics_module.stop()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` at ``url``: {(sample name, its labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def test_counts_of_runs_and_skips_in_one_process(eager_app: Celery, metrics_server: Any) -> None:
    @eager_app.task(base=SingletonTask)
    def report(n: int) -> str:
        return "ran"

    assert report.delay(1).get() == "ran"
    held = settings_for(eager_app).backend().acquire(report.lock_key_for((1,), {}), ttl=30)
    assert held is not None
    assert report.delay(1).get() is None  # skipped
    held.release()

    scraped = scrape(metrics_server.url)
    labels = {"task": report.name, "backend": "memory"}
    assert sample(scraped, "singleton_lock_acquired_total", **labels) == 1
    assert sample(scraped, "singleton_lock_contended_total", **labels, outcome="skipped") == 1
    assert sample(scraped, "singleton_lock_hold_seconds_count", **labels) == 1
    names = {name for name, _ in scraped}
    assert "singleton_lock_acquired_total" in names


def test_a_skip_is_marked_in_the_stored_result_and_a_none_result_is_not(eager_app: Celery) -> None:
    eager_app.conf.task_store_eager_result = True

    @eager_app.task(base=SingletonTask)
    def returns_none(n: int) -> None:
        return None

    ran = returns_none.apply((1,))
    held = settings_for(eager_app).backend().acquire(returns_none.lock_key_for((1,), {}), ttl=30)
    assert held is not None
    skipped = returns_none.apply((1,))
    held.release()

    assert ran.get() is None
    assert skipped.get() is None
    assert skip_info(returns_none.AsyncResult(ran.id)) is None
    info = skip_info(returns_none.AsyncResult(skipped.id))
    assert info is not None
    assert info.key == returns_none.lock_key_for((1,), {})


def test_a_skip_logs_one_info_line_naming_the_holder(eager_app: Celery, caplog: Any) -> None:
    @eager_app.task(base=SingletonTask, on_contention=Skip("busy"))
    def sync(n: int) -> str:
        return "ran"

    backend = settings_for(eager_app).backend()
    from celery_singleton_lock.backends.owner import Owner

    held = backend.acquire(sync.lock_key_for((7,), {}), ttl=30, owner=Owner.here("holder-task-id"))
    assert held is not None
    with caplog.at_level(logging.INFO, logger="celery_singleton_lock.task"):
        result = sync.apply((7,))
    held.release()
    assert result.get() == "busy"
    lines = [r.getMessage() for r in caplog.records if r.name == "celery_singleton_lock.task"]
    key = sync.lock_key_for((7,), {})
    assert lines == [f"skipped {sync.name}[{result.id}]: lock {key!r} is held by task holder-task-id"]


def test_the_counts_of_a_pool_process_stay_after_it_exits(eager_app: Celery) -> None:
    eager_app.conf.singleton_lock_metrics_port = free_port()
    server = metrics_module.start(eager_app, pool_processes=True)
    assert server is not None
    try:
        sender = server.sender
        assert isinstance(sender, metrics_module._ChildSender)
        # Another process (as a pool process is), which sends its lines and exits.
        code = (
            "import sys; from celery_singleton_lock.metrics import _ChildSender; "
            "send = _ChildSender(sys.argv[1]); "
            "[send('acquired', ('shop.sync', 'redis'), 1) for _ in range(3)]; "
            "send('contended', ('shop.sync', 'redis', 'skipped'), 1)"
        )
        subprocess.run([sys.executable, "-c", code, sender.path], check=True, timeout=60)
        labels = {"task": "shop.sync", "backend": "redis"}

        def counted() -> bool:
            scraped = scrape(server.url)
            return (
                sample(scraped, "singleton_lock_acquired_total", **labels) == 3
                and sample(scraped, "singleton_lock_contended_total", **labels, outcome="skipped") == 1
            )

        wait_until(counted, 10, "the exited process's counts in /metrics")
    finally:
        metrics_module.stop()
    assert not os.path.exists(sender.path)  # the channel's directory is removed at shutdown
