"""sentinel:// URLs and options, and a kombu Sentinel broker as the default backend (no server)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock import ConfigurationError, connect
from celery_singleton_lock.backends.sentinel import SentinelAddress, SentinelBackend, parse_sentinel_url
from celery_singleton_lock.config import read_settings

SECRET = "s3cr3t-pw"


def test_every_sentinel_the_master_name_and_the_database_are_read():
    address = parse_sentinel_url(
        f"sentinel://app:{SECRET}@h1:26380,h2,[::1]:26381/my%20master/2", option="url"
    )
    assert address == SentinelAddress(
        sentinels=(("h1", 26380), ("h2", 26379), ("::1", 26381)),
        master_name="my master", db=2, username="app", password=SECRET,
    )
    assert parse_sentinel_url("sentinel://h1/mymaster", option="url").db == 0


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        (f"sentinel://:{SECRET}@h1:26379,h2:26379", "must name the master"),
        (f"sentinel://:{SECRET}@h1:26379/", "must name the master"),
        (f"sentinel://:{SECRET}@h1:26379/mymaster/0/extra", "must name the master"),
        (f"sentinel://:{SECRET}@h1:26379/mymaster/zero", "must be a number"),
        (f"sentinel://:{SECRET}@h1:99999/mymaster", "port '99999'"),
        (f"sentinel://:{SECRET}@h1:26379,,h2/mymaster", "bad Sentinel address ''"),
        (f"sentinel://:{SECRET}@h1:26379/mymaster?db=1", "takes none"),
    ],
)
def test_a_bad_url_is_refused_naming_the_setting_and_never_showing_the_password(url, complaint):
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with("memory://", singleton_lock_backend=url).conf)
    assert info.value.option == "singleton_lock_backend"
    assert complaint in str(info.value)
    assert SECRET not in str(info.value)


def test_brackets_that_hold_no_ipv6_address_are_refused():
    with pytest.raises(ConfigurationError) as info:
        parse_sentinel_url(f"sentinel://:{SECRET}@[nonsense]:26379/mymaster", option="url")
    # Python 3.11+'s urllib refuses the brackets itself; 3.10's lets our address check do it.
    assert "cannot be parsed" in str(info.value) or "bad Sentinel address" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"min_replicas": -1}, "min_replicas"),
        ({"min_replicas": True}, "min_replicas"),
        ({"min_replicas": 1, "min_replicas_timeout": 0}, "min_replicas_timeout"),
        ({"min_replicas": 1, "min_replicas_timeout": 5}, "min_replicas_timeout"),  # not below 5 s
        ({"min_other_sentinels": "2"}, "min_other_sentinels"),
    ],
)
def test_a_bad_option_names_itself(options, named):
    with pytest.raises(ConfigurationError) as info:
        connect("sentinel://h1:26379/mymaster", connect_timeout=5, **options)
    assert info.value.option == "singleton_lock_backend_options"
    assert named in str(info.value)


def test_an_unknown_connection_option_is_refused_when_connecting_not_at_the_first_lock():
    with pytest.raises(ConfigurationError) as info:
        connect("sentinel://127.0.0.1:1/mymaster", ssl_ca_cert="/ca.pem")  # ssl_ca_certs
    assert info.value.option == "singleton_lock_backend_options"
    assert "ssl_ca_cert" in str(info.value)


def test_the_url_is_shown_with_its_password_masked():
    backend = connect(f"sentinel://:{SECRET}@127.0.0.1:1,127.0.0.1:2/mymaster/1")
    try:
        assert isinstance(backend, SentinelBackend)
        assert SECRET not in repr(backend)
        assert backend.url == "sentinel://:***@127.0.0.1:1,127.0.0.1:2/mymaster/1"
        assert backend.db == 1
    finally:
        backend.close()


def app_with(broker: str, **settings: Any) -> Celery:
    app = Celery("sentinel-config-test", broker=broker, set_as_current=False)
    for name, value in settings.items():
        app.conf[name] = value
    return app


def test_a_kombu_sentinel_broker_is_the_default_backend_with_its_master_name():
    conf = app_with(
        f"sentinel://:{SECRET}@s1:26379/3;sentinel://:{SECRET}@s2:26380;sentinel://s3:26381",
        broker_transport_options={"master_name": "cache/main"},
    ).conf
    url = read_settings(conf).backend_url
    assert url == f"sentinel://:{SECRET}@s1:26379,s2:26380,s3:26381/cache%2Fmain/3"
    assert parse_sentinel_url(url, option="url").master_name == "cache/main"


def test_a_kombu_sentinel_broker_without_a_master_name_is_refused_naming_the_option():
    with pytest.raises(ConfigurationError) as info:
        read_settings(app_with(f"sentinel://:{SECRET}@s1:26379;sentinel://s2:26379").conf)
    assert info.value.option == "broker_transport_options"
    assert "master_name" in str(info.value)
    assert SECRET not in str(info.value)
