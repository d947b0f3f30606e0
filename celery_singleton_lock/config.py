"""The ``singleton_lock_*`` app settings, read and validated once per app.

Precedence everywhere: task option > app setting > default. Settings are found under
their lower-case names, so Django-style ``CELERY_SINGLETON_LOCK_TTL`` works with
``app.config_from_object("django.conf:settings", namespace="CELERY")``.

=================================  ============================================  =========
setting                            meaning                                       default
=================================  ============================================  =========
``singleton_lock_backend``         lock server URL, or a list of >= 3 Redis      see below
                                   URLs (Redlock: a quorum of masters)
``singleton_lock_ttl``             lease seconds                                 60
``singleton_lock_on_contention``   "skip", "retry", "wait", "raise", a chain     "skip"
                                   ("retry|skip"), a policy or policy class
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
``singleton_lock_metrics_port``    serve Prometheus metrics (metrics.py, read    unset
                                   there at worker start)
``singleton_lock_metrics_address`` the metrics server's address                  127.0.0.1
=================================  ============================================  =========

Without ``singleton_lock_backend`` the broker decides (``_default_backend_url``): a Redis
broker's server (a Sentinel broker's master, by ``broker_transport_options["master_name"]``),
``file://`` for a broker that serves one host, else an error.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

from celery import signals
from celery.app.utils import filter_hidden_settings

from celery_singleton_lock.backends import backend_class, shared_backend
from celery_singleton_lock.backends.base import _check_timeout, _check_ttl
from celery_singleton_lock.errors import ConfigurationError, mask_url
from celery_singleton_lock.policies import Policy, Skip, parse_policy

if TYPE_CHECKING:
    from celery import Celery

    from celery_singleton_lock.backends.base import LockBackend

__all__ = [
    "ON_LOCK_LOST",
    "Settings",
    "check_on_lock_lost",
    "check_ttl",
    "forget_settings",
    "settings_for",
    "warn_if_connect_timeout_exceeds",
]

logger = logging.getLogger("celery_singleton_lock.config")

ON_LOCK_LOST = ("log", "raise")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_ttl(value: Any, option: str) -> float:
    """``value`` as float seconds: a number from ``MIN_TTL`` (0.1) to ``MAX_TTL`` (10 years).

    :raises ConfigurationError: naming ``option`` (also for NaN and infinity).
    """
    return _check_ttl(value, option)


def warn_if_connect_timeout_exceeds(
    ttl: float, connect_timeout: float, ttl_option: str, where: str = ""
) -> bool:
    """Log a WARNING when ``connect_timeout`` is not below the lease TTL; True if it did.

    A renewal that waits ``connect_timeout`` for a hung server outlives the lease it
    renews, so such a lock is lost whenever the server hangs. A log line rather than a
    Python warning: test suites run with warnings as errors, and this is an operator's
    choice, not a bug.

    :param ttl_option: the TTL's setting or option name (``singleton_lock_ttl``, ``lock_ttl``).
    :param where: appended to the message, e.g. ``" of task shop.charge"``.
    """
    if connect_timeout < ttl:
        return False
    logger.warning(
        "singleton_lock_connect_timeout (%gs) is not below %s (%gs)%s: renewing against a "
        "hung lock server waits longer than the lease lasts, so the lock is lost; lower "
        "singleton_lock_connect_timeout or raise %s",
        connect_timeout, ttl_option, ttl, where, ttl_option,
    )
    return True


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
    #: None: ``Wait()`` waits without limit (the setting was ``math.inf``).
    wait_timeout: float | None = 60.0
    connect_timeout: float = 5.0
    backend_options: dict[str, Any] = field(default_factory=dict)
    enqueue_once_ttl: float = 3600.0
    beat_ttl: float = 30.0
    #: None: the app's main name (``Celery("proj")``), else "celery".
    beat_name: str | None = None
    beat_slot_grace: float = 60.0
    outage_timeout: float = 900.0
    outage_backoff_max: float = 60.0
    #: This process's backend per namespace, as ``(pid, backend)``: every task call asks.
    _backends: dict[str | None, tuple[int, LockBackend]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def backend(self, namespace: str | None = None) -> LockBackend:
        """This process's backend (one connection pool per process, made on first use).

        :param namespace: for keys of our own (``"queued"``, ``"beat"``), apart from every
            task's lock keys: it goes into the prefix (``singleton-lock.queued:...``), so no
            ``lock_key`` a user can write (they all land under ``singleton-lock:``) can
            collide with it.
        """
        pid = os.getpid()
        cached = self._backends.get(namespace)
        if cached is not None and cached[0] == pid:
            return cached[1]
        backend = shared_backend(
            self.backend_url,
            prefix=self.prefix if namespace is None else f"{self.prefix}.{namespace}",
            connect_timeout=self.connect_timeout,
            **self.backend_options,
        )
        self._backends[namespace] = (pid, backend)
        return backend

    def __repr__(self) -> str:
        # The dataclass repr would show the backend URL's password.
        urls = [self.backend_url] if isinstance(self.backend_url, str) else self.backend_url
        shown = ", ".join(repr(mask_url(url)) for url in urls)
        return f"<Settings backend={shown} prefix={self.prefix!r} ttl={self.ttl:g}>"


def _setting(conf: Any, name: str) -> Any:
    value = conf.get(name)
    return conf.get(name.upper()) if value is None else value


#: Brokers that serve one host only: every worker that takes their tasks runs on this
#: machine, so kernel file locks (file://) exclude them all.
_SINGLE_HOST_BROKERS = ("memory://", "filesystem://", "sqla+sqlite://")


def _default_backend_url(conf: Any) -> str:
    """The lock backend when ``singleton_lock_backend`` is not set, from the broker URL.

    A Redis broker: that server; a Sentinel broker: the master its Sentinels name. A
    broker that serves one host (``memory://``,
    ``filesystem://``, ``sqla+sqlite://``): ``file://``, the embedded backend, except
    ``memory://`` with ``task_always_eager``, where every task runs in the calling process
    and ``memory://`` excludes it without touching the disk (unit tests). Any other
    broker may be shared by several hosts, where no single-host default would be safe.

    :raises ConfigurationError: naming ``singleton_lock_backend``, with the choices.
    """
    broker = _setting(conf, "broker_url")
    if isinstance(broker, str) and broker.startswith(_REDIS_SCHEMES):
        return broker.split(";")[0]
    if isinstance(broker, str) and broker.startswith("sentinel://"):
        return _sentinel_url_of_broker(broker, _setting(conf, "broker_transport_options") or {})
    if isinstance(broker, str) and broker.startswith(_SINGLE_HOST_BROKERS):
        if broker.startswith("memory://") and _setting(conf, "task_always_eager"):
            return "memory://"
        return "file://"
    shown = f"{broker.split('://')[0]}://..." if isinstance(broker, str) else "not set"
    msg = (
        f"singleton_lock_backend is not set, and the broker ({shown}) is not Redis and may "
        "serve several hosts, so no lock server can be assumed: set "
        "app.conf.singleton_lock_backend to redis://host:6379/0, "
        "redlock://h1:6379,h2:6379,h3:6379/0, etcd://h1:2379,h2:2379,h3:2379, "
        "zookeeper://h1:2181,h2:2181,h3:2181, postgresql://user@host:5432/db, or "
        "file:///a/local/directory (only when every worker runs on this one host)"
    )
    raise ConfigurationError(msg, option="singleton_lock_backend")


def _sentinel_url_of_broker(broker: str, transport_options: Any) -> str:
    """Our ``sentinel://`` URL for kombu's Sentinel broker URL: ``sentinel://[:pw@]h1:26379;
    sentinel://h2:26379`` (the first one's password and database count, as in kombu) with
    ``broker_transport_options["master_name"]``.

    :raises ConfigurationError: naming ``broker_transport_options`` without a master name.
    """
    master_name = transport_options.get("master_name") if isinstance(transport_options, dict) else None
    if not isinstance(master_name, str) or not master_name:
        msg = (
            "singleton_lock_backend is not set and the broker is Redis Sentinel, but "
            "broker_transport_options has no 'master_name' to find the master by: set it "
            "(as kombu needs too), or set singleton_lock_backend to "
            "sentinel://h1:26379,h2:26379,h3:26379/<master name>/0"
        )
        raise ConfigurationError(msg, option="broker_transport_options")
    nodes = [urlsplit(part.strip()) for part in broker.split(";") if part.strip()]
    userinfo, at, _ = nodes[0].netloc.rpartition("@")
    hosts = ",".join(node.netloc.rpartition("@")[2] for node in nodes)
    db = nodes[0].path.strip("/") or "0"
    return f"sentinel://{userinfo}{at}{hosts}/{quote(master_name, safe='')}/{db}"


#: Query parameters that carry secrets: ``celery report`` shows a URL's query as written.
_SECRET_PARAMETER = re.compile(r"pass|secret|token", re.IGNORECASE)
_MASK = "********"


def _password(url: str) -> str:
    """The password part of ``url``'s userinfo, as every backend here splits it."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    return userinfo.partition(":")[2] if at else ""


def _check_censored(value: Any) -> None:
    """Refuse a ``singleton_lock_backend`` whose password ``celery report`` would show.

    ``celery report`` (``app.conf.humanize(censored=True)``) masks the password in the
    userinfo of one URL string, and shows lists and query strings as written. The check
    asks Celery's own censoring, so it follows whatever the installed Celery masks.

    :raises ConfigurationError: naming ``singleton_lock_backend`` (never the password).
    """
    urls = list(value) if isinstance(value, list | tuple) else [value]
    if not all(isinstance(url, str) for url in urls):
        return  # not a URL: backend_class reports it
    for url in urls:
        # Shown as written by every Celery: checked before asking it.
        try:
            parts = urlsplit(url)
        except ValueError:
            return  # a malformed host: backend_class reports it, masked

        if "@" in url.partition("://")[2][len(parts.netloc):]:
            msg = (
                f"singleton_lock_backend: a {parts.scheme}:// URL has an '@' after its host "
                "part, so its password would be shown unmasked (and not used as one): "
                "percent-encode '/', '?', '#' and '@' in a password (%2F %3F %23 %40)"
            )
            raise ConfigurationError(msg, option="singleton_lock_backend")
        secret = [name for name, _ in parse_qsl(parts.query) if _SECRET_PARAMETER.search(name)]
        if secret:
            msg = (
                f"singleton_lock_backend: the query parameter {secret[0]!r} would be shown "
                "unmasked by `celery report`; write the password in the URL "
                "(scheme://user:PASSWORD@host/...) or in singleton_lock_backend_options"
            )
            raise ConfigurationError(msg, option="singleton_lock_backend")
    try:
        censored = filter_hidden_settings({"singleton_lock_backend": value})["singleton_lock_backend"]
    except Exception:  # Celery < 5.7 fails on a URL of several hosts: it shows nothing at all
        return
    shown = list(censored) if isinstance(censored, list | tuple) else [censored]
    for url, after in zip(urls, shown, strict=False):
        parts = urlsplit(url)
        if _password(url) and (not isinstance(after, str) or _password(after) != _MASK):
            form = "a list of URLs" if len(urls) > 1 else f"this {parts.scheme}:// URL"
            msg = (
                f"singleton_lock_backend: `celery report` would show the password of {form} "
                "unmasked. For Redlock write one URL, redlock://:PASSWORD@h1:6379,h2:6379,"
                "h3:6379/0 (masked), or list the URLs without passwords and set "
                "singleton_lock_backend_options = {'password': ...} (masked; used by every "
                "master)"
            )
            raise ConfigurationError(msg, option="singleton_lock_backend")


def _check_backend_setting(sender: Any = None, **kwargs: Any) -> None:
    """At ``celery report``, worker and beat start (before any output): refuse a
    ``singleton_lock_backend`` that ``celery report`` would show with its password.

    ``celery report`` prints the settings without reading ours; Celery re-raises an
    error from this signal, so the report stops before showing anything.
    """
    conf = getattr(sender, "conf", None)
    value = _setting(conf, "singleton_lock_backend") if conf is not None else None
    if value:
        _check_censored(value)


signals.import_modules.connect(
    _check_backend_setting, dispatch_uid="celery_singleton_lock.config.check_backend_setting"
)


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no server could store the key
        return False
    return True


def _wait_timeout(value: Any) -> float | None:
    """``singleton_lock_wait_timeout``: 60 when unset; ``math.inf`` means no limit."""
    if value is None:
        return 60.0
    return _check_timeout(value, "singleton_lock_wait_timeout")


def read_settings(conf: Any) -> Settings:
    """Validate ``conf``'s ``singleton_lock_*`` settings.

    :raises ConfigurationError: naming the first bad setting.
    """
    url = _setting(conf, "singleton_lock_backend")
    if url:
        _check_censored(url)
    else:
        url = _default_backend_url(conf)
    if isinstance(url, list | tuple):
        url = tuple(url)
    backend_class(url, option="singleton_lock_backend").check_url(url, option="singleton_lock_backend")
    prefix = _setting(conf, "singleton_lock_prefix") or "singleton-lock"
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix or not _is_utf8(prefix):
        msg = f"singleton_lock_prefix must be UTF-8 text without braces, got {prefix!r}"
        raise ConfigurationError(msg, option="singleton_lock_prefix")
    options = _setting(conf, "singleton_lock_backend_options") or {}
    if not isinstance(options, dict):
        msg = f"singleton_lock_backend_options must be a dict, got {type(options).__name__}"
        raise ConfigurationError(msg, option="singleton_lock_backend_options")

    def number(name: str, default: float) -> float:
        value = _setting(conf, name)
        return default if value is None else check_ttl(value, name)

    warn_if_connect_timeout_exceeds(
        number("singleton_lock_ttl", 60.0),
        number("singleton_lock_connect_timeout", 5.0),
        "singleton_lock_ttl",
    )
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
        wait_timeout=_wait_timeout(_setting(conf, "singleton_lock_wait_timeout")),
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


def forget_settings(app: Celery) -> None:
    """Read ``app``'s settings again at their next use (a test changed ``app.conf``)."""
    with _cache_guard:
        _cache.pop(app, None)


def settings_for(app: Celery) -> Settings:
    """``app``'s settings, validated on first use and cached on the app."""
    with _cache_guard:
        settings = _cache.get(app)
        if settings is None:
            settings = _cache[app] = read_settings(app.conf)
        return settings
