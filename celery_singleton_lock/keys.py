"""From a task call to a lock key.

The call's arguments are bound to the task function's signature and its defaults are
applied, so ``f(1, 2)``, ``f(1, b=2)`` and ``f(a=1)`` (with ``b=2`` the default) give the
same key. What the key covers is the task's ``lock_key`` option:

``None``
    the task name and every bound argument: ``"task:shop.rebuild_report:<sha256>"``.
``("account_id", ...)``
    the task name and the arguments named: ``"task:shop.sync_account:<sha256>"``.
``"invoice:{invoice_id}"``
    a resource name, shared by every task that uses the same template (NOT scoped to
    the task name): ``"res:invoice:42"``.
a callable
    called with the task's arguments (defaults applied); returns the resource name,
    which lands in the same ``res:`` namespace as templates.

Namespaces no argument can cross:

- Task keys start with ``task:`` and resource keys with ``res:``, so no template value
  or callable result can ever equal a task's key.
- Argument data reaches a task key only as a sha256 of its canonical JSON.
- A template value is copied only when it is short, made of safe characters
  (letters, digits, ``_ . @ -``), and does not contain the first character of the
  template text that follows it (``"{a}-{b}"`` copies ``42`` but hashes ``x-y``); a
  field followed directly by another field is always hashed. Anything else becomes
  ``~`` and 32 hex characters. So within one template the key tells every value
  apart: no value can forge a separator.
- Every hash is salted with what it stands for (a value, a whole template, a
  callable's result), so a crafted value cannot reproduce another kind's hash.

Keys are bounded: a task key is ``task:``, the task name, and 33 characters; a resource
key is at most 204 characters (a filled template or a callable's result longer than 200
characters, or with other characters, becomes 64 readable ones, ``~`` and a digest of
it all). An argument that has no canonical form raises
:class:`~celery_singleton_lock.LockKeyError` naming it: the task then never runs unlocked.
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

__all__ = [
    "KeyDeriver",
    "KeySpec",
    "canonical_json",
    "derive_key",
    "key_deriver",
    "resource_name",
    "validate_key_spec",
]

KeySpec: TypeAlias = "tuple[str, ...] | str | Callable[..., str] | None"

#: The namespace of keys made of a task name and arguments (``lock_key`` None or a tuple).
TASK_NAMESPACE = "task:"
#: The namespace of resource names (``lock_key`` a template or a callable).
RESOURCE_NAMESPACE = "res:"

#: Characters a template value may keep as they are (no ':', '/', '~', braces, spaces).
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
#: Characters a resource name may keep as it is.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.@:/-]{1,200}")
_UNSAFE_NAME_CHAR = re.compile(r"[^A-Za-z0-9_.@:/-]")
_DIGEST_CHARS = 32  # 128 bits of sha256: collisions are not a practical concern
_READABLE_CHARS = 64
_CONVERSIONS = (None, "r", "s", "a")


def _digest(text: str, salt: str = "") -> str:
    # "surrogatepass": a str with lone surrogates still has exactly one digest.
    data = f"{salt}\0{text}" if salt else text
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]


def _normalise(value: Any, where: str) -> Any:
    """Turn ``value`` into plain JSON data, tagging the types JSON cannot tell apart."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            msg = f"argument {where!r} is {value!r}, which has no canonical form for a lock key"
            raise LockKeyError(msg, argument=_argument_of(where))
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
    raise LockKeyError(msg, argument=_argument_of(where))


def _argument_of(where: str) -> str:
    """The argument's name in a path like ``payload[0]`` or ``account.id``."""
    return re.split(r"[.\[]", where, maxsplit=1)[0]


#: One encoder for every key: ``json.dumps`` with these options builds a new one per call.
_encode_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode
#: Types that :func:`_normalise` returns as they are (exactly these: a subclass such as
#: an ``IntEnum`` member goes through it).
_PLAIN_TYPES = frozenset({str, int, bool, type(None)})


def canonical_json(value: Any) -> str:
    """The one JSON text of already-normalised data: sorted keys, no spaces."""
    return _encode_json(value)


def _fingerprint(arguments: Mapping[str, Any]) -> str:
    plain = _PLAIN_TYPES
    normalised = {
        name: value if type(value) in plain else _normalise(value, name)
        for name, value in arguments.items()
    }
    return _digest(_encode_json(normalised))


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


class _Binder:
    """Binds a call's arguments to names, defaults applied, like ``Signature.bind``
    followed by ``apply_defaults``, without its generality: it runs on every task call.

    Only for a signature of plain parameters (no positional-only ones, no ``*args`` or
    ``**kwargs``). A call that does not fit it exactly (too many arguments, an unknown or
    repeated name, a missing one) goes to ``Signature.bind``, which gives the error.
    The mapping it returns may list the names in another order than the signature; keys
    never depend on that order (canonical JSON sorts them, templates look names up).
    """

    __slots__ = ("defaults", "names", "positional", "signature")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        parameters = signature.parameters.values()
        self.positional = tuple(
            p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        self.names = frozenset(signature.parameters)
        self.defaults = tuple(
            (p.name, p.default) for p in parameters if p.default is not inspect.Parameter.empty
        )

    @staticmethod
    def fits(signature: inspect.Signature) -> bool:
        plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return all(p.kind in plain for p in signature.parameters.values())

    def __call__(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
        positional = self.positional
        if len(args) > len(positional):
            return _bind(self.signature, args, kwargs).arguments
        arguments = dict(zip(positional, args, strict=False))  # fewer args: the rest by name
        if kwargs:
            for name in kwargs:
                if name in arguments or name not in self.names:
                    return _bind(self.signature, args, kwargs).arguments
            arguments.update(kwargs)
        if len(arguments) < len(self.names):
            for name, default in self.defaults:
                arguments.setdefault(name, default)
            if len(arguments) < len(self.names):  # a required argument is missing
                return _bind(self.signature, args, kwargs).arguments
        return arguments


class _Field:
    """One replacement field of a template, and the literal character that follows it."""

    __slots__ = ("conversion", "format_spec", "name", "then")

    def __init__(self, name: str, format_spec: str, conversion: str | None) -> None:
        self.name = name
        self.format_spec = format_spec
        self.conversion = conversion
        #: The first literal character after the field; "" at the end of the template;
        #: None when another field follows at once (then nothing could tell them apart).
        self.then: str | None = ""


def _parse_template(template: str) -> list[str | _Field]:
    """The template as literal text and fields, adjacent literals merged.

    :raises ValueError: for a malformed format string.
    """
    pieces: list[str | _Field] = []
    for literal, name, format_spec, conversion in string.Formatter().parse(template):
        if literal:
            if pieces and isinstance(pieces[-1], str):
                pieces[-1] += literal
            else:
                pieces.append(literal)
        if name is not None:
            pieces.append(_Field(name, format_spec or "", conversion))
    for piece, following in zip(pieces, [*pieces[1:], ""], strict=True):
        if isinstance(piece, _Field):
            piece.then = following[0] if isinstance(following, str) and following else (
                None if isinstance(following, _Field) else ""
            )
    return pieces


_formatter = string.Formatter()


def _render_field(field: _Field, arguments: Mapping[str, Any]) -> str:
    value = _formatter.convert_field(_formatter.get_field(field.name, (), arguments)[0], field.conversion)
    text = format(value, field.format_spec)
    if _SAFE_VALUE.fullmatch(text) and field.then is not None and (
        not field.then or field.then not in text
    ):
        return text
    normalised = canonical_json(_normalise(value, field.name))
    return "~" + _digest(f"{field.conversion or ''}:{field.format_spec}:{normalised}", "value")


def _render_template(pieces: Sequence[str | _Field], arguments: Mapping[str, Any]) -> str:
    """A template (parsed by :func:`_parse_template`) filled from ``arguments``."""
    text = "".join(
        piece if isinstance(piece, str) else _render_field(piece, arguments) for piece in pieces
    )
    literals_safe = all(
        isinstance(piece, _Field) or not _UNSAFE_NAME_CHAR.search(piece) for piece in pieces
    )
    if literals_safe and 0 < len(text) <= 200:
        return text
    readable = _UNSAFE_NAME_CHAR.sub("_", text)[:_READABLE_CHARS]
    return f"{readable}~{_digest(text, 'template')}"


def resource_name(text: str, salt: str = "") -> str:
    """``text`` when it is short and safe, else a readable part and a digest of it all.

    :param salt: what the text is (a callable's result: "name"); the beat scheduler's
        names, in a namespace of their own, keep the unsalted digest they always had.
    """
    if _SAFE_NAME.fullmatch(text):
        return text
    readable = _UNSAFE_NAME_CHAR.sub("_", text)[:_READABLE_CHARS]
    return f"{readable}~{_digest(text, salt)}"


def _describe(spec: Callable[..., Any]) -> str:
    return getattr(spec, "__qualname__", None) or repr(spec)


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
    :raises LockKeyError: when the arguments do not bind or cannot be canonicalised, or
        the ``lock_key`` callable fails.
    """
    return key_deriver(signature, spec)(task_name, args, kwargs)


#: ``deriver(task_name, args, kwargs) -> key``, see :func:`key_deriver`.
KeyDeriver: TypeAlias = "Callable[[str, Sequence[Any], Mapping[str, Any]], str]"


def key_deriver(signature: inspect.Signature, spec: KeySpec) -> KeyDeriver:
    """:func:`derive_key` for one signature and ``lock_key``, prepared once.

    A task makes it when its options are resolved; each call then pays only for its own
    arguments.
    """
    if callable(spec):  # gets the bound positional and keyword arguments as they are
        return lambda task_name, args, kwargs: _callable_key(task_name, signature, spec, args, kwargs)
    if _Binder.fits(signature):
        arguments_of: Callable[[Sequence[Any], Mapping[str, Any]], Mapping[str, Any]] = (
            _Binder(signature)
        )
    else:
        def arguments_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
            return _bind(signature, args, kwargs).arguments

    if spec is None:
        def task_key(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
            return f"{TASK_NAMESPACE}{task_name}:{_fingerprint(arguments_of(args, kwargs))}"

        return task_key
    if isinstance(spec, tuple):
        names = spec

        def named_key(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
            arguments = arguments_of(args, kwargs)
            named = {name: arguments[name] for name in names}
            return f"{TASK_NAMESPACE}{task_name}:{_fingerprint(named)}"

        return named_key
    template = spec
    try:
        parsed: list[str | _Field] | None = _parse_template(template)
    except ValueError:  # not validated (validate_key_spec refuses it): each call reports it
        parsed = None

    def template_key(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        arguments = arguments_of(args, kwargs)
        try:
            pieces = _parse_template(template) if parsed is None else parsed
            return RESOURCE_NAMESPACE + _render_template(pieces, arguments)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as exc:
            if isinstance(exc, LockKeyError):
                raise
            msg = (
                f"lock_key template {template!r} of task {task_name!r} cannot be filled "
                f"from the arguments: {exc!r}"
            )
            raise LockKeyError(msg) from None

    return template_key


def _callable_key(
    task_name: str,
    signature: inspect.Signature,
    spec: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> str:
    bound = _bind(signature, args, kwargs)
    try:
        name = spec(*bound.args, **bound.kwargs)
    except Exception as exc:
        msg = (
            f"lock_key callable {_describe(spec)} of task {task_name!r} raised "
            f"{type(exc).__name__}: {exc}"
        )
        raise LockKeyError(msg) from exc
    if not isinstance(name, str) or not name:
        msg = (
            f"lock_key callable {_describe(spec)} of task {task_name!r} returned {name!r}; "
            "it must return a non-empty str"
        )
        raise LockKeyError(msg)
    return RESOURCE_NAMESPACE + resource_name(name, "name")


def _check_callable(spec: Callable[..., Any], signature: inspect.Signature | None) -> None:
    """A ``lock_key`` callable must take the arguments :func:`derive_key` passes it.

    A task with ``*args`` or ``**kwargs`` passes a number of arguments known only at run
    time; :func:`derive_key` then reports a misfit as a :class:`LockKeyError`.
    """
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if signature is None or any(p.kind in variadic for p in signature.parameters.values()):
        return
    try:
        takes = inspect.signature(spec)
    except (TypeError, ValueError):  # some builtins have no signature: checked at run time
        return
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            args.append(None)
        elif parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[parameter.name] = None
    try:
        takes.bind(*args, **kwargs)
    except TypeError as exc:
        msg = (
            f"lock_key callable {_describe(spec)}{takes} cannot take the task's arguments "
            f"{signature} ({exc}); it is called with every argument of the task, defaults "
            "applied: give it the task's parameters (or *args, **kwargs)"
        )
        raise ConfigurationError(msg, option="lock_key") from None


def _check_template(spec: str, params: set[str] | None) -> None:
    try:
        pieces = _parse_template(spec)
    except ValueError as exc:
        msg = f"lock_key template {spec!r} is not a valid format string: {exc}"
        raise ConfigurationError(msg, option="lock_key") from None
    for field in pieces:
        if not isinstance(field, _Field):
            continue
        name = _argument_of(field.name)
        if not name or name.isdigit():
            msg = f"lock_key template {spec!r} must name arguments, like '{{invoice_id}}'"
            raise ConfigurationError(msg, option="lock_key")
        if params is not None and name not in params:
            msg = f"lock_key template {spec!r} uses {name!r}, which the task does not take"
            raise ConfigurationError(msg, option="lock_key")
        if "{" in field.format_spec:
            msg = f"lock_key template {spec!r}: a format spec must not hold another field"
            raise ConfigurationError(msg, option="lock_key")
        if field.conversion not in _CONVERSIONS:
            msg = f"lock_key template {spec!r}: unknown conversion '!{field.conversion}'"
            raise ConfigurationError(msg, option="lock_key")
    if not spec.strip():
        raise ConfigurationError("lock_key must not be empty", option="lock_key")


def validate_key_spec(spec: Any, signature: inspect.Signature | None) -> KeySpec:
    """Check a ``lock_key`` option against the task's signature, at decoration time.

    :raises ConfigurationError: naming ``lock_key`` and the offending part.
    """
    if spec is None:
        return None
    if callable(spec):
        _check_callable(spec, signature)
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
        _check_template(spec, params)
        return spec
    msg = (
        "lock_key must be None, a tuple of argument names, a format string or a callable, "
        f"got {spec!r}"
    )
    raise ConfigurationError(msg, option="lock_key")
