"""The semaphore rule of the queue stores (etcd, ZooKeeper): who in a line holds a slot.

Every acquisition of a key, exclusive or a slot of ``limit`` N, is one entry of the key's
one line, in the order they queued. An entry holds (a slot, or the lock) once fewer
entries than its *own* limit are ahead of it and none ahead is of its task. Each acquirer
enforces the limit it was given, stored in its entry, so a deploy that changes N needs
no cleanup: while both run, the line never holds more than the larger N (the entries
that hold sit in the first N places), and an exclusive lock is the same rule at place 0.

Holding never ends by itself: entries ahead only leave (later ones queue behind), so an
entry that holds keeps holding, and once the rule says so it can act on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["Queued", "holds", "tells_when_held"]


class Queued(Protocol):
    """An entry of a line as the rule sees it."""

    @property
    def limit(self) -> int:
        """How many may hold at once, for this acquirer (1: an exclusive lock)."""

    @property
    def task(self) -> str | None:
        """Its Celery task (the id, or a digest of it), if it is a task."""


def holds(ahead: Sequence[Queued], entry: Queued) -> bool:
    """Whether ``entry``, with ``ahead`` before it in its line, holds: fewer than its
    limit are ahead of it, and none of its task (a redelivered copy of a running task
    waits for the first delivery, never takes a second slot)."""
    if len(ahead) >= entry.limit:
        return False
    return not entry.task or all(e.task != entry.task for e in ahead)


def tells_when_held(ahead: Sequence[Queued], entry: Queued) -> bool:
    """Whether ``entry``, waiting, may watch only the entry just before it: that one is a
    semaphore's waiter kept only by its place, with a limit no smaller than ``entry``'s,
    so it holds before ``entry`` can, and then writes itself again (or leaves), waking
    ``entry``. Otherwise (a holder ahead, an exclusive lock's waiter, a smaller limit, a
    redelivered copy) ``entry`` watches every entry ahead of it for its departure."""
    if not ahead:
        return False
    predecessor, before = ahead[-1], ahead[:-1]
    return (
        predecessor.limit > 1
        and entry.limit <= predecessor.limit
        and len(before) >= predecessor.limit
        and (not predecessor.task or all(e.task != predecessor.task for e in before))
    )
