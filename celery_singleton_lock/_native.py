"""Threads and locks of the operating system for the lease keeper, also under gevent.

``celery worker -P gevent`` monkey-patches the process before anything else runs: then
``threading.Thread`` starts a greenlet, and ``threading.Lock``, ``Condition`` and
``time.sleep`` switch to the gevent hub. A greenlet runs only when the running one
yields, so a keeper that is a greenlet never runs while a task body computes without
I/O: a 4 s busy loop under a 2 s lease lost its lock, and nobody said so (issue 9, 12).

The keeper therefore always runs on an OS thread, started and synchronised with the
original ``_thread`` functions (gevent keeps them: ``gevent.monkey.get_original``).
Without gevent these are exactly what ``threading`` uses. In a gevent process two more
rules apply, kept by lease.py:

* A gevent socket belongs to the hub of the thread that created it; used from another
  thread it fails ("Cannot switch to a different thread"). The keeper renews through a
  copy of the backend with connections of its own (``for_native_thread``).
* ``lock_lost`` receivers are code written for greenlets (their clients' sockets live on
  the worker's hub), so the signal is sent in a new greenlet on the hub of the thread that
  took the lock (:func:`poster`), not on the keeper's thread. The ERROR line is logged
  by the keeper at once.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["NativeThread", "Wakeup", "allocate_lock", "patched", "poster"]

#: Runs a callable in a new greenlet on one hub; callable from any thread.
Post = Callable[[Callable[[], object]], None]


def _original(name: str) -> Any:
    """``_thread.<name>`` as it was before any monkey-patching.

    Looked up once, at import: if gevent has not patched yet, ``_thread`` still holds the
    original, and a later patch does not change what we hold.
    """
    monkey = sys.modules.get("gevent.monkey")  # not imported: gevent patched nothing
    if monkey is not None:
        return monkey.get_original("_thread", name)
    return getattr(_thread, name)


#: A lock of the operating system, whatever gevent patched.
allocate_lock: Callable[[], _thread.LockType] = _original("allocate_lock")
_start_new_thread: Callable[..., int] = _original("start_new_thread")


def patched() -> bool:
    """True when gevent has monkey-patched ``threading`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


class Wakeup:
    """A wake-up call for one waiting thread: :meth:`wait` returns at :meth:`set` or timeout.

    A call made while nobody waits is kept for the next wait, so none is lost between a
    waiter's last look at its work and its wait.
    """

    def __init__(self) -> None:
        self._pending = allocate_lock()
        self._pending.acquire()  # held: no call pending

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: a call is pending already
            self._pending.release()

    def wait(self, timeout: float | None) -> bool:
        """True if woken by a call, False when ``timeout`` seconds passed (None: no limit)."""
        return self._pending.acquire(timeout=-1 if timeout is None else timeout)


class NativeThread:
    """``target`` running on a new OS thread (a daemon: the interpreter does not wait for it)."""

    def __init__(self, target: Callable[[], object]) -> None:
        self._alive = True
        _start_new_thread(self._run, (target,))

    def _run(self, target: Callable[[], object]) -> None:
        try:
            target()
        finally:
            self._alive = False

    def is_alive(self) -> bool:
        return self._alive


def poster() -> Post | None:
    """Where the calling thread's greenlets live, for code that must run among them.

    :returns: a function that runs a callable in a new greenlet on the calling thread's
        hub (it may be called from any thread; the greenlet starts when that hub next
        runs), or None when gevent has not patched this process: then call directly.
    """
    if not patched():
        return None
    gevent = importlib.import_module("gevent")  # imported already: it patched us
    hub = gevent.get_hub()

    def post(function: Callable[[], object]) -> None:
        hub.loop.run_callback_threadsafe(gevent.spawn, function)

    return post
