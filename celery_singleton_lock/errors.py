"""The errors this library raises: one root, so ``except LockError`` catches them all.

::

    LockError
    ├── LockContended          (also TimeoutError)   the lock is held by somebody else
    ├── LockLost                                     renewal proved the lease gone
    ├── LockBackendUnavailable (also ConnectionError) the server did not answer in time
    ├── LockKeyError           (also ValueError)     the task's arguments give no key
    └── ConfigurationError     (also ValueError)     a bad option or setting

Every error pickles (Celery stores a task's exception in the result backend and sends
it between processes), and none carries a password: URLs are masked before they get here.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ConfigurationError",
    "LockBackendUnavailable",
    "LockContended",
    "LockError",
    "LockKeyError",
    "LockLost",
    "mask_url",
]


#: ``scheme://user:`` then the password, up to the last ``@`` before the path.
_USERINFO_PASSWORD = re.compile(r"^([^:/?#]+://[^:/?#@]*:)[^/?#]*@")


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` (user names are kept).

    The host part is kept as written, so URLs naming several hosts
    (``redlock://:pw@h1:6379,h2:6379,h3:6379/0``) are masked too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed host ("[nonsense]"): mask by hand, the rest as written
        return _USERINFO_PASSWORD.sub(r"\1***@", url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


class LockError(Exception):
    """Root of every error raised by celery-singleton-lock.

    :param message: what went wrong, for people.
    :param key: the lock key concerned, when there is one.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields are not restored by BaseException's default pickling.
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[LockError], message: str, state: dict[str, Any]) -> LockError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class LockContended(LockError, TimeoutError):
    """The lock is held by somebody else (and the policy said not to wait, or the wait timed out)."""


class LockLost(LockError):
    """Renewal proved the lease gone (expired, deleted or taken) while its holder still ran."""


class LockBackendUnavailable(LockError, ConnectionError):
    """The lock server did not answer within the connect timeout.

    :param url: the server's URL, password masked.
    """

    def __init__(self, message: str, *, url: str = "", key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.url = mask_url(url)


class LockKeyError(LockError, ValueError):
    """The task's arguments cannot be turned into a lock key; the task does not run.

    :param argument: the name of the offending argument.
    """

    def __init__(self, message: str, *, argument: str | None = None, key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.argument = argument


class ConfigurationError(LockError, ValueError):
    """A task option or app setting has a bad value.

    :param option: the option's or setting's name, as the user wrote it.
    """

    def __init__(self, message: str, *, option: str = "") -> None:
        super().__init__(message)
        self.option = option
