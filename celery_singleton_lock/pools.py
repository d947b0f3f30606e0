"""Which Celery worker pools the locks work in, checked when a worker starts.

========== ======================================================================
pool       lease renewal
========== ======================================================================
prefork    one keeper thread per pool process (re-created after the fork)
solo       one keeper thread beside the body
threads    one keeper thread for every task thread of the process
gevent     one keeper thread of the operating system, not a greenlet, so a body
           that never yields keeps its lock (see _native.py); every backend but
           etcd, whose client (gRPC) cannot renew while the hub is busy
eventlet   refused: the worker does not start (Celery is deprecating the pool)
========== ======================================================================

The check runs on ``celeryd_after_setup``, in the worker's main process once its
logging is set up and before its pool or consumer starts. Celery logs and swallows
exceptions raised by signal receivers, so a refused pool is logged at CRITICAL (naming
the pool and what to use instead) and the worker exits with status 78 (``EX_CONFIG``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency import ALIASES
from celery.signals import celeryd_after_setup

from celery_singleton_lock.backends import backend_class
from celery_singleton_lock.config import settings_for
from celery_singleton_lock.errors import ConfigurationError

__all__ = ["check_pool", "pool_name"]

logger = logging.getLogger("celery_singleton_lock.pools")

#: sysexits.h: configuration error.
EX_CONFIG = 78


def pool_name(pool: Any) -> str:
    """Celery's name of a worker's pool (``"prefork"``, ``"gevent"``...), from the pool
    class or the string the worker was configured with; the dotted path if it has none."""
    if isinstance(pool, str):
        return pool
    path = f"{pool.__module__}:{pool.__qualname__}"
    return next((alias for alias, target in ALIASES.items() if target == path), path)


def check_pool(worker: Any) -> None:
    """Refuse a worker pool whose tasks could lose their locks unnoticed.

    :param worker: the starting :class:`celery.worker.WorkController`.
    :raises ConfigurationError: for ``eventlet``, and for ``gevent`` with a backend that
        refuses it (``LockBackend.gevent_refusal``: etcd).
    """
    pool = pool_name(worker.pool_cls)
    if pool == "eventlet":
        msg = (
            "celery-singleton-lock does not support the eventlet pool (-P eventlet), which "
            "Celery is deprecating: a lock renewed by a green thread is lost under a body that "
            "does not yield. Use -P gevent, threads or prefork."
        )
        raise ConfigurationError(msg, option="worker_pool")
    if pool == "gevent":
        url = settings_for(worker.app).backend_url
        refusal = backend_class(url, option="singleton_lock_backend").gevent_refusal
        if refusal is not None:
            raise ConfigurationError(refusal, option="worker_pool")


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _refuse_unsupported_pool(instance: Any = None, **_: Any) -> None:
    try:
        check_pool(instance)
    except ConfigurationError as exc:
        logger.critical("%s", exc)
        raise SystemExit(EX_CONFIG) from exc
