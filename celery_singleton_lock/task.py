"""The Celery side: a task base class that holds a lock around exactly the task body.

Flow of one run in a worker::

    __call__ ─► derive_key ─► backend.attempt ─┬─ granted ──────────────► body ─► release
                                               └─ refused ─► policy ─┬─ HeldLock ─► body ─► release
                                                                     ├─ Skipped ─► return result
                                                                     └─ raises (Retry, LockContended)

Release is arranged in a ``finally`` around the body, so it covers success, exceptions,
``Ignore``/``Reject`` and ``Retry`` (Celery runs no ``after_return`` for the last three);
in a worker it happens in ``task_postrun``, just after Celery stored the result.
``self.retry()`` releases *before* Celery publishes the retry message, which another
worker may consume at once. A task killed by the worker (revoke with terminate, hard time
limit, lost child) has its lock released by the worker's main process once the killed
process is dead, and only if that very process held it (``request.py``).

A redelivered message (``acks_late``: a broker's visibility timeout, a lost connection)
carries the task id of its first delivery. It never runs beside that delivery (the
lock's owner has the same task id: it waits for it), and never after it finished: once
it holds the lock, a redelivery whose task id already has a ready state in the result
backend stands down (``Ignore``) instead of running the body again.

``enqueue_once=True`` adds a second, earlier gate, on the caller's side::

    apply_async ─► queued marker: attempt ─┬─ granted ─► publish (the marker expires by itself)
                                           └─ refused ─► AsyncResult(queued task's id), no publish
    __call__ (worker) ─► clear the marker by task id ─► the lock, as above

The marker is a lock in the ``<prefix>.queued`` namespace whose owner is the queued task's
id; it is not renewed, so a lost message blocks its signature for one marker TTL at most.

``debounce=S`` (``debounce_max_wait=M``) uses the same namespace to let only the latest
call of a key run (docs/limits.md)::

    apply_async ─► [M] burst lock: taken by a burst's first call for M s, else its refusal
                   names the burst and the time left in it
                ─► record "debounce:<key>[:<burst>]": take it, breaking the previous call's
                ─► publish, countdown min(S, time left), the burst in a header
    __call__ (worker) ─► the record names a later call ─► skipped, "superseded by <id>"
                      └► names this call, or is gone ─► the lock, as above

``throttle=S``: a run that succeeded hands its lock to ``LockBackend.keep_until`` instead of
releasing it, so the key stays taken until S seconds after the run started.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
import sys
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, NoReturn

from celery import Celery, Task, shared_task
from celery.exceptions import Ignore
from celery.exceptions import Retry as CeleryRetry
from celery.signals import task_postrun, worker_ready
from celery.states import READY_STATES
from celery.utils import uuid
from celery.utils.saferepr import saferepr

import celery_singleton_lock.events  # connects the worker-start switch of the lock events
import celery_singleton_lock.metrics  # connects the worker-start of the metrics server
import celery_singleton_lock.pools  # noqa: F401 - connects the worker-start check of the pool
from celery_singleton_lock import _observe, signals
from celery_singleton_lock.backends.base import MAX_TTL, LockBackend, Refused, check_limit
from celery_singleton_lock.backends.owner import Owner, call_signature
from celery_singleton_lock.config import (
    Settings,
    check_on_lock_lost,
    check_ttl,
    settings_for,
    warn_if_connect_timeout_exceeds,
)
from celery_singleton_lock.errors import (
    ConfigurationError,
    LockBackendUnavailable,
    LockContended,
    LockError,
    LockLost,
)
from celery_singleton_lock.keys import KeyDeriver, KeySpec, key_deriver, validate_key_spec
from celery_singleton_lock.lease import HeldLock, LeaseKeeper
from celery_singleton_lock.policies import (
    RETRIES_HEADER,
    Contention,
    Policy,
    Skipped,
    backoff_delay,
    lock_retries,
    parse_policy,
)
from celery_singleton_lock.results import mark_skipped

__all__ = ["SingletonTask", "current_lock", "singleton_task"]

logger = logging.getLogger("celery_singleton_lock.task")

_TASK_OPTIONS = (
    "lock_key", "lock_ttl", "on_contention", "on_lock_lost", "enqueue_once", "enqueue_once_ttl",
    "lock_limit", "throttle", "debounce", "debounce_max_wait",
)
#: Options of a call that make it more than "this signature, once more": a deduplicated
#: call would silently drop its callbacks, its chain or its place in a group.
_CALLBACK_OPTIONS = ("link", "link_error", "chain", "group_id", "chord")


class _LockedRun(NamedTuple):
    """A singleton task's body running in this context, and the lock it runs under."""

    task: Task
    #: None for a direct call (``task()``).
    task_id: str | None
    held: HeldLock


#: The singleton task bodies running in this context, innermost last.
_running: ContextVar[tuple[_LockedRun, ...]] = ContextVar("celery_singleton_lock_running", default=())


#: Apps whose singleton tasks run their bodies without any lock, with how many
#: ``testing.locking_disabled()`` blocks asked for it; the key None stands for every app.
unlocked_apps: dict[Celery | None, int] = {}


#: Locks whose task body has ended, released when Celery has stored the result; with the
#: deadline (``held.backend.clock``) a ``throttle`` keeps them taken until, if any.
_awaiting_postrun: dict[str, tuple[HeldLock, float | None]] = {}
_awaiting_postrun_guard = threading.Lock()


def current_lock() -> HeldLock | None:
    """The :class:`HeldLock` of the singleton task running here, or None outside one."""
    running = _running.get()
    return running[-1].held if running else None


@dataclass(frozen=True)
class TaskLockOptions:
    """A task's lock options, resolved against its app's settings and validated."""

    settings: Settings
    signature: inspect.Signature
    key_spec: KeySpec
    ttl: float
    policy: Policy
    on_lock_lost: str
    #: The task's own or the app's hard time limit; a request's own limit comes first.
    default_time_limit: float | None
    #: ``(task name, args, kwargs) -> lock key``, and the ``enqueue_once`` marker's key.
    key_for: KeyDeriver
    marker_key_for: KeyDeriver
    enqueue_once: bool = False
    enqueue_once_ttl: float = 3600.0
    lock_limit: int = 1
    throttle: float | None = None
    debounce: float | None = None
    debounce_max_wait: float | None = None


def _call_signature(cls: type[Task]) -> inspect.Signature | None:
    """The signature callers use, without a bound task ``self``; None when unknown."""
    run = inspect.getattr_static(cls, "run", None)
    if run is None or run is Task.run:
        return None
    if isinstance(run, staticmethod):
        return inspect.signature(run.__func__)
    signature = inspect.signature(run)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _check_task_options(options: dict[str, Any], signature: inspect.Signature | None) -> None:
    """Validate the options a user wrote on a task, naming the first bad one."""
    if options.get("lock_ttl") is not None:
        check_ttl(options["lock_ttl"], "lock_ttl")
    if options.get("on_contention") is not None:
        parse_policy(options["on_contention"], "on_contention")
    if options.get("on_lock_lost") is not None:
        check_on_lock_lost(options["on_lock_lost"], "on_lock_lost")
    if options.get("enqueue_once") is not None and not isinstance(options["enqueue_once"], bool):
        msg = f"enqueue_once must be True or False, got {options['enqueue_once']!r}"
        raise ConfigurationError(msg, option="enqueue_once")
    if options.get("enqueue_once_ttl") is not None:
        check_ttl(options["enqueue_once_ttl"], "enqueue_once_ttl")
    if options.get("lock_limit") is not None:
        check_limit(options["lock_limit"], "lock_limit")
    for name in ("throttle", "debounce", "debounce_max_wait"):
        if options.get(name) is not None:
            check_ttl(options[name], name)
    debounce, max_wait = options.get("debounce"), options.get("debounce_max_wait")
    if max_wait is not None and debounce is None:
        msg = "debounce_max_wait bounds a debounce: set debounce too"
        raise ConfigurationError(msg, option="debounce_max_wait")
    if max_wait is not None and debounce is not None and max_wait < debounce:
        msg = f"debounce_max_wait ({max_wait!r}s) must not be shorter than debounce ({debounce!r}s)"
        raise ConfigurationError(msg, option="debounce_max_wait")
    if debounce is not None and options.get("enqueue_once"):
        msg = (
            "debounce and enqueue_once both collapse queued calls, in two ways that cannot "
            "be combined (the latest call's arguments against the first call's): choose one"
        )
        raise ConfigurationError(msg, option="debounce")
    validate_key_spec(options.get("lock_key"), signature)


class SingletonTask(Task):  # type: ignore[misc]
    """A task that runs once at a time per lock key; see the module docstring.

    Options, as ``@app.task(base=SingletonTask, ...)`` keywords or class attributes:

    :ivar lock_key: None (task name + all bound arguments), a tuple of argument names,
        a format string naming a shared resource (``"invoice:{invoice_id}"``), or a
        callable taking the task's arguments and returning the resource name.
    :ivar lock_ttl: lease seconds, renewed about every third of it while the body runs.
    :ivar on_contention: "skip", "retry", "wait", "raise", a chain such as
        ``"retry|skip"`` or ``Retry(max_retries=3) | Skip()``, a policy object, or a
        policy class (made with no arguments).
    :ivar on_lock_lost: "log" (default): log at ERROR and send ``lock_lost``; "raise":
        also fail the task with :class:`LockLost` when the body returns, since its work
        was not exclusive. ``current_lock().ensure_held()`` raises in either case.
    :ivar enqueue_once: True: ``delay``/``apply_async`` of a call whose signature (task
        name + all bound arguments) is queued and not started yet publishes nothing and
        returns the queued task's ``AsyncResult``. Calls with callbacks (``link``, a
        chain, a group or chord) are always published. See the module docstring.
    :ivar enqueue_once_ttl: seconds a queued marker lives unless its task starts (plus
        the call's countdown or eta); default ``singleton_lock_enqueue_once_ttl`` (3600).
    :ivar lock_limit: up to this many bodies of one key at once (a counting semaphore);
        the next one meets ``on_contention``. Default 1.
    :ivar throttle: seconds: after a run of a key starts and succeeds, the key stays
        taken until this long after its start (or its end, if later); a failed run
        releases at its end. Duplicates meet ``on_contention`` meanwhile.
    :ivar debounce: seconds: a call of a key within this long of the previous call of it
        supersedes that one; the latest call runs this long after it was made, with its
        arguments. Superseded calls end as skipped. See :meth:`apply_async`.
    :ivar debounce_max_wait: seconds: a burst of debounced calls runs at most this long
        after its first call, however often calls keep coming.
    """

    #: A refused lock is an expected outcome: Celery logs it without a traceback.
    throws: ClassVar[tuple[type[BaseException], ...]] = (LockContended,)
    #: The worker-side request: frees the lock of a killed pool process once it is dead.
    Request = "celery_singleton_lock.request:SingletonRequest"

    lock_key: ClassVar[KeySpec] = None
    lock_ttl: ClassVar[float | None] = None
    on_contention: ClassVar[Any] = None
    on_lock_lost: ClassVar[str | None] = None
    enqueue_once: ClassVar[bool] = False
    enqueue_once_ttl: ClassVar[float | None] = None
    lock_limit: ClassVar[int | None] = None
    throttle: ClassVar[float | None] = None
    debounce: ClassVar[float | None] = None
    debounce_max_wait: ClassVar[float | None] = None

    _lock_options: ClassVar[TaskLockOptions | None] = None

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        # Runs at decoration (or app finalize) time: bad options fail here, not mid-task.
        super().on_bound(app)
        if _call_signature(cls) is not None:
            cls._lock_options = None
            cls.lock_options()

    @classmethod
    def lock_options(cls) -> TaskLockOptions:
        """This task's resolved lock options (task option > app setting > default)."""
        options = cls.__dict__.get("_lock_options")  # never a parent class's
        if options is None:
            signature = _call_signature(cls)
            if signature is None:
                msg = f"{cls.__name__} has no run() to lock around"
                raise ConfigurationError(msg, option="base")
            raw = {name: getattr(cls, name) for name in _TASK_OPTIONS}
            _check_task_options(raw, signature)
            settings = settings_for(cls._get_app())
            key_spec = validate_key_spec(raw["lock_key"], signature)
            options = TaskLockOptions(
                settings=settings,
                signature=signature,
                key_spec=key_spec,
                ttl=settings.ttl if raw["lock_ttl"] is None else float(raw["lock_ttl"]),
                policy=(
                    settings.on_contention
                    if raw["on_contention"] is None
                    else parse_policy(raw["on_contention"])
                ),
                on_lock_lost=raw["on_lock_lost"] or settings.on_lock_lost,
                default_time_limit=cls.time_limit or cls._get_app().conf.task_time_limit,
                enqueue_once=bool(raw["enqueue_once"]),
                enqueue_once_ttl=(
                    settings.enqueue_once_ttl
                    if raw["enqueue_once_ttl"] is None
                    else float(raw["enqueue_once_ttl"])
                ),
                key_for=key_deriver(signature, key_spec),
                marker_key_for=key_deriver(signature, None),
                lock_limit=1 if raw["lock_limit"] is None else int(raw["lock_limit"]),
                throttle=_seconds_or_none(raw["throttle"]),
                debounce=_seconds_or_none(raw["debounce"]),
                debounce_max_wait=_seconds_or_none(raw["debounce_max_wait"]),
            )
            if raw["lock_ttl"] is not None:
                warn_if_connect_timeout_exceeds(
                    options.ttl, settings.connect_timeout, "lock_ttl", f" of task {cls.name}"
                )
            cls._lock_options = options
        return options

    def lock_key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The lock key a call with ``args``/``kwargs`` takes."""
        return self.lock_options().key_for(self.name, args, kwargs)

    def queued_marker_key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The ``enqueue_once`` marker key of a call: task name + all bound arguments.

        Derived like a lock key with ``lock_key=None`` whatever this task's ``lock_key``:
        two calls are one queued job only when every argument matches, while ``lock_key``
        may also make different jobs exclude each other (``sync(1)`` and
        ``sync(1, full=True)``), and must not make one of them vanish.
        """
        return self.lock_options().marker_key_for(self.name, args, kwargs)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``apply_async``; with ``enqueue_once``, a queued duplicate is not published.

        :returns: the new task's ``AsyncResult``, or the already queued one's (same id).
        """
        def publish(task_id: str | None, **changed: Any) -> Any:
            return super(SingletonTask, self).apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **{**options, **changed}
            )

        if (
            not (self.enqueue_once or self.debounce is not None)
            or self.app.conf.task_always_eager
            or self._runs_unlocked()
        ):
            return publish(task_id)
        lock_options = self.lock_options()
        # Celery's retry republishes the running task under its own id: it must go out.
        republish = task_id is not None and task_id == self.request.id
        if lock_options.debounce is not None:
            if republish:
                return publish(task_id)
            return self._publish_debounced(publish, args, kwargs, task_id or uuid(), options)
        must_publish = republish or link is not None or link_error is not None or any(
            options.get(name) for name in _CALLBACK_OPTIONS
        )
        task_id = task_id or uuid()
        key = self.queued_marker_key_for(tuple(args or ()), dict(kwargs or {}))
        # An eta decades away must not make the marker's TTL an invalid one.
        ttl = min(lock_options.enqueue_once_ttl + _seconds_until_start(options), MAX_TTL)
        backend = lock_options.settings.backend("queued")
        try:
            outcome = backend.attempt(
                key, ttl, owner=Owner.of_message(task_id), sender=self
            )
        except LockBackendUnavailable as exc:
            # The marker only saves a message; the run-time lock still guards the body.
            logger.warning("%s[%s]: publishing without a queued marker: %s", self.name, task_id, exc)
            return publish(task_id)
        if isinstance(outcome, HeldLock):
            LeaseKeeper.for_process().untrack(outcome)  # not renewed: it ends at its TTL
            try:
                return publish(task_id)
            except BaseException:
                outcome.release_quietly()
                raise
        if must_publish or outcome.holder_task_id is None:
            return publish(task_id)
        logger.info(
            "%s: the same call is already queued as %s; not publishing it again",
            self.name, outcome.holder_task_id,
        )
        return self.AsyncResult(outcome.holder_task_id)

    def _publish_debounced(
        self, publish: Any, args: Any, kwargs: Any, task_id: str, options: dict[str, Any]
    ) -> Any:
        """Publish a debounced call to start ``debounce`` seconds from now, recorded as the
        latest call of its key: the earlier calls' messages, when they come due, find a
        later call recorded and end as skipped (see the ``debounce`` section of the module
        docstring). A call's own countdown or eta, if later, is kept."""
        options_ = self.lock_options()
        assert options_.debounce is not None
        key = self.lock_key_for(tuple(args or ()), dict(kwargs or {}))
        backend = options_.settings.backend("queued")
        try:
            burst, delay = "", options_.debounce
            if options_.debounce_max_wait is not None:
                burst, window_left = self._join_burst(backend, key, task_id, options_.debounce_max_wait)
                delay = min(delay, window_left)
            delay = max(delay, _seconds_until_start(options))
            record_ttl = min(delay + options_.enqueue_once_ttl, MAX_TTL)
            self._record_latest(backend, _debounce_record_key(key, burst), task_id, record_ttl)
        except LockError as exc:
            # Without its record the call runs undebounced: one run too many, none lost.
            logger.warning("%s[%s]: publishing without debouncing it: %s", self.name, task_id, exc)
            return publish(task_id)
        headers = {**(options.get("headers") or {}), DEBOUNCE_HEADER: burst}
        try:
            return publish(task_id, countdown=delay, eta=None, headers=headers)
        except BaseException:
            # A record naming a message never sent would make the earlier calls skip for it.
            with contextlib.suppress(LockError):
                backend.release_owned(_debounce_record_key(key, burst), Owner.of_message(task_id))
            raise

    def _join_burst(
        self, backend: LockBackend, key: str, task_id: str, max_wait: float
    ) -> tuple[str, float]:
        """The burst of debounced calls this call belongs to, and the seconds left in its
        ``debounce_max_wait`` window: a lock that the burst's first call takes for
        ``max_wait`` seconds, whose owner names the burst and the window's end (Unix
        time, for a store that cannot tell a holder's TTL)."""
        ends_at = time.time() + max_wait
        opened = backend.attempt(
            f"debounce-burst:{key}", max_wait,
            owner=Owner.of_message(f"{task_id}@{ends_at:.3f}"), sender=self,
        )
        if isinstance(opened, HeldLock):
            LeaseKeeper.for_process().untrack(opened)  # not renewed: it ends with the window
            return f"{task_id}@{ends_at:.3f}", max_wait
        burst = opened.holder_task_id
        if burst is None:  # a value that is not ours: no burst to join, so none to bound
            return "", max_wait
        left = opened.holder_ttl
        if left is None:
            try:
                left = float(burst.rpartition("@")[2]) - time.time()
            except ValueError:
                left = max_wait
        return burst, max(0.0, left)

    def _record_latest(self, backend: LockBackend, record_key: str, task_id: str, ttl: float) -> None:
        """Make ``task_id`` the call that ``record_key`` names: take the record, breaking
        the one of the call before (a few tries: callers of one key at the same instant
        break each other's, and whichever holds it last is as latest as any)."""
        owner = Owner.of_message(task_id)
        for _ in range(_RECORD_TRIES):
            outcome = backend.attempt(record_key, ttl, owner=owner, sender=self)
            if isinstance(outcome, HeldLock):
                LeaseKeeper.for_process().untrack(outcome)  # not renewed: it ends at its TTL
                return
            if outcome.holder_task_id is not None:
                backend.release_owned(record_key, Owner.of_message(outcome.holder_task_id))
            else:
                for info in backend.lock_info(record_key):
                    backend.break_lock(info)
        logger.info("%s[%s]: other calls of the same key recorded themselves later", self.name, task_id)

    def _superseded_by(self, key: str, request: Any) -> str | None:
        """The task id of a later debounced call of ``key``, if one was made since this
        one (which then does not run); None: run. A run that cannot tell runs."""
        burst = _header(request, DEBOUNCE_HEADER)
        if not isinstance(burst, str) or request.retries or lock_retries(request):
            return None  # not a debounced message, or it passed this check before retrying
        record_key = _debounce_record_key(key, burst)
        backend = self.lock_options().settings.backend("queued")
        try:
            probe = backend.attempt(record_key, 1.0, owner=Owner.of_message(request.id), sender=self)
        except LockBackendUnavailable as exc:
            logger.warning("%s[%s]: cannot tell whether a later call superseded it (%s); running",
                           self.name, request.id, exc)
            return None
        if isinstance(probe, HeldLock):  # the record expired: never lose a call, run it
            LeaseKeeper.for_process().untrack(probe)
            probe.release_quietly()
            return None
        # The record stays: a copy of this same call due later finds it and skips too.
        holder = probe.holder_task_id
        return None if holder == request.id else (holder or "a later call")

    def _runs_unlocked(self) -> bool:
        return bool(unlocked_apps) and (None in unlocked_apps or self._get_app() in unlocked_apps)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if unlocked_apps and self._runs_unlocked():
            return super().__call__(*args, **kwargs)
        options = self.lock_options()
        key = self.lock_key_for(args, kwargs)
        request = self.request
        if options.enqueue_once and request.id and not request.called_directly:
            self._clear_queued_marker(args, kwargs, request.id)
        if options.debounce is not None and request.id and not request.called_directly:
            later = self._superseded_by(key, request)
            if later is not None:
                logger.info("skipped %s[%s]: superseded by the later call %s", self.name, request.id, later)
                reason = f"superseded by {later}"
                mark_skipped(self, request, key, later, reason=reason)
                signals.task_skipped.send(sender=self, key=key, task_id=request.id, reason=reason)
                if _observe.observer is not None:
                    _observe.observer.superseded(self, key, later)
                return None
        owner = Owner.here(request.id, signature=lock_signature(self.name, request, args, kwargs))
        try:
            backend = options.settings.backend()
            outcome = backend.attempt(
                key, options.ttl, owner=owner, sender=self, limit=options.lock_limit
            )
            decided = (
                self._on_contended(key, backend, owner, outcome, options)
                if isinstance(outcome, Refused)
                else outcome
            )
        except LockBackendUnavailable as exc:
            self._on_backend_unavailable(exc)
        if isinstance(decided, Skipped):
            return decided.result
        if _observe.observer is not None:
            _observe.observer.acquired(self, decided)
        if _is_redelivered(request) and self._already_finished(request.id):
            # The first delivery finished (and stored its result before releasing).
            decided.release_quietly()
            logger.info("%s[%s] already finished; ignoring its redelivery", self.name, request.id)
            raise Ignore
        return self._run_holding(decided, options, request, args, kwargs)

    def _clear_queued_marker(self, args: tuple[Any, ...], kwargs: dict[str, Any], task_id: str) -> None:
        # At start, not at the end: from now on one more call may queue while this one runs.
        options = self.lock_options()
        key = self.queued_marker_key_for(args, kwargs)
        try:
            options.settings.backend("queued").release_owned(key, Owner.of_message(task_id))
        except LockError as exc:
            logger.warning(
                "%s[%s]: could not clear its queued marker (%s); it expires within %ss",
                self.name, task_id, exc, options.enqueue_once_ttl,
            )

    def _run_holding(
        self,
        held: HeldLock,
        options: TaskLockOptions,
        request: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        hard_limit = (getattr(request, "timelimit", None) or (None,))[0] or options.default_time_limit
        if hard_limit:
            held.stop_renewal_at(held.backend.clock() + float(hard_limit))
        running = _running.get()
        token = _running.set((*running, _LockedRun(self, request.id, held)))
        started = held.backend.clock()
        succeeded = False
        try:
            if request.called_directly or running:
                result = super().__call__(*args, **kwargs)  # pushes a request, as Celery does
            else:
                # Celery's tracer pushed this run's request and task already; like its own
                # fast path for a task without __call__, run the body at once.
                result = self.run(*args, **kwargs)
            succeeded = True
        finally:
            # Whatever ended the body: a loss not announced yet is announced now.
            lost_during_run = held.settle()
            _running.reset(token)
            # A throttle keeps the key of a successful run only: a failure frees it now.
            keep_until = (
                started + options.throttle
                if succeeded and options.throttle is not None and not lost_during_run
                else None
            )
            self._release_after_run(
                held, request.id if not request.called_directly else None, keep_until
            )
        if lost_during_run and options.on_lock_lost == "raise":
            msg = f"lock {held.key!r} was lost while the task ran: {held.lost_reason}"
            raise LockLost(msg, key=held.key)
        return result

    def _on_contended(
        self,
        key: str,
        backend: LockBackend,
        owner: Owner,
        refused: Refused,
        options: TaskLockOptions,
    ) -> HeldLock | Skipped:
        request = self.request
        contention = Contention(
            key=key,
            ttl=options.ttl,
            backend=backend,
            owner=owner,
            refused=refused,
            task=self,
            default_wait_timeout=options.settings.wait_timeout,
            limit=options.lock_limit,
        )
        if request.id and refused.holder_task_id == request.id:
            return self._on_redelivered(contention)
        signals.lock_contended.send(
            sender=self, key=key, task_id=request.id, policy=options.policy
        )
        observer = _observe.observer
        started = time.perf_counter()
        if observer is not None:
            observer.contended(self, contention)
        try:
            outcome = options.policy(contention)
        except CeleryRetry:
            if observer is not None:
                observer.contention_ended(self, contention, "retried", time.perf_counter() - started)
            raise
        except LockBackendUnavailable:
            raise  # an outage, not an outcome of the contention: __call__ reports it
        except BaseException:
            if observer is not None:
                observer.contention_ended(self, contention, "raised", time.perf_counter() - started)
            raise
        if isinstance(outcome, Skipped):
            holder = refused.holder_task_id
            logger.info(
                "skipped %s[%s]: lock %r is held by %s",
                self.name, request.id, key, f"task {holder}" if holder else "another task",
            )
            mark_skipped(self, request, key, holder)
            signals.task_skipped.send(sender=self, key=key, task_id=request.id)
            if observer is not None:
                observer.contention_ended(self, contention, "skipped", time.perf_counter() - started)
            return outcome
        if not isinstance(outcome, HeldLock):
            msg = f"contention policy {options.policy!r} returned {outcome!r}, not a lock or Skipped"
            raise ConfigurationError(msg, option="on_contention")
        if observer is not None:
            observer.contention_ended(self, contention, "waited", time.perf_counter() - started)
        return outcome

    def _on_redelivered(self, contention: Contention) -> HeldLock:
        # The same task id holds the lock: this message is a redelivery (acks_late, a
        # broker's visibility timeout) of a run that is still going or that died. Wait for
        # that run to finish or its lease to expire; then run only if it left no result.
        # Skipping at once would lose the task when the first run had crashed.
        request = self.request
        logger.info(
            "%s[%s] is a redelivery while its first delivery holds %r; waiting for it",
            self.name, request.id, contention.key,
        )
        held = contention.wait(timeout=None)
        assert held is not None  # an unbounded wait returns only with the lock
        if not _is_redelivered(request) and self._already_finished(request.id):
            # A transport that does not flag redeliveries: __call__ will not look again.
            held.release_quietly()
            logger.info("%s[%s] already finished; ignoring its redelivery", self.name, request.id)
            raise Ignore
        return held

    def _already_finished(self, task_id: str) -> bool:
        if self.ignore_result:
            return False
        try:
            return self.AsyncResult(task_id).state in READY_STATES
        except Exception:  # no result backend, or it is down: at-least-once it is
            return False

    def _on_backend_unavailable(self, exc: LockBackendUnavailable) -> NoReturn:
        # Fail closed: the body never runs without the lock. A worker retries, with a
        # budget of its own (time, not count), so an outage of minutes costs no task.
        request = self.request
        if _observe.observer is not None:
            _observe.observer.backend_error(self, exc.url, "acquire")
        if request.called_directly or request.is_eager:
            raise exc
        settings = self.lock_options().settings
        counts = lock_retries(request)
        since = float(counts.get("unavailable_since") or time.time())
        outage = time.time() - since
        if outage >= settings.outage_timeout:
            msg = (
                f"the lock server was unreachable for {outage:.0f}s "
                f"(singleton_lock_outage_timeout={settings.outage_timeout:g}s); giving up: {exc}"
            )
            raise LockBackendUnavailable(msg, url=exc.url, key=exc.key) from None
        tries = int(counts.get("unavailable", 0))
        # 1, 2, 4 ... s up to outage_backoff_max, each drawn from its upper half.
        delay = backoff_delay(
            tries, first=1.0, factor=2.0, cap=settings.outage_backoff_max, spread=(0.5, 1.0)
        )
        countdown = min(delay, settings.outage_timeout - outage)
        logger.warning(
            "%s[%s]: %s; retry %d in %.1fs (unreachable for %.0fs of %gs)",
            self.name, request.id, exc, tries + 1, countdown, outage, settings.outage_timeout,
        )
        raise self.retry_for_lock("unavailable", countdown, exc, unavailable_since=since)

    def retry_for_lock(
        self, reason: str, countdown: float, exc: LockError, **state: Any
    ) -> CeleryRetry:
        """Publish this run again in ``countdown`` seconds, counting the retry under
        ``reason`` apart from ``request.retries`` (the task's own ``self.retry()`` budget).

        Raises ``Retry`` (state RETRY) in a worker, like ``self.retry()``; in eager mode
        it falls back to Celery's retry, which runs the task again at once.
        """
        request = self.request
        if request.is_eager:  # eager runs count in request.retries (Contention.retries)
            raise self.retry(countdown=countdown, exc=exc, max_retries=sys.maxsize)
        counts = {**lock_retries(request), **state}
        counts[reason] = int(counts.get(reason, 0)) + 1
        headers = {**(request.headers or {}), RETRIES_HEADER: counts}
        again = self.signature_from_request(request, None, None, countdown=countdown, headers=headers)
        again.apply_async()
        raise CeleryRetry(exc=exc, when=countdown, sig=again)

    def _release_after_run(
        self, held: HeldLock, task_id: str | None, keep_until: float | None = None
    ) -> None:
        # In a worker, release once Celery has stored the result (task_postrun): a
        # redelivered copy that then gets the lock must see that this run finished.
        # Renewal stops now, so even a lost postrun cannot keep the lock past one TTL.
        if held.released:
            return
        if task_id is None:
            _let_go(held, keep_until)
            return
        held.stop_renewal_at(held.backend.clock())
        with _awaiting_postrun_guard:
            _awaiting_postrun[task_id] = (held, keep_until)

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``retry``, releasing this run's lock first.

        Celery publishes the retry message (same task id) before raising ``Retry``; if we
        still held the lock, the retry could reach another worker at once and be skipped
        by our own lock.
        """
        task_id = self.request.id
        for run in reversed(_running.get()):
            if run.task is self and run.task_id == task_id:
                run.held.release_quietly()
                break
        return super().retry(*args, **kwargs)


def lock_signature(task_name: str, request: Any, args: Any, kwargs: Any) -> str:
    """The call as ``celery locks`` shows it, stored with the owner: the message's
    ``argsrepr``/``kwargsrepr`` (a caller sets them to hide secrets; Celery's own logs use
    them too), else a bounded repr. The worker's main process builds the same text from the
    same message for ``release_owned`` (request.py)."""
    return call_signature(
        task_name,
        getattr(request, "argsrepr", None) or saferepr(tuple(args or ())),
        getattr(request, "kwargsrepr", None) or saferepr(dict(kwargs or {})),
    )


#: The header of a debounced call's message: the burst it belongs to ("" without
#: ``debounce_max_wait``), which names its record.
DEBOUNCE_HEADER = "singleton_lock_debounce"
#: Takes of a debounce record before a call leaves it to a caller of the same instant.
_RECORD_TRIES = 4


def _debounce_record_key(key: str, burst: str) -> str:
    return f"debounce:{key}" + (f":{burst}" if burst else "")


def _header(request: Any, name: str) -> Any:
    """A message header of ours: Celery puts unknown headers on the request, or keeps them
    in ``request.headers``."""
    value = getattr(request, name, None)
    return (getattr(request, "headers", None) or {}).get(name) if value is None else value


def _is_redelivered(request: Any) -> bool:
    """True for a message the broker delivered before (Redis restores, AMQP redelivery)."""
    return bool((getattr(request, "delivery_info", None) or {}).get("redelivered"))


def _seconds_until_start(options: dict[str, Any]) -> float:
    """How long a call's countdown or eta keeps its message queued before it may start."""
    countdown = options.get("countdown")
    if isinstance(countdown, int | float) and not isinstance(countdown, bool):
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if isinstance(eta, str):
        eta = dt.datetime.fromisoformat(eta)
    if isinstance(eta, dt.datetime):
        if eta.tzinfo is None:  # Celery reads a naive eta as UTC
            eta = eta.replace(tzinfo=dt.timezone.utc)
        return max(0.0, (eta - dt.datetime.now(dt.timezone.utc)).total_seconds())
    return 0.0


def _seconds_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _let_go(held: HeldLock, keep_until: float | None) -> None:
    """Release ``held`` now, or, for a ``throttle``, keep it taken until ``keep_until``."""
    if keep_until is None:
        held.release_quietly()
        return
    try:
        held.backend.keep_until(held, keep_until)
    except LockError as exc:
        # It ends by its TTL instead: the window is at most one TTL, never unbounded.
        logger.error(
            "could not keep %r taken for its throttle: %s; it expires within %ss", held.key, exc, held.ttl
        )


@task_postrun.connect  # type: ignore[untyped-decorator]
def _release_after_result(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    with _awaiting_postrun_guard:
        awaiting = _awaiting_postrun.pop(task_id, None) if task_id else None
    if awaiting is not None and isinstance(sender, SingletonTask):
        _let_go(*awaiting)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _check_lock_server(sender: Any = None, **_: Any) -> None:
    # One look at the lock server when a worker starts, off the start-up path: an
    # unreachable one gets one WARNING line; the worker still starts, and its singleton
    # tasks retry until the server answers (singleton_lock_outage_timeout).
    app = getattr(sender, "app", None)
    if app is None or not any(isinstance(t, SingletonTask) for t in app.tasks.values()):
        return

    def look() -> None:
        try:
            settings = settings_for(app)
            settings.backend().release_owned("singleton-lock-ping", Owner.of_message("ping"))
        except LockError as exc:
            logger.warning("the lock server does not answer (%s); singleton tasks retry until it does", exc)

    threading.Thread(target=look, name="celery-singleton-lock-ping", daemon=True).start()


def singleton_task(*args: Any, **options: Any) -> Any:
    """Decorate a function as a :class:`SingletonTask`, like ``app.task``.

    ``@singleton_task`` (bare, as ``shared_task``), ``@singleton_task(app, **options)`` or
    ``@singleton_task(**options)``. Options are checked here, at decoration time.

    :raises ConfigurationError: for a bad option, naming it.
    """
    if len(args) == 1 and callable(args[0]) and not isinstance(args[0], Celery):
        return singleton_task()(args[0])
    if len(args) > 1:
        raise TypeError("singleton_task takes at most one positional argument, the app")
    app = args[0] if args else options.pop("app", None)
    if app is not None and not isinstance(app, Celery):
        raise ConfigurationError(f"app must be a Celery app, got {app!r}", option="app")
    base = options.pop("base", SingletonTask)
    if not (isinstance(base, type) and issubclass(base, SingletonTask)):
        raise ConfigurationError(f"base must subclass SingletonTask, got {base!r}", option="base")

    def decorate(fun: Any) -> Any:
        signature = inspect.signature(fun)
        if options.get("bind"):
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        _check_task_options(options, signature)
        if app is None:
            return shared_task(base=base, **options)(fun)
        return app.task(base=base, **options)(fun)

    return decorate
