"""Telling a skipped run from a run that returned None, through the result backend.

A skipped run ends like any successful one (state SUCCESS, result ``Skip.result``:
callers' ``get()`` returns at once and chains go on), so the state and the result cannot
say it was skipped. Its stored result carries one field more instead::

    {"status": "SUCCESS", "result": null, ...,
     "singleton_lock_skipped": {"key": "<lock key>", "holder_task_id": "<id>" | null,
                                "reason": "superseded by <id>"}}   (reason: only when
                                                                    not "held by")

A client reads it with :func:`skip_info`::

    from celery_singleton_lock.results import skip_info

    result = report.delay(42)
    result.get()
    if (skip := skip_info(result)) is not None:
        print("skipped; the lock was held by", skip.holder_task_id)

The field is added where Celery builds the stored meta of that very run (the request
object Celery stores it with carries the mark), so it is in the same write as the state:
a client that sees SUCCESS sees the mark. Result backends that keep every field of the
meta keep it (Redis, the key-value stores, ``rpc://``, MongoDB); those that keep fixed
columns (the SQLAlchemy ``db+`` backend, django-celery-results) drop it: use the
``task-lock-skipped`` event or the ``task_skipped`` signal there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SKIPPED_FIELD", "SkipInfo", "mark_skipped", "skip_info"]

#: The field of a skipped run's stored result meta.
SKIPPED_FIELD = "singleton_lock_skipped"
#: Set on a backend instance whose stored meta carries the mark.
_MARKS_SKIPS = "_singleton_lock_marks_skips"


@dataclass(frozen=True)
class SkipInfo:
    """Why a run was skipped.

    :ivar key: the lock key it found taken (without the backend's prefix).
    :ivar holder_task_id: the task id of the run holding it, when the server told; for
        a superseded ``debounce`` call, the later call's task id.
    :ivar reason: None for a run whose lock was held; ``"superseded by <task id>"`` for a
        ``debounce`` call that a later call of its key replaced.
    """

    key: str
    holder_task_id: str | None
    reason: str | None = None


def skip_info(result: Any) -> SkipInfo | None:
    """The skip mark of a task's stored result: None when it ran (or has no result yet).

    :param result: an ``AsyncResult`` (or anything with ``id`` and ``backend``).
    """
    meta = result.backend.get_task_meta(result.id)
    mark = meta.get(SKIPPED_FIELD) if isinstance(meta, dict) else None
    if not isinstance(mark, dict):
        return None
    holder = mark.get("holder_task_id")
    reason = mark.get("reason")
    return SkipInfo(
        key=str(mark.get("key")),
        holder_task_id=holder if isinstance(holder, str) else None,
        reason=reason if isinstance(reason, str) else None,
    )


def mark_skipped(
    task: Any, request: Any, key: str, holder_task_id: str | None, *, reason: str | None = None
) -> None:
    """Mark the run of ``request`` as skipped in the result Celery stores for it.

    Only for a run whose result Celery stores (a worker, or ``apply()``): a direct call
    shares one request object between calls and stores nothing.
    """
    if not getattr(request, "id", None) or getattr(request, "called_directly", True):
        return
    mark = {"key": key, "holder_task_id": holder_task_id}
    if reason is not None:
        mark["reason"] = reason
    setattr(request, SKIPPED_FIELD, mark)
    _store_marks(task.backend)


def _store_marks(backend: Any) -> None:
    """Make ``backend`` (this thread's instance, the one Celery stores this run's result
    with) add the mark of a skipped request to the meta it stores.

    Celery builds every stored meta in ``_get_result_meta(result, state, traceback,
    request, ...)``; this instance's method is wrapped once to copy the mark from
    ``request``. Requests without one are stored exactly as before.
    """
    if getattr(backend, _MARKS_SKIPS, False):
        return
    build_meta = getattr(backend, "_get_result_meta", None)
    if build_meta is None:  # a result backend of its own kind: no mark, as documented
        return

    def with_skip_mark(*args: Any, **kwargs: Any) -> Any:
        meta = build_meta(*args, **kwargs)
        request = kwargs["request"] if "request" in kwargs else args[3] if len(args) > 3 else None
        mark = getattr(request, SKIPPED_FIELD, None)
        if mark is not None and isinstance(meta, dict):
            meta[SKIPPED_FIELD] = mark
        return meta

    backend._get_result_meta = with_skip_mark
    setattr(backend, _MARKS_SKIPS, True)
