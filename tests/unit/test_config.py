"""App settings: defaults, the broker as default backend, validation naming the setting."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import celery
import pytest
from celery import Celery

from celery_singleton_lock import connect
from celery_singleton_lock.config import (
    Settings,
    check_ttl,
    read_settings,
    settings_for,
    warn_if_connect_timeout_exceeds,
)
from celery_singleton_lock.errors import ConfigurationError
from celery_singleton_lock.policies import Raise, Retry, Skip


def app_with(broker: str | None = "memory://", **settings: Any) -> Celery:
    app = Celery("config-test", broker=broker, set_as_current=False)
    for name, value in settings.items():
        app.conf[name] = value
    return app


def test_defaults() -> None:
    settings = read_settings(app_with(task_always_eager=True).conf)
    assert settings == Settings(
        backend_url="memory://",
        ttl=60.0,
        on_contention=Skip(),
        on_lock_lost="log",
        prefix="singleton-lock",
        wait_timeout=60.0,
        connect_timeout=5.0,
        backend_options={},
    )


def test_settings_are_read() -> None:
    settings = read_settings(
        app_with(
            singleton_lock_backend="redis://locks:6379/2",
            singleton_lock_ttl=17,
            singleton_lock_on_contention="raise",
            singleton_lock_on_lock_lost="raise",
            singleton_lock_prefix="myapp",
            singleton_lock_wait_timeout=3,
            singleton_lock_connect_timeout=0.5,
            singleton_lock_backend_options={"ssl_ca_certs": "/ca.pem"},
        ).conf
    )
    assert settings.backend_url == "redis://locks:6379/2"
    assert settings.ttl == 17.0
    assert settings.on_contention == Raise()
    assert settings.on_lock_lost == "raise"
    assert settings.prefix == "myapp"
    assert settings.wait_timeout == 3.0
    assert settings.connect_timeout == 0.5
    assert settings.backend_options == {"ssl_ca_certs": "/ca.pem"}


def test_a_policy_object_is_accepted_as_setting() -> None:
    policy = Retry(countdown=3, max_retries=2)
    assert read_settings(app_with(singleton_lock_on_contention=policy).conf).on_contention is policy


@pytest.mark.parametrize(
    "broker",
    ["redis://localhost:6379/3", "rediss://:pw@cache.example:6380/0", "unix:///run/redis.sock"],
)
def test_a_redis_broker_is_the_default_backend(broker: str) -> None:
    assert read_settings(app_with(broker).conf).backend_url == broker


def test_of_a_failover_broker_list_the_first_url_is_taken() -> None:
    conf = app_with("redis://one:6379/0;redis://two:6379/0").conf
    assert read_settings(conf).backend_url == "redis://one:6379/0"


def test_the_lock_backend_setting_wins_over_the_broker() -> None:
    conf = app_with("redis://broker:6379/0", singleton_lock_backend="memory://").conf
    assert read_settings(conf).backend_url == "memory://"


@pytest.mark.parametrize(
    "broker", ["filesystem://", "sqla+sqlite:///celery.db", "memory://", "memory://localhost/"]
)
def test_a_broker_that_serves_one_host_makes_the_embedded_file_backend_the_default(broker: str) -> None:
    assert read_settings(app_with(broker).conf).backend_url == "file://"


def test_eager_tasks_on_a_memory_broker_keep_the_memory_backend() -> None:
    # Every task runs in the calling process: memory:// excludes it, with nothing on disk.
    assert read_settings(app_with("memory://", task_always_eager=True).conf).backend_url == "memory://"
    eager_elsewhere = app_with("filesystem://", task_always_eager=True)
    assert read_settings(eager_elsewhere.conf).backend_url == "file://"


@pytest.mark.parametrize("broker", ["amqp://guest@localhost//", "sqs://", "sqla+postgresql://db/x", None])
def test_a_broker_that_may_serve_several_hosts_needs_the_lock_backend_set(broker: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(broker).conf)
    assert info.value.option == "singleton_lock_backend"
    message = str(info.value)
    assert "singleton_lock_backend is not set" in message
    for choice in ("redis://", "etcd://", "zookeeper://", "postgresql://", "file:///"):
        assert choice in message


def test_a_non_redis_broker_password_is_not_in_the_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with("amqp://user:s3cret@rabbit:5672//").conf)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("singleton_lock_ttl", 0),
        ("singleton_lock_ttl", -5),
        ("singleton_lock_ttl", "60"),
        ("singleton_lock_ttl", True),
        ("singleton_lock_connect_timeout", 0),
        ("singleton_lock_connect_timeout", "5s"),
        ("singleton_lock_wait_timeout", -1),
        ("singleton_lock_on_contention", "sometimes"),
        ("singleton_lock_on_contention", 42),
        ("singleton_lock_on_lock_lost", "ignore"),
        ("singleton_lock_on_lock_lost", True),
        ("singleton_lock_prefix", "app{1}"),
        ("singleton_lock_prefix", 5),
        ("singleton_lock_prefix", "app\ud800"),
        ("singleton_lock_backend", "rediz://localhost:6379/0"),
        ("singleton_lock_backend", "localhost:6379"),
        ("singleton_lock_backend", 6379),
        ("singleton_lock_backend_options", "ssl=true"),
        ("singleton_lock_ttl", float("inf")),
        ("singleton_lock_ttl", float("nan")),
        ("singleton_lock_ttl", 0.05),  # below the drift margin + one round trip
        ("singleton_lock_ttl", 1e10),  # etcd refuses it
        ("singleton_lock_enqueue_once_ttl", float("inf")),
        ("singleton_lock_connect_timeout", float("nan")),
        ("singleton_lock_backend", "redis://locks:notaport/0"),
        ("singleton_lock_backend", "redis://locks:6379/zero"),
        ("singleton_lock_backend", "redlock://h1:6379,h2:99999,h3:6379/0"),
        ("singleton_lock_backend", "etcd://h1:2379,h2:port"),
    ],
)
def test_a_bad_setting_is_a_configuration_error_naming_it(setting: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(**{setting: value}).conf)
    assert info.value.option == setting
    assert setting in str(info.value)


def test_django_style_namespaced_settings_are_read() -> None:
    class DjangoSettings:
        CELERY_BROKER_URL = "memory://"
        CELERY_TASK_ALWAYS_EAGER = True
        CELERY_SINGLETON_LOCK_TTL = 17
        CELERY_SINGLETON_LOCK_ON_CONTENTION = "raise"

    app = Celery("django-style", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    settings = read_settings(app.conf)
    assert settings.ttl == 17.0
    assert settings.on_contention == Raise()
    assert settings.backend_url == "memory://"


def test_an_unknown_scheme_suggests_the_near_one() -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(singleton_lock_backend="rediz://localhost:6379/0").conf)
    message = str(info.value)
    assert "did you mean redis://?" in message
    assert "memory://" in message  # and lists the schemes it knows


def test_an_unknown_scheme_error_masks_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(singleton_lock_backend="rediz://user:s3cret@host/0").conf)
    assert "s3cret" not in str(info.value)
    assert "user:***@host" in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis://:s3cret@127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/none.sock", "redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3/0"]
)
def test_an_unknown_redis_option_fails_when_the_backend_is_made_naming_the_setting(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        connect(url, socket_keepalive_optionz={})
    assert info.value.option == "singleton_lock_backend_options"
    assert "socket_keepalive_optionz" in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis://user:s3cret@[nonsense]:6379/0", "etcd://user:s3cret@[::1:2379", "redlock://:s3cret@[x]:1,h:2/0"]
)
def test_a_url_with_a_malformed_host_is_a_configuration_error_with_the_password_masked(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(singleton_lock_backend=url).conf)
    assert info.value.option == "singleton_lock_backend"
    assert "is not a valid URL" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert ":***@" in str(info.value)


@pytest.mark.parametrize("typo", ["redis:/user:s3cret@host/0", "redis//user:s3cret@host/0"])
def test_a_malformed_url_error_masks_the_password(typo: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(singleton_lock_backend=typo).conf)
    assert info.value.option == "singleton_lock_backend"
    assert "s3cret" not in str(info.value)


def test_a_bad_option_on_a_redis_url_with_password_does_not_show_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with("redis://user:s3cret@host/0", singleton_lock_ttl=-1).conf)
    assert info.value.option == "singleton_lock_ttl"
    assert "s3cret" not in str(info.value)


def test_settings_for_validates_once_per_app() -> None:
    app = app_with(singleton_lock_ttl=9)
    first = settings_for(app)
    assert first.ttl == 9.0
    assert settings_for(app) is first
    assert settings_for(app_with(singleton_lock_ttl=10)).ttl == 10.0


# -- bounds of durations -------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.1, 1, 60, 315_360_000])
def test_ttls_from_a_tenth_of_a_second_to_ten_years_are_accepted(value: float) -> None:
    assert check_ttl(value, "lock_ttl") == float(value)


@pytest.mark.parametrize("value", [0.099, 315_360_001, float("inf"), float("-inf"), float("nan")])
def test_ttls_out_of_bounds_are_refused_with_the_bounds(value: float) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_ttl(value, "lock_ttl")
    assert info.value.option == "lock_ttl"
    assert "lock_ttl must be a number of seconds from 0.1 to 315360000" in str(info.value)


# -- connect timeout against the lease -----------------------------------------------------


def test_a_connect_timeout_not_below_the_ttl_logs_one_warning_naming_both(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_singleton_lock"):
        read_settings(app_with(singleton_lock_ttl=5, singleton_lock_connect_timeout=5).conf)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "celery_singleton_lock.config"
    message = warnings[0].getMessage()
    assert "singleton_lock_connect_timeout (5s)" in message
    assert "singleton_lock_ttl (5s)" in message


def test_a_connect_timeout_below_the_ttl_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="celery_singleton_lock"):
        read_settings(app_with(singleton_lock_ttl=5.1, singleton_lock_connect_timeout=5).conf)
    assert caplog.records == []


def test_the_warning_helper_names_a_tasks_lock_ttl(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_singleton_lock"):
        assert warn_if_connect_timeout_exceeds(3.0, 5.0, "lock_ttl", " of task shop.charge") is True
        assert warn_if_connect_timeout_exceeds(30.0, 5.0, "lock_ttl", " of task shop.sync") is False
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "singleton_lock_connect_timeout (5s) is not below lock_ttl (3s) of task shop.charge"
    ]


# -- `celery report` shows no password of any accepted form --------------------------------

SECRET = "s3cret-Pw"
NODES = ["redis://h1:6379/0", "rediss://h2:6380/0", "unix:///run/redis-3.sock?db=0"]
#: Celery before 5.7 masks a URL by parsing it for one host: on a URL of several hosts its
#: ``celery report`` fails (ValueError, no password in it), and it drops a query's password
#: itself (make test-matrix, Celery 5.3 to 5.6).
CELERY_5_7 = tuple(int(part) for part in celery.__version__.split(".")[:2]) >= (5, 7)


def censored_report(app: Celery) -> str:
    """``celery report``'s text of the settings; "" where an older Celery fails to mask."""
    try:
        return app.conf.humanize(censored=True)
    except ValueError as exc:  # Celery < 5.7 and a URL of several hosts
        if CELERY_5_7 or SECRET in str(exc):
            raise
        return ""


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        (f"redis://:{SECRET}@h:6379/0", {}),
        (f"redis://app:{SECRET}@h:6379/0", {}),
        (f"rediss://:{SECRET}@h:6380/0?ssl_cert_reqs=required", {"ssl_ca_certs": "/ca.pem"}),
        (f"unix://:{SECRET}@/run/redis.sock?db=1", {}),
        (f"redlock://:{SECRET}@h1:6379,h2:6379,h3:6379/0", {}),
        (f"redlock://app:{SECRET}@h1:6379,h2:6379,h3:6379/0", {}),
        (f"redlock://:{SECRET},x@h1:6379,h2:6379,h3:6379/0", {}),  # a ',' in the password
        (f"etcd://root:{SECRET}@h1:2379,h2:2379,h3:2379", {}),
        (f"etcds://root:{SECRET}@h1:2379?ca_cert=/ca.pem", {}),
        ("redis://h:6379/0", {"password": SECRET, "ssl_password": SECRET, "ssl_keyfile": "/k.pem"}),
        (NODES, {"password": SECRET}),
        (tuple(NODES), {"username": "app", "password": SECRET}),
        ("etcd://h1:2379", {"user": "root", "password": SECRET}),
    ],
)
def test_every_accepted_backend_form_is_censored_by_celery_report(backend: Any, options: Any) -> None:
    app = app_with(singleton_lock_backend=backend, singleton_lock_backend_options=options)
    read_settings(app.conf)  # accepted
    report = censored_report(app)
    assert "singleton_lock_backend" in report or not CELERY_5_7
    assert SECRET not in report
    assert SECRET.split("-", maxsplit=1)[0] not in report


def test_django_style_backend_setting_is_censored() -> None:
    class DjangoSettings:
        CELERY_BROKER_URL = "memory://"
        CELERY_SINGLETON_LOCK_BACKEND = f"redlock://:{SECRET}@h1:6379,h2:6379,h3:6379/0"

    app = Celery("django-report", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    read_settings(app.conf)
    assert SECRET not in censored_report(app)


@pytest.mark.parametrize(
    ("backend", "words"),
    [
        ([f"redis://:{SECRET}@h{i}:6379/0" for i in range(3)], "a list of URLs"),
        (tuple(f"redis://app:{SECRET}@h{i}:6379/0" for i in range(3)), "a list of URLs"),
        (["redis://h0:6379/0", f"redis://:{SECRET}@h1:6379/0", "redis://h2:6379/0"], "a list of URLs"),
        (f"redis://h:6379/0?password={SECRET}", "query parameter 'password'"),
        (f"etcd://h1:2379?user=root&password={SECRET}", "query parameter 'password'"),
        (f"redis://:{SECRET}/x@h:6379/0", "percent-encode"),  # an unencoded '/' in it
        (f"redlock://u:{SECRET},y:z@h1:6379,h2:6379,h3:6379/0", "redlock://:PASSWORD@"),
    ],
)
def test_a_backend_form_whose_password_celery_report_would_show_is_refused(
    backend: Any, words: str
) -> None:
    app = app_with(singleton_lock_backend=backend)
    if words == "redlock://:PASSWORD@" and not censored_report(app):
        return  # Celery < 5.7 fails to render this URL at all: it shows nothing to refuse
    if CELERY_5_7:
        assert SECRET in app.conf.humanize(censored=True)  # what Celery would show
    with pytest.raises(ConfigurationError) as info:
        read_settings(app.conf)
    assert info.value.option == "singleton_lock_backend"
    assert words in str(info.value)
    assert SECRET not in str(info.value)


def test_loading_an_app_whose_backend_setting_would_show_a_password_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What `celery report`, `celery worker` and `celery beat` do before anything else.
    listed = [f"redis://:{SECRET}@h{i}:6379/0" for i in range(3)]
    with pytest.raises(ConfigurationError) as info:
        app_with(singleton_lock_backend=listed).loader.import_default_modules()
    assert info.value.option == "singleton_lock_backend"
    assert SECRET not in caplog.text  # Celery logs the receiver's error too
    app_with().loader.import_default_modules()  # no lock setting: nothing to check
    app_with(singleton_lock_backend=NODES).loader.import_default_modules()


REPORT_APP = """
from celery import Celery
from celery_singleton_lock import SingletonTask

app = Celery("reportapp", broker="memory://")
app.conf.singleton_lock_backend = {backend!r}
app.conf.singleton_lock_backend_options = {options!r}


@app.task(base=SingletonTask)
def work(n):
    return n
"""


def _celery_report(tmp_path: Path, backend: Any, options: Any) -> subprocess.CompletedProcess[str]:
    module = textwrap.dedent(REPORT_APP.format(backend=backend, options=options))
    (tmp_path / "reportapp.py").write_text(module)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "reportapp", "report"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_celery_report_of_a_redlock_list_with_passwords_fails_without_showing_them(
    tmp_path: Path,
) -> None:
    listed = [f"redis://:{SECRET}@127.0.0.1:{port}/0" for port in (7001, 7002, 7003)]
    done = _celery_report(tmp_path, listed, {})
    assert done.returncode != 0
    assert "singleton_lock_backend" in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_celery_report_of_the_censored_redlock_forms_shows_no_password(tmp_path: Path) -> None:
    listed = [f"redis://127.0.0.1:{port}/0" for port in (7001, 7002, 7003)]
    done = _celery_report(tmp_path, listed, {"password": SECRET})
    assert done.returncode == 0, done.stderr
    assert "singleton_lock_backend: ['redis://127.0.0.1:7001/0'," in done.stdout
    assert SECRET not in done.stdout + done.stderr


def test_an_infinite_wait_timeout_means_no_limit_and_nan_is_refused() -> None:
    assert read_settings(app_with(singleton_lock_wait_timeout=float("inf")).conf).wait_timeout is None
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(singleton_lock_wait_timeout=float("nan")).conf)
    assert info.value.option == "singleton_lock_wait_timeout"


def test_outage_settings_default_to_riding_out_fifteen_minutes() -> None:
    settings = read_settings(app_with().conf)
    assert settings.outage_timeout == 900.0
    assert settings.outage_backoff_max == 60.0
    custom = read_settings(
        app_with(singleton_lock_outage_timeout=30, singleton_lock_outage_backoff_max=2).conf
    )
    assert (custom.outage_timeout, custom.outage_backoff_max) == (30.0, 2.0)
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(singleton_lock_outage_timeout=-1).conf)
    assert info.value.option == "singleton_lock_outage_timeout"
