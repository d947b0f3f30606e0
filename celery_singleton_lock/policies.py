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
                           it retries (``Wait()`` alone is ``Wait() | Retry()``).
``Raise()`` / ``"raise"``  state FAILURE with :class:`LockContended` (a ``TimeoutError``).
=========================  =============================================================

``first | then`` (``"first|then"`` as a string) applies ``then`` when ``first`` runs out:

- ``Retry`` runs out when it may not retry any more: its ``max_retries`` contention
  retries are made (100 by default, whatever the task's own ``max_retries``; None never
  runs out), or the call is direct (``task()``), which Celery cannot retry. Each
  ``Retry`` of a chain counts its own: ``Retry(max_retries=2) | Retry(max_retries=3)``
  retries twice, then three more times.
- ``Wait`` runs out when its ``timeout`` passes without the lock.
- ``Skip`` and ``Raise`` never run out: ``Skip() | Retry()`` could never retry, so it is a
  :class:`ConfigurationError` when written, as is anything after a plain function.

A retried run starts its chain from the beginning: ``Wait(5) | Retry(max_retries=3) |
Skip()`` waits up to 5 s in each of four runs and, after the third retry, skips. The last
policy of a chain, when it runs out, does what it does alone. Chains compare equal when
built alike and print as they are written: ``Retry(max_retries=3) | Skip()``.
"""

from __future__ import annotations

import functools
import operator
import random
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

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
    """A policy's decision not to run the task: the run ends with state SUCCESS.

    Return it from a policy of your own; the task then logs the skip at INFO, sends the
    ``task_skipped`` signal and returns ``result`` as its result.

    :param result: the skipped run's result, what the caller's ``AsyncResult.get()`` returns.
    """

    result: Any = None


@dataclass
class Contention:
    """Everything a policy knows about one refused acquisition, and what it can do next.

    A policy decides with one of: ``contention.wait(timeout)`` (the lock, or None when the
    timeout passed), ``Skipped(result)``, ``contention.retry(countdown, max_retries)`` (raises)
    or ``raise contention.contended()`` (fails the run with :class:`LockContended`).

    :ivar key: the lock key (without the backend prefix).
    :ivar ttl: the lease length the task asked for.
    :ivar backend: where the lock lives.
    :ivar owner: who we would be as holder.
    :ivar refused: what the refused attempt learned about the holder (``holder_task_id``).
    :ivar task: the Celery task, or None for a lock taken outside a task.
    :ivar default_wait_timeout: ``singleton_lock_wait_timeout``, for ``Wait()``.
    :ivar limit: the key's slots (``lock_limit``): a wait takes any one of them.
    :ivar retries_spent: contention retries made by the ``Retry`` policies before this
        one in a chain (``Retry(max_retries=2) | Retry(max_retries=3)``: the second one sees
        ``retries`` start again at 0); :attr:`retries` leaves them out.
    """

    key: str
    ttl: float
    backend: LockBackend
    owner: Owner
    refused: Refused
    task: Task | None = None
    default_wait_timeout: float | None = 60.0
    retries_spent: int = 0
    limit: int = 1

    @property
    def can_retry(self) -> bool:
        """False for direct calls (``task()``), which Celery cannot retry."""
        return self.task is not None and not self.task.request.called_directly

    def wait(self, timeout: float | None) -> HeldLock | None:
        """Block until the lock is ours or ``timeout`` passes (then None)."""
        return self.backend.wait(
            self.key, self.ttl, timeout=timeout, owner=self.owner, refused=self.refused,
            sender=self.task, limit=self.limit,
        )

    def contended(self, detail: str = "") -> LockContended:
        """The error that fails this run: "lock ... is held by another task" + ``detail``."""
        return LockContended(f"lock {self.key!r} is held by another task{detail}", key=self.key)

    @property
    def retries(self) -> int:
        """How often this task was already retried because its lock was taken.

        Counted apart from ``request.retries``: the task's own ``self.retry()`` budget is
        not spent by contention (nor by lock-server outages). Retries of earlier links of
        a chain (:attr:`retries_spent`) are left out.
        """
        if self.task is None:
            return 0
        request = self.task.request
        if request.is_eager:  # an eager retry runs again at once, through Celery's counter
            made = int(request.retries or 0)
        else:
            made = int(lock_retries(request).get("contended", 0))
        return max(0, made - self.retries_spent)

    def retry(self, countdown: float, max_retries: int | None) -> NoReturn:
        """Ask Celery to run the task again in ``countdown`` seconds (raises ``Retry``).

        :param max_retries: contention retries allowed (None: no limit), counted apart
            from the task's own ``max_retries``, which plays no part here.
        :raises LockContended: when no retry is left, or for a direct call.
        """
        if not self.can_retry or self.task is None:
            raise self.contended(" (a direct call cannot be retried)")
        limit = max_retries
        done = self.retries
        if limit is not None and done >= limit:
            raise self.contended(f"; gave up after {done} retries")
        attempt = f"retry {done + 1}" + (f" of {limit}" if limit is not None else "")
        raise self.task.retry_for_lock(
            "contended", countdown, self.contended(f"; {attempt} in {countdown:.2f}s")
        )


Policy: TypeAlias = "Callable[[Contention], HeldLock | Skipped]"

#: ``Retry()``'s contention retries when ``max_retries`` is not given: a budget of its own,
#: not the task's ``max_retries`` (Celery's 3 would drop a call turned away three times).
DEFAULT_CONTENTION_RETRIES = 100

#: The message header counting a run's lock retries by reason ("contended",
#: "unavailable"), apart from Celery's own ``retries``.
RETRIES_HEADER = "singleton_lock_retries"


def lock_retries(request: Any) -> dict[str, Any]:
    """The lock retry counts a task request carries (empty for a first delivery)."""
    counts = getattr(request, RETRIES_HEADER, None)
    if counts is None:
        counts = (getattr(request, "headers", None) or {}).get(RETRIES_HEADER)
    return dict(counts) if isinstance(counts, dict) else {}


#: The OS's random source: a seeded generator would be copied into every prefork child
#: at fork, and every child would draw the same "random" delays.
_system_random = random.SystemRandom()


def backoff_delay(
    attempt: int,
    *,
    first: float,
    factor: float,
    cap: float,
    spread: tuple[float, float] = (1.0, 1.0),
    rng: random.Random = _system_random,
) -> float:
    """Seconds to wait before retry number ``attempt + 1``: exponential, jittered, capped.

    ``first * factor ** attempt``, at most ``cap``, times a factor drawn uniformly from
    ``spread`` (``(0.9, 1.1)``: ±10 %), so duplicates that collided do not come back in
    lock-step; never below 0 nor above ``cap``. Used by :class:`Retry` and by the retries
    of a task whose lock server is unreachable.
    """
    try:
        base = min(first * factor**attempt, cap)
    except OverflowError:  # a factor > 1 after thousands of retries
        base = cap
    return min(max(0.0, base * rng.uniform(*spread)), cap)


_P = TypeVar("_P", bound="_Chainable")


class _Chainable:
    """The base of the built-in policies: ``first | then``, printing and the unreachable check.

    A policy that can run out declares a ``then`` dataclass field (None: it does what it
    does alone) and calls it when it runs out; ``|`` fills that field, or the ``then`` of
    the policy already there, so ``a | b | c`` is ``a`` with ``then=b`` with ``then=c``.
    A policy without ``then`` never runs out, and nothing may follow it.
    """

    def __call__(self, contention: Contention) -> HeldLock | Skipped:
        raise NotImplementedError

    def __or__(self: _P, then: Any) -> _P:
        """``self | then``: apply ``then`` when ``self`` runs out (see the module docstring).

        :raises ConfigurationError: when ``self`` never runs out, so ``then`` never runs.
        """
        fallback = parse_policy(then)
        if not _runs_out(self):
            raise _unreachable(self, fallback)
        current = getattr(self, "then", None)
        if current is not None:
            if not isinstance(current, _Chainable):
                raise _unreachable(current, fallback)
            fallback = current | fallback
        return replace(self, then=fallback)  # type: ignore[type-var]

    def __repr__(self) -> str:
        # Only what differs from the defaults, and a chain as it is written:
        # "Retry(max_retries=3) | Skip()" rather than nested ``then=`` arguments.
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)  # type: ignore[arg-type]
            if f.repr and f.name != "then" and not _is_default(f, getattr(self, f.name))
        )
        then = getattr(self, "then", None)
        head = f"{type(self).__name__}({shown})"
        return head if then is None else f"{head} | {then!r}"


def _runs_out(policy: _Chainable) -> bool:
    return "then" in getattr(policy, "__dataclass_fields__", {})


def _unreachable(policy: object, then: object) -> ConfigurationError:
    if isinstance(policy, _Chainable):
        why = "never runs out"
    else:
        why = "is a plain callable, which cannot hand over when it runs out"
    msg = f"nothing can come after {policy!r} in a policy chain: it {why}, so {then!r} would never run"
    return ConfigurationError(msg, option="on_contention")


def _is_default(spec: Field[Any], value: Any) -> bool:
    if spec.default is not MISSING:
        default = spec.default
    elif spec.default_factory is not MISSING:
        default = spec.default_factory()
    else:
        return False
    return type(value) is type(default) and bool(value == default)


def _check_then(then: Any, owner: str) -> None:
    if then is not None and not callable(then):
        msg = f"{owner}(then=...) must be a policy, got {then!r}"
        raise ConfigurationError(msg, option="on_contention")


@dataclass(frozen=True, repr=False)
class Skip(_Chainable):
    """Do not run; finish with ``result`` (state SUCCESS). The default policy.

    Never runs out: nothing can come after it in a chain.
    """

    result: Any = None

    def __call__(self, contention: Contention) -> Skipped:
        return Skipped(self.result)


@dataclass(frozen=True, repr=False)
class Retry(_Chainable):
    """Retry the task later; FAILURE with :class:`LockContended` when retries run out.

    :param countdown: seconds before the first retry.
    :param max_retries: contention retries allowed, :data:`DEFAULT_CONTENTION_RETRIES`
        (100: about 17 minutes at the default countdown) unless given; None: no limit.
        They are counted apart from ``request.retries``, and the task's own
        ``max_retries`` does not size them: a lock never uses up the retries the task's
        ``self.retry()`` may make, nor do those use up these.
    :param backoff: the countdown is multiplied by this for every retry already made.
    :param backoff_max: no countdown longer than this.
    :param jitter: spread each countdown by up to this fraction, so duplicates that
        collided do not come back in lock-step.
    :param then: the policy applied when no retry is left (``Retry() | then``); None:
        fail with :class:`LockContended`.
    """

    countdown: float = 10.0
    max_retries: int | None = DEFAULT_CONTENTION_RETRIES
    backoff: float = 1.0
    backoff_max: float = 600.0
    jitter: float = 0.1
    then: Policy | None = None
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
        _check_then(self.then, "Retry")

    def countdown_for(self, retries: int) -> float:
        """The countdown of the retry after ``retries`` earlier ones."""
        return backoff_delay(
            retries,
            first=self.countdown,
            factor=self.backoff,
            cap=self.backoff_max,
            spread=(1 - self.jitter, 1 + self.jitter),
            rng=self._random,
        )

    def __call__(self, contention: Contention) -> HeldLock | Skipped:
        limit = self.max_retries
        done = contention.retries
        ran_out = not contention.can_retry or (limit is not None and done >= limit)
        if ran_out and self.then is not None:
            spent = done if limit is None else min(done, limit)
            # The next link counts its retries from 0 (its own max_retries, its own backoff).
            return self.then(replace(contention, retries_spent=contention.retries_spent + spent))
        # Alone and run out, this raises LockContended ("gave up", or "a direct call").
        contention.retry(self.countdown_for(done), self.max_retries)


@dataclass(frozen=True, repr=False)
class Wait(_Chainable):
    """Wait for the holder's release (server-notified), then run.

    :param timeout: seconds to wait; None takes ``singleton_lock_wait_timeout``.
    :param then: the policy applied when the wait times out (``Wait() | then``); None:
        ``Retry()``.
    """

    timeout: float | None = None
    then: Policy | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None:
            _check_number("timeout", self.timeout, minimum=0)
        _check_then(self.then, "Wait")

    def __call__(self, contention: Contention) -> HeldLock | Skipped:
        timeout = self.timeout if self.timeout is not None else contention.default_wait_timeout
        held = contention.wait(timeout)
        if held is not None:
            return held
        return (self.then if self.then is not None else Retry())(contention)


@dataclass(frozen=True, repr=False)
class Raise(_Chainable):
    """Fail at once with :class:`LockContended` (state FAILURE).

    Never runs out: nothing can come after it in a chain.
    """

    def __call__(self, contention: Contention) -> NoReturn:
        raise contention.contended()


_BY_NAME: dict[str, Callable[[], Policy]] = {
    "skip": Skip,
    "retry": Retry,
    "wait": Wait,
    "raise": Raise,
}


def parse_policy(value: Any, option: str = "on_contention") -> Policy:
    """A policy from its name, a chain of names, a policy class or a callable.

    - ``"skip"``, ``"retry"``, ``"wait"``, ``"raise"``: the policy with its defaults;
      ``"wait|retry|skip"``: their chain, ``Wait() | Retry() | Skip()``.
    - a class (``MyPolicy``): ``MyPolicy()``, which must be callable.
    - any other callable: used as it is.

    :raises ConfigurationError: naming ``option``.
    """
    if isinstance(value, str):
        return _parse_names(value, option)
    if isinstance(value, type):
        return _instantiate(value, option)
    if callable(value):
        return value  # type: ignore[no-any-return]
    raise ConfigurationError(_expected(option, value), option=option)


def _parse_names(value: str, option: str) -> Policy:
    policies: list[Policy] = []
    for name in value.split("|"):
        factory = _BY_NAME.get(name.strip().lower())
        if factory is None:
            raise ConfigurationError(_expected(option, value), option=option)
        policies.append(factory())
    try:
        return functools.reduce(operator.or_, policies)
    except ConfigurationError as exc:  # "skip|retry": say which setting holds it
        raise ConfigurationError(f"{option}={value!r}: {exc}", option=option) from None


def _instantiate(cls: type, option: str) -> Policy:
    # A policy class instead of an instance (Skip for Skip()): made with no arguments.
    try:
        policy = cls()
    except TypeError as exc:
        msg = (
            f"{option}={cls.__name__}: a policy class is made with no arguments, and "
            f"{cls.__name__}() failed ({exc}); pass an instance instead"
        )
        raise ConfigurationError(msg, option=option) from exc
    if not callable(policy):
        msg = f"{option}={cls.__name__}: {cls.__name__}() is {policy!r}, not a callable policy"
        raise ConfigurationError(msg, option=option)
    return policy  # type: ignore[no-any-return]


def _expected(option: str, value: Any) -> str:
    return (
        f"{option} must be one of {sorted(_BY_NAME)}, several of them joined by '|' "
        f"(\"retry|skip\"), a policy object or class, got {value!r}"
    )


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
