"""One object per process, made on first use and again in a forked child.

The lease keeper and the death watch are each a thread with state of its own; a forked
child inherits neither the thread nor the right to act on its parent's state, so it must
make its own. ``os.register_at_fork`` also replaces the guard, which the fork may have
copied while another thread held it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["PerProcess"]

_all: weakref.WeakSet[PerProcess[Any]] = weakref.WeakSet()


class PerProcess(Generic[T]):
    """``factory()``'s result for the calling process.

    :param allocate_lock: the guard's kind (the lease keeper needs an OS lock even under
        gevent; see _native.py).
    """

    def __init__(self, factory: Callable[[], T], allocate_lock: Callable[[], Any]) -> None:
        self._factory = factory
        self._allocate_lock = allocate_lock
        self._guard = allocate_lock()
        #: (pid, object); tests put their own here.
        self.current: tuple[int, T] | None = None
        _all.add(self)

    def get(self) -> T:
        pid = os.getpid()
        current = self.current
        if current is not None and current[0] == pid:
            return current[1]
        with self._guard:
            if self.current is None or self.current[0] != pid:
                self.current = (pid, self._factory())
            return self.current[1]

    def _forget(self) -> None:
        self.current = None
        self._guard = self._allocate_lock()


def _forget_all_after_fork() -> None:
    for each in list(_all):
        each._forget()


os.register_at_fork(after_in_child=_forget_all_after_fork)
