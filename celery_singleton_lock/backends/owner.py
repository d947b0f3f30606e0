"""Who holds a lock, and how every backend stores that beside the lock.

A lock's stored value is ``"<token>\n<owner JSON>"``: the token for release and renewal
by the holder, the owner for people (``celery locks``), for a refusal's "held by task X",
and for :meth:`LockBackend.release_owned` from another process of the same worker.

The owner JSON is ``{"host": ..., "pid": ..., "task_id": ...}``, and, for a task's lock,
``"signature"``: the call as people read it (``shop.report(42,) {'full': True}``, at most
``SIGNATURE_CHARS``). ``release_owned`` compares the whole JSON exactly, so whoever
releases on an owner's behalf builds the same signature (the worker's main process does,
from the same message headers as its pool process).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

__all__ = ["HOST", "SIGNATURE_CHARS", "Owner", "call_signature", "split_stored", "stored_task_id"]

#: This machine's name as owners record it (read once: it is part of every owner).
HOST = socket.gethostname()
#: The longest signature stored with an owner: longer ones are cut and end in "...".
SIGNATURE_CHARS = 160


@dataclass(frozen=True)
class Owner:
    """Who holds a lock, stored beside it on the server for people and for revoke."""

    host: str
    pid: int
    task_id: str | None = None
    #: The call holding the lock, for people (see :func:`call_signature`); None: not a task.
    signature: str | None = None

    @classmethod
    def here(
        cls, task_id: str | None = None, *, pid: int | None = None, signature: str | None = None
    ) -> Owner:
        """This process (or its pool process ``pid``), optionally running ``task_id``."""
        return cls(host=HOST, pid=os.getpid() if pid is None else pid, task_id=task_id, signature=signature)

    @classmethod
    def of_message(cls, task_id: str) -> Owner:
        """The owner of a marker that stands for a queued message, not for a process
        (``enqueue_once``'s queued markers, beat's slot claims): whoever handles that
        message may clear it, so it names no host and no pid."""
        return cls(host="", pid=0, task_id=task_id)

    def as_json(self) -> str:
        """The owner as stored: compact JSON, compared exactly by ``release_owned``.

        Without a signature it is the same text as before signatures were stored.
        """
        fields: dict[str, object] = {"host": self.host, "pid": self.pid, "task_id": self.task_id}
        if self.signature is not None:
            fields["signature"] = self.signature
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Owner | None:
        """The owner in stored owner JSON (None if it is not one: a damaged value)."""
        try:
            fields = json.loads(text)
            host, pid, task_id = fields["host"], fields["pid"], fields.get("task_id")
            signature = fields.get("signature")
        except (ValueError, TypeError, KeyError):
            return None
        if not (
            isinstance(host, str) and isinstance(pid, int) and isinstance(task_id, str | None)
            and isinstance(signature, str | None)
        ):
            return None
        return cls(host=host, pid=pid, task_id=task_id, signature=signature)

    def stored_with(self, token: str) -> str:
        """The value a backend stores for a lock: ``"<token>\n<owner JSON>"``."""
        return f"{token}\n{self.as_json()}"


def call_signature(task_name: str, args_text: str, kwargs_text: str) -> str:
    """A task call as an operator reads it: ``name(args) {kwargs}``, at most
    ``SIGNATURE_CHARS`` characters.

    :param args_text: the positional arguments as text: the message's ``argsrepr``, which
        the caller may have set to hide secrets (Celery's own way), else a bounded repr.
    :param kwargs_text: the same for keyword arguments (``"{}"`` is left out).
    """
    text = f"{task_name}{args_text}"
    if kwargs_text and kwargs_text != "{}":
        text = f"{text} {kwargs_text}"
    if len(text) > SIGNATURE_CHARS:
        text = text[: SIGNATURE_CHARS - 3] + "..."
    return text


def split_stored(value: str | bytes) -> tuple[str, Owner | None]:
    """The token and the owner of a stored value (``Owner.stored_with``)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    token, _, owner = text.partition("\n")
    return token, Owner.from_json(owner) if owner else None


def stored_task_id(value: bytes | None) -> str | None:
    """The owner's task id in a value made by :meth:`Owner.stored_with` (None if absent)."""
    if not value:
        return None
    try:
        task_id = json.loads(value.split(b"\n", 1)[1]).get("task_id")
    except (IndexError, ValueError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None
