"""From a task call to a lock key.

The call's arguments are bound to the task function's signature and its defaults are
applied, so ``f(1, 2)``, ``f(1, b=2)`` and ``f(a=1)`` (with ``b=2`` the default) give the
same key. What the key covers is the task's ``lock_key`` option:

``None``
    the task name and every bound argument: ``"shop.rebuild_report:<sha256>"``.
``("account_id", ...)``
    the task name and the arguments named: ``"shop.sync_account:<sha256>"``.
``"invoice:{invoice_id}"``
    a resource name, shared by every task that uses the same template (NOT scoped to
    the task name): ``"invoice:42"``.
a callable
    called with the task's arguments (defaults applied); returns the resource name.

Argument data reaches a key only as a sha256 of its canonical JSON, or, in a template or
a callable's result, as itself when it is short and made of safe characters. The key's
length is bounded and no argument can forge a separator. An argument that has no
canonical form raises :class:`~celery_singleton_lock.LockKeyError` naming it: the task
then never runs unlocked.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import hashlib
import inspect
import json
import math
import re
import string
import uuid
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, TypeAlias

from celery_singleton_lock.errors import ConfigurationError, LockKeyError

__all__ = ["KeySpec", "canonical_json", "derive_key", "validate_key_spec"]

KeySpec: TypeAlias = "tuple[str, ...] | str | Callable[..., str] | None"

#: Characters a template value or a callable's name may keep as they are.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.@:/-]{1,200}")
_DIGEST_CHARS = 32  # 128 bits of sha256: collisions are not a practical concern


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGEST_CHARS]


def _normalise(value: Any, where: str) -> Any:
    """Turn ``value`` into plain JSON data, tagging the types JSON cannot tell apart."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            msg = f"argument {where!r} is {value!r}, which has no canonical form for a lock key"
            raise LockKeyError(msg, argument=where.split("[", maxsplit=1)[0].split(".", maxsplit=1)[0])
        return value
    if isinstance(value, enum.Enum):
        return {"$enum": f"{type(value).__qualname__}.{value.name}"}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value.normalize())}
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:  # one instant, one key, whatever the zone
            value = value.astimezone(dt.timezone.utc)
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, Mapping):
        items = {
            canonical_json(_normalise(k, f"{where}[{k!r}]")): _normalise(v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
        return {"$map": [[k, items[k]] for k in sorted(items)]}
    if isinstance(value, Set):
        members = [_normalise(v, f"{where}[]") for v in value]
        return {"$set": sorted(members, key=canonical_json)}
    if isinstance(value, Sequence):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(value)]
    msg = (
        f"argument {where!r} of type {type(value).__name__} has no canonical form for a "
        "lock key; pass JSON-like data, or name the arguments to lock on with lock_key"
    )
    raise LockKeyError(msg, argument=where.split("[", maxsplit=1)[0])


def canonical_json(value: Any) -> str:
    """The one JSON text of already-normalised data: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _fingerprint(arguments: Mapping[str, Any]) -> str:
    normalised = {name: _normalise(value, name) for name, value in arguments.items()}
    return _digest(canonical_json(normalised))


def _bind(
    signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> inspect.BoundArguments:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        msg = f"the task's arguments do not fit its signature {signature}: {exc}"
        raise LockKeyError(msg) from None
    bound.apply_defaults()
    return bound


class _ResourceFormatter(string.Formatter):
    """Formats a ``lock_key`` template, letting only safe values through as text."""

    def format_field(self, value: Any, format_spec: str) -> str:
        text = format(value, format_spec)
        if _SAFE_VALUE.fullmatch(text):
            return text
        return "~" + _digest(canonical_json(_normalise(value, "lock_key")) + format_spec)


_formatter = _ResourceFormatter()


def _resource_name(text: str) -> str:
    if _SAFE_NAME.fullmatch(text):
        return text
    readable = re.sub(r"[^A-Za-z0-9_.@:/-]", "_", text)[:64]
    return f"{readable}~{_digest(text)}"


def derive_key(
    task_name: str,
    signature: inspect.Signature,
    spec: KeySpec,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> str:
    """Return the lock key of one task call.

    :param task_name: the task's registered name.
    :param signature: the task function's call signature (without a bound ``self``).
    :param spec: the task's ``lock_key`` option.
    :raises LockKeyError: when the arguments do not bind or cannot be canonicalised.
    """
    bound = _bind(signature, args, kwargs)
    arguments = bound.arguments
    if spec is None:
        return f"{task_name}:{_fingerprint(arguments)}"
    if isinstance(spec, tuple):
        return f"{task_name}:{_fingerprint({name: arguments[name] for name in spec})}"
    if isinstance(spec, str):
        try:
            return _resource_name(_formatter.vformat(spec, (), arguments))
        except (KeyError, AttributeError, IndexError, ValueError) as exc:
            msg = f"lock_key template {spec!r} cannot be filled from the arguments: {exc!r}"
            raise LockKeyError(msg) from None
    name = spec(*bound.args, **bound.kwargs)
    if not isinstance(name, str) or not name:
        msg = f"lock_key callable {spec!r} returned {name!r}; it must return a non-empty str"
        raise LockKeyError(msg)
    return _resource_name(name)


def validate_key_spec(spec: Any, signature: inspect.Signature | None) -> KeySpec:
    """Check a ``lock_key`` option against the task's signature, at decoration time.

    :raises ConfigurationError: naming ``lock_key`` and the offending part.
    """
    if spec is None or callable(spec):
        return spec  # type: ignore[no-any-return]
    params = set(signature.parameters) if signature is not None else None
    if isinstance(spec, list):
        spec = tuple(spec)
    if isinstance(spec, tuple):
        if not spec or not all(isinstance(name, str) for name in spec):
            msg = f"lock_key must be a non-empty tuple of argument names, got {spec!r}"
            raise ConfigurationError(msg, option="lock_key")
        unknown = [name for name in spec if params is not None and name not in params]
        if unknown:
            takes = sorted(params or ())
            msg = f"lock_key names {unknown!r}, which the task does not take (it takes {takes})"
            raise ConfigurationError(msg, option="lock_key")
        return spec
    if isinstance(spec, str):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(spec) if f is not None]
        except ValueError as exc:
            msg = f"lock_key template {spec!r} is not a valid format string: {exc}"
            raise ConfigurationError(msg, option="lock_key") from None
        for field in fields:
            name = re.split(r"[.\[]", field, maxsplit=1)[0]
            if not name or name.isdigit():
                msg = f"lock_key template {spec!r} must name arguments, like '{{invoice_id}}'"
                raise ConfigurationError(msg, option="lock_key")
            if params is not None and name not in params:
                msg = f"lock_key template {spec!r} uses {name!r}, which the task does not take"
                raise ConfigurationError(msg, option="lock_key")
        if not spec.strip():
            raise ConfigurationError("lock_key must not be empty", option="lock_key")
        return spec
    msg = (
        "lock_key must be None, a tuple of argument names, a format string or a callable, "
        f"got {spec!r}"
    )
    raise ConfigurationError(msg, option="lock_key")
