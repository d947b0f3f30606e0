"""What a task does when its lock is taken: the contention policies.

A policy is any callable ``policy(contention) -> HeldLock | Skipped``; it may also raise.
What each built-in one leaves in the result backend:

=========================  =============================================================
``Skip()`` / ``"skip"``    state SUCCESS, result ``Skip.result`` (None). The caller of
                           ``AsyncResult.get()`` returns at once. Logged at INFO and sent
                           as the ``task_skipped`` signal. Chained tasks continue.
``Retry()`` / ``"retry"``  state RETRY, then runs again later (``countdown`` seconds,
                           growing by ``backoff``, spread by ``jitter``). When the retries
                           run out: state FAILURE with :class:`LockContended`. These
                           retries are counted apart from the task's own ``retries``.
``Wait()`` / ``"wait"``    blocks the worker process until the holder releases (woken by
                           the server) for up to ``timeout`` seconds, then runs; on timeout
                           it hands over to ``then`` (default: ``Retry()``).
``Raise()`` / ``"raise"``  state FAILURE with :class:`LockContended` (a ``TimeoutError``).
=========================  =============================================================

``Wait(timeout=5) | Retry(countdown=30)`` reads "wait 5 s, then retry in 30 s".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from celery_singleton_lock.errors import ConfigurationError, LockContended

if TYPE_CHECKING:
    from celery import Task

    from celery_singleton_lock.backends.base import LockBackend, Refused
    from celery_singleton_lock.backends.owner import Owner
    from celery_singleton_lock.lease import HeldLock

__all__ = [
    "Contention",
    "Policy",
    "Raise",
    "Retry",
    "Skip",
    "Skipped",
    "Wait",
    "parse_policy",
]


@dataclass(frozen=True)
class Skipped:
    """A policy's decision not to run the task; ``result`` becomes its result."""

    result: Any = None


@dataclass
class Contention:
    """Everything a policy knows about one refused acquisition.

    :ivar key: the lock key (without the backend prefix).
    :ivar ttl: the lease length the task asked for.
    :ivar backend: where the lock lives.
    :ivar owner: who we would be as holder.
    :ivar refused: what the refused attempt learned about the holder.
    :ivar task: the Celery task, or None for a lock taken outside a task.
    :ivar default_wait_timeout: ``singleton_lock_wait_timeout``, for ``Wait()``.
    """

    key: str
    ttl: float
    backend: LockBackend
    owner: Owner
    refused: Refused
    task: Task | None = None
    default_wait_timeout: float | None = 60.0

    @property
    def can_retry(self) -> bool:
        """False for direct calls (``task()``), which Celery cannot retry."""
        return self.task is not None and not self.task.request.called_directly

    def wait(self, timeout: float | None) -> HeldLock | None:
        """Block until the lock is ours or ``timeout`` passes (then None)."""
        return self.backend.wait(
            self.key, self.ttl, timeout=timeout, owner=self.owner, refused=self.refused,
            sender=self.task,
        )

    def contended(self, detail: str = "") -> LockContended:
        return LockContended(f"lock {self.key!r} is held by another task{detail}", key=self.key)

    @property
    def retries(self) -> int:
        """How often this task was already retried because its lock was taken.

        Counted apart from ``request.retries``: the task's own ``self.retry()`` budget is
        not spent by contention (nor by lock-server outages).
        """
        if self.task is None:
            return 0
        request = self.task.request
        if request.is_eager:  # an eager retry runs again at once, through Celery's counter
            return int(request.retries or 0)
        return int(lock_retries(request).get("contended", 0))

    def retry(self, countdown: float, max_retries: int | None) -> NoReturn:
        """Ask Celery to run the task again in ``countdown`` seconds (raises ``Retry``).

        :param max_retries: contention retries allowed; None: the task's ``max_retries``.
        """
        if not self.can_retry or self.task is None:
            raise self.contended(" (a direct call cannot be retried)")
        limit = self.task.max_retries if max_retries is None else max_retries
        done = self.retries
        if limit is not None and done >= limit:
            raise self.contended(f"; gave up after {done} retries")
        attempt = f"retry {done + 1}" + (f" of {limit}" if limit is not None else "")
        raise self.task.retry_for_lock(
            "contended", countdown, self.contended(f"; {attempt} in {countdown:.2f}s")
        )


Policy: TypeAlias = "Callable[[Contention], HeldLock | Skipped]"

#: The message header counting a run's lock retries by reason ("contended",
#: "unavailable"), apart from Celery's own ``retries``.
RETRIES_HEADER = "singleton_lock_retries"


def lock_retries(request: Any) -> dict[str, Any]:
    """The lock retry counts a task request carries (empty for a first delivery)."""
    counts = getattr(request, RETRIES_HEADER, None)
    if counts is None:
        counts = (getattr(request, "headers", None) or {}).get(RETRIES_HEADER)
    return dict(counts) if isinstance(counts, dict) else {}


@dataclass(frozen=True)
class Skip:
    """Do not run; finish with ``result`` (state SUCCESS). The default policy."""

    result: Any = None

    def __call__(self, contention: Contention) -> Skipped:
        return Skipped(self.result)


@dataclass(frozen=True)
class Retry:
    """Retry the task later; FAILURE with :class:`LockContended` when retries run out.

    :param countdown: seconds before the first retry.
    :param max_retries: contention retries allowed (None: as many as the task's
        ``max_retries``). They are counted apart from ``request.retries``, so they never
        use up the retries the task's own ``self.retry()`` may make.
    :param backoff: the countdown is multiplied by this for every retry already made.
    :param backoff_max: no countdown longer than this.
    :param jitter: spread each countdown by up to this fraction, so duplicates that
        collided do not come back in lock-step.
    """

    countdown: float = 10.0
    max_retries: int | None = None
    backoff: float = 1.0
    backoff_max: float = 600.0
    jitter: float = 0.1
    #: The OS's random source by default: a seeded generator would be copied into every
    #: prefork child at fork, and every child would draw the same "random" countdowns.
    _random: random.Random = field(default_factory=random.SystemRandom, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_number("countdown", self.countdown, minimum=0)
        _check_number("backoff", self.backoff, minimum=1)
        _check_number("backoff_max", self.backoff_max, minimum=0)
        _check_number("jitter", self.jitter, minimum=0, maximum=1)
        if self.max_retries is not None and (
            not isinstance(self.max_retries, int) or self.max_retries < 0
        ):
            msg = f"Retry(max_retries=...) must be None or an int >= 0, got {self.max_retries!r}"
            raise ConfigurationError(msg, option="on_contention")

    def countdown_for(self, retries: int) -> float:
        base = min(self.countdown * self.backoff**retries, self.backoff_max)
        spread = base * self.jitter
        return min(max(0.0, base + self._random.uniform(-spread, spread)), self.backoff_max)

    def __call__(self, contention: Contention) -> NoReturn:
        contention.retry(self.countdown_for(contention.retries), self.max_retries)


@dataclass(frozen=True)
class Wait:
    """Wait for the holder's release (server-notified), then run.

    :param timeout: seconds to wait; None takes ``singleton_lock_wait_timeout``.
    :param then: the policy applied when the wait times out.
    """

    timeout: float | None = None
    then: Policy = field(default_factory=Retry)

    def __post_init__(self) -> None:
        if self.timeout is not None:
            _check_number("timeout", self.timeout, minimum=0)
        if not callable(self.then):
            msg = f"Wait(then=...) must be a policy, got {self.then!r}"
            raise ConfigurationError(msg, option="on_contention")

    def __call__(self, contention: Contention) -> HeldLock | Skipped:
        timeout = self.timeout if self.timeout is not None else contention.default_wait_timeout
        held = contention.wait(timeout)
        if held is not None:
            return held
        return self.then(contention)

    def __or__(self, fallback: Policy) -> Wait:
        """``Wait(5) | Retry(30)``: wait, and on timeout apply ``fallback``."""
        return Wait(self.timeout, parse_policy(fallback))


@dataclass(frozen=True)
class Raise:
    """Fail at once with :class:`LockContended` (state FAILURE)."""

    def __call__(self, contention: Contention) -> NoReturn:
        raise contention.contended()


_BY_NAME: dict[str, Callable[[], Policy]] = {
    "skip": Skip,
    "retry": Retry,
    "wait": Wait,
    "raise": Raise,
}


def parse_policy(value: Any, option: str = "on_contention") -> Policy:
    """A policy from its name ("skip", "retry", "wait", "raise") or a callable.

    :raises ConfigurationError: naming ``option``.
    """
    if isinstance(value, str):
        factory = _BY_NAME.get(value.strip().lower())
        if factory is None:
            msg = f"{option} must be one of {sorted(_BY_NAME)} or a policy object, got {value!r}"
            raise ConfigurationError(msg, option=option)
        return factory()
    if isinstance(value, type) and value in (Skip, Retry, Wait, Raise):
        return value()  # Skip instead of Skip(): forgive it
    if callable(value):
        return value  # type: ignore[no-any-return]
    msg = f"{option} must be one of {sorted(_BY_NAME)} or a policy object, got {value!r}"
    raise ConfigurationError(msg, option=option)


def _check_number(
    name: str, value: Any, *, minimum: float, maximum: float | None = None
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        msg = f"{name} must be a number {bound}, got {value!r}"
        raise ConfigurationError(msg, option="on_contention")
