"""The ``singleton_lock_*`` app settings, read and validated once per app.

Precedence everywhere: task option > app setting > default. Settings are found under
their lower-case names, so Django-style ``CELERY_SINGLETON_LOCK_TTL`` works with
``app.config_from_object("django.conf:settings", namespace="CELERY")``.

=================================  ============================================  =========
setting                            meaning                                       default
=================================  ============================================  =========
``singleton_lock_backend``         lock server URL, or a list of >= 3 Redis      broker URL
                                   URLs (Redlock: a quorum of masters)           if Redis
``singleton_lock_ttl``             lease seconds                                 60
``singleton_lock_on_contention``   "skip", "retry", "wait", "raise" or a policy  "skip"
``singleton_lock_on_lock_lost``    "log" or "raise"                              "log"
``singleton_lock_prefix``          namespace of every key                        "singleton-lock"
``singleton_lock_wait_timeout``    seconds ``Wait()`` waits by default           60
``singleton_lock_connect_timeout`` bound on reaching the server                  5
``singleton_lock_outage_timeout``  seconds a task retries while the lock server  900
                                   is unreachable, then fails
``singleton_lock_outage_backoff_max`` longest wait between those retries         60
``singleton_lock_backend_options`` dict passed to the backend's client (TLS...)  {}
``singleton_lock_enqueue_once_ttl`` life of an ``enqueue_once`` queued marker    3600
``singleton_lock_beat_ttl``        beat leader lease seconds (takeover bound)    30
``singleton_lock_beat_name``       beats sharing this name elect one leader      app.main
``singleton_lock_beat_slot_grace`` a slot claim outlives its entry's next slot   60
                                   by this many seconds (clock skew, pauses)
=================================  ============================================  =========
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery_singleton_lock.backends import backend_class, shared_backend
from celery_singleton_lock.errors import ConfigurationError
from celery_singleton_lock.policies import Policy, Skip, parse_policy

if TYPE_CHECKING:
    from celery import Celery

    from celery_singleton_lock.backends.base import LockBackend

__all__ = ["ON_LOCK_LOST", "Settings", "check_on_lock_lost", "check_ttl", "settings_for"]

ON_LOCK_LOST = ("log", "raise")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_ttl(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        msg = f"{option} must be a positive number of seconds, got {value!r}"
        raise ConfigurationError(msg, option=option)
    return float(value)


def check_on_lock_lost(value: Any, option: str) -> str:
    if value not in ON_LOCK_LOST:
        msg = f"{option} must be one of {list(ON_LOCK_LOST)}, got {value!r}"
        raise ConfigurationError(msg, option=option)
    return str(value)


@dataclass(frozen=True)
class Settings:
    """One app's validated lock settings."""

    #: A URL, or a tuple of Redis URLs (Redlock).
    backend_url: str | tuple[str, ...]
    ttl: float = 60.0
    on_contention: Policy = field(default_factory=Skip)
    on_lock_lost: str = "log"
    prefix: str = "singleton-lock"
    wait_timeout: float = 60.0
    connect_timeout: float = 5.0
    backend_options: dict[str, Any] = field(default_factory=dict)
    enqueue_once_ttl: float = 3600.0
    beat_ttl: float = 30.0
    #: None: the app's main name (``Celery("proj")``), else "celery".
    beat_name: str | None = None
    beat_slot_grace: float = 60.0
    outage_timeout: float = 900.0
    outage_backoff_max: float = 60.0

    #: This process's backend, by PID (a forked child makes its own).
    _backends: dict[int, LockBackend] = field(default_factory=dict, compare=False, repr=False)

    def backend(self) -> LockBackend:
        """This process's backend (one connection pool per process, made on first use)."""
        backend = self._backends.get(os.getpid())
        if backend is None:
            backend = self._backends[os.getpid()] = shared_backend(
                self.backend_url,
                prefix=self.prefix,
                connect_timeout=self.connect_timeout,
                **self.backend_options,
            )
        return backend


def _setting(conf: Any, name: str) -> Any:
    value = conf.get(name)
    return conf.get(name.upper()) if value is None else value


def _default_backend_url(conf: Any) -> str:
    broker = conf.get("broker_url") or conf.get("BROKER_URL")
    if isinstance(broker, str) and broker.startswith(_REDIS_SCHEMES):
        return broker.split(";")[0]
    if isinstance(broker, str) and broker.startswith("memory://"):
        return "memory://"
    shown = broker if isinstance(broker, str) else "(none)"
    msg = (
        "singleton_lock_backend is not set and the broker URL is not a Redis URL "
        f"({shown.split('://')[0]}://...): set app.conf.singleton_lock_backend"
    )
    raise ConfigurationError(msg, option="singleton_lock_backend")


def read_settings(conf: Any) -> Settings:
    """Validate ``conf``'s ``singleton_lock_*`` settings.

    :raises ConfigurationError: naming the first bad setting.
    """
    url = _setting(conf, "singleton_lock_backend") or _default_backend_url(conf)
    if isinstance(url, list | tuple):
        url = tuple(url)
    if backend_class(url, option="singleton_lock_backend").schemes == ("redlock",):
        from celery_singleton_lock.backends.redlock import node_urls

        node_urls(url, option="singleton_lock_backend")
    prefix = _setting(conf, "singleton_lock_prefix") or "singleton-lock"
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
        msg = f"singleton_lock_prefix must be a str without braces, got {prefix!r}"
        raise ConfigurationError(msg, option="singleton_lock_prefix")
    options = _setting(conf, "singleton_lock_backend_options") or {}
    if not isinstance(options, dict):
        msg = f"singleton_lock_backend_options must be a dict, got {type(options).__name__}"
        raise ConfigurationError(msg, option="singleton_lock_backend_options")

    def number(name: str, default: float) -> float:
        value = _setting(conf, name)
        return default if value is None else check_ttl(value, name)

    beat_name = _setting(conf, "singleton_lock_beat_name")
    if beat_name is not None and (not isinstance(beat_name, str) or not beat_name):
        msg = f"singleton_lock_beat_name must be a non-empty str, got {beat_name!r}"
        raise ConfigurationError(msg, option="singleton_lock_beat_name")
    on_contention = _setting(conf, "singleton_lock_on_contention")
    on_lock_lost = _setting(conf, "singleton_lock_on_lock_lost")
    return Settings(
        backend_url=url,
        ttl=number("singleton_lock_ttl", 60.0),
        on_contention=parse_policy(
            "skip" if on_contention is None else on_contention, "singleton_lock_on_contention"
        ),
        on_lock_lost=check_on_lock_lost(
            "log" if on_lock_lost is None else on_lock_lost, "singleton_lock_on_lock_lost"
        ),
        prefix=prefix,
        wait_timeout=number("singleton_lock_wait_timeout", 60.0),
        connect_timeout=number("singleton_lock_connect_timeout", 5.0),
        backend_options=dict(options),
        enqueue_once_ttl=number("singleton_lock_enqueue_once_ttl", 3600.0),
        beat_ttl=number("singleton_lock_beat_ttl", 30.0),
        beat_name=beat_name,
        beat_slot_grace=number("singleton_lock_beat_slot_grace", 60.0),
        outage_timeout=number("singleton_lock_outage_timeout", 900.0),
        outage_backoff_max=number("singleton_lock_outage_backoff_max", 60.0),
    )


_cache: weakref.WeakKeyDictionary[Any, Settings] = weakref.WeakKeyDictionary()
_cache_guard = threading.Lock()


def settings_for(app: Celery) -> Settings:
    """``app``'s settings, validated on first use and cached on the app."""
    with _cache_guard:
        settings = _cache.get(app)
        if settings is None:
            settings = _cache[app] = read_settings(app.conf)
        return settings
