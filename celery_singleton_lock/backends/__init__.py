"""From a URL to a lock backend: the scheme picks the class, imported only when used.

Schemes are registered through the entry point group ``celery_singleton_lock.backends``
(``scheme = "module:Class"``, kombu-style), ours included, so another package adds one
with a line in its own ``pyproject.toml``. A missing optional dependency fails with the
``pip install`` line that brings it, and a misspelt scheme with the schemes we know.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import ipaddress
import os
import threading
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

from celery_singleton_lock.backends.base import LockBackend
from celery_singleton_lock.errors import ConfigurationError, mask_url

__all__ = [
    "BACKEND_ALIASES", "ENTRY_POINT_GROUP", "LockBackend", "backend_class", "connect",
    "registered_schemes", "shared_backend",
]

#: The entry point group that maps a URL scheme to "module:Class".
ENTRY_POINT_GROUP = "celery_singleton_lock.backends"

#: Our own schemes, as pyproject.toml registers them; used as they are when the package
#: runs from a source tree without installed metadata (a unit test keeps the two equal).
BACKEND_ALIASES: dict[str, str] = {
    "redis": "celery_singleton_lock.backends.redis:RedisBackend",
    "rediss": "celery_singleton_lock.backends.redis:RedisBackend",
    "unix": "celery_singleton_lock.backends.redis:RedisBackend",
    "memory": "celery_singleton_lock.backends.memory:MemoryBackend",
    "redlock": "celery_singleton_lock.backends.redlock:RedlockBackend",
    "etcd": "celery_singleton_lock.backends.etcd:EtcdBackend",
    "etcds": "celery_singleton_lock.backends.etcd:EtcdBackend",
    "zookeeper": "celery_singleton_lock.backends.zookeeper:ZooKeeperBackend",
    "zk": "celery_singleton_lock.backends.zookeeper:ZooKeeperBackend",
    "file": "celery_singleton_lock.backends.file:FileBackend",
    "postgresql": "celery_singleton_lock.backends.postgres:PostgresBackend",
    "postgres": "celery_singleton_lock.backends.postgres:PostgresBackend",
    "sentinel": "celery_singleton_lock.backends.sentinel:SentinelBackend",
    "rediscluster": "celery_singleton_lock.backends.cluster:ClusterBackend",
    "redisclusters": "celery_singleton_lock.backends.cluster:ClusterBackend",
}


def _check_bracketed_hosts(netloc: str) -> None:
    """Refuse a ``[host]`` that is no IPv6 address, in each host of ``netloc``.

    urlsplit does so itself from Python 3.11.4 on; on 3.10 it lets ``[nonsense]`` through
    (make test-matrix).

    :raises ValueError: naming the host (never the userinfo).
    """
    for host in netloc.rpartition("@")[2].split(","):
        if host.startswith("[") and "]" in host:
            inside = host[1:host.index("]")]
            try:
                ipaddress.IPv6Address(inside.partition("%")[0])
            except ValueError:
                msg = f"{inside!r} in brackets is not an IPv6 address"
                raise ValueError(msg) from None


def backend_class(url: str | Sequence[str], *, option: str = "url") -> type[LockBackend]:
    """The backend class serving ``url``'s scheme; a list of URLs is a Redlock quorum.

    :raises ConfigurationError: for an unknown scheme or a missing extra.
    """
    if isinstance(url, list | tuple):
        url = "redlock://"
    if not isinstance(url, str) or "://" not in url:
        # Not echoed: a mistyped URL may still carry a password.
        shown = "a str without '://'" if isinstance(url, str) else type(url).__name__
        msg = f"{option} must be a URL like redis://host:6379/0, got {shown}"
        raise ConfigurationError(msg, option=option)
    try:
        parts = urlsplit(url)
        _check_bracketed_hosts(parts.netloc)
        scheme = parts.scheme.lower()
    except ValueError as exc:  # a malformed host, e.g. unbalanced or bad [brackets]
        msg = f"{option}: {mask_url(url)!r} is not a valid URL ({exc})"
        raise ConfigurationError(msg, option=option) from None
    schemes = registered_schemes()
    target = schemes.get(scheme)
    if target is None:
        close = difflib.get_close_matches(scheme, schemes, n=1)
        hint = f"; did you mean {close[0]}://?" if close else ""
        known = ", ".join(f"{s}://" for s in sorted(schemes))
        msg = f"{option}: no lock backend for {mask_url(url)!r} (known: {known}){hint}"
        raise ConfigurationError(msg, option=option)
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ConfigurationError as exc:
        raise ConfigurationError(str(exc), option=option) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, LockBackend)):
        msg = f"{option}: the backend registered for {scheme}:// ({target}) is not a LockBackend class"
        raise ConfigurationError(msg, option=option)
    return cls


@functools.cache
def registered_schemes() -> dict[str, str]:
    """Every known URL scheme -> "module:Class": ours, then those of installed packages
    (a package may replace one of ours on purpose)."""
    schemes = dict(BACKEND_ALIASES)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        schemes[point.name.lower()] = point.value
    return schemes


def connect(url: str | Sequence[str], **options: Any) -> LockBackend:
    """Connect to the lock server at ``url``; no round trip happens until the first lock.

    >>> backend = connect("redis://127.0.0.1:6379/0")  # doctest: +SKIP
    >>> with backend.lock("report:42", ttl=30, timeout=10) as held:  # doctest: +SKIP
    ...     held.fencing_token

    :param url: a URL, or a list of Redis URLs (one per master) for Redlock.
    :param options: ``prefix``, ``connect_timeout``, and options of the backend's client
        (for Redis: ``ssl_ca_certs``, ``ssl_certfile``, ``username``...).
    """
    return backend_class(url).from_url(url, **options)


_shared: dict[tuple[Any, ...], LockBackend] = {}
_shared_guard = threading.Lock()


def shared_backend(url: str | Sequence[str], **options: Any) -> LockBackend:
    """The backend for ``url`` and ``options`` in this process, created on first use.

    The one cache of backends: tasks, beat and enqueue_once share it, so a worker process
    keeps one connection pool per server; a forked child gets its own.
    """
    cache_key = (os.getpid(), url if isinstance(url, str) else tuple(url), repr(sorted(options.items())))
    backend = _shared.get(cache_key)  # a dict read is atomic: no lock on the hot path
    if backend is not None:
        return backend
    with _shared_guard:
        backend = _shared.get(cache_key)
        if backend is None:
            backend = _shared[cache_key] = connect(url, **options)
        return backend
