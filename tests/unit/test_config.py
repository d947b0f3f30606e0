"""App settings: defaults, the broker as default backend, validation naming the setting."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock.config import Settings, read_settings, settings_for
from celery_singleton_lock.errors import ConfigurationError
from celery_singleton_lock.policies import Raise, Retry, Skip


def app_with(broker: str | None = "memory://", **settings: Any) -> Celery:
    app = Celery("config-test", broker=broker, set_as_current=False)
    for name, value in settings.items():
        app.conf[name] = value
    return app


def test_defaults() -> None:
    settings = read_settings(app_with().conf)
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


@pytest.mark.parametrize("broker", ["amqp://guest@localhost//", "sqs://", None])
def test_a_non_redis_broker_without_lock_backend_is_a_configuration_error(broker: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(broker).conf)
    assert info.value.option == "singleton_lock_backend"
    assert "singleton_lock_backend" in str(info.value)


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
        ("singleton_lock_backend", "rediz://localhost:6379/0"),
        ("singleton_lock_backend", "localhost:6379"),
        ("singleton_lock_backend", 6379),
        ("singleton_lock_backend_options", "ssl=true"),
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
