"""Who holds a lock, and how every backend stores that beside the lock.

A lock's stored value is ``"<token>\n<owner JSON>"``: the token for release and renewal
by the holder, the owner for people (``celery locks``), for a refusal's "held by task X",
and for :meth:`LockBackend.release_owned` from another process of the same worker.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

__all__ = ["HOST", "Owner", "stored_task_id"]

#: This machine's name as owners record it (read once: it is part of every owner).
HOST = socket.gethostname()


@dataclass(frozen=True)
class Owner:
    """Who holds a lock, stored beside it on the server for people and for revoke."""

    host: str
    pid: int
    task_id: str | None = None

    @classmethod
    def here(cls, task_id: str | None = None, *, pid: int | None = None) -> Owner:
        """This process (or its pool process ``pid``), optionally running ``task_id``."""
        return cls(host=HOST, pid=os.getpid() if pid is None else pid, task_id=task_id)

    @classmethod
    def of_message(cls, task_id: str) -> Owner:
        """The owner of a marker that stands for a queued message, not for a process
        (``enqueue_once``'s queued markers, beat's slot claims): whoever handles that
        message may clear it, so it names no host and no pid."""
        return cls(host="", pid=0, task_id=task_id)

    def as_json(self) -> str:
        """The owner as stored: compact JSON, compared exactly by ``release_owned``."""
        return json.dumps(
            {"host": self.host, "pid": self.pid, "task_id": self.task_id}, separators=(",", ":")
        )

    def stored_with(self, token: str) -> str:
        """The value a backend stores for a lock: ``"<token>\n<owner JSON>"``."""
        return f"{token}\n{self.as_json()}"


def stored_task_id(value: bytes | None) -> str | None:
    """The owner's task id in a value made by :meth:`Owner.stored_with` (None if absent)."""
    if not value:
        return None
    try:
        task_id = json.loads(value.split(b"\n", 1)[1]).get("task_id")
    except (IndexError, ValueError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None
