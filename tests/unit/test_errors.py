"""Errors: one root, the standard bases users catch, pickling, no passwords."""

from __future__ import annotations

import pickle

import pytest
from celery import Celery

from celery_singleton_lock.errors import (
    ConfigurationError,
    LockBackendUnavailable,
    LockContended,
    LockError,
    LockKeyError,
    LockLost,
    mask_url,
)

ERRORS = [
    LockError("something went wrong", key="report:1"),
    LockContended("lock 'report:1' is held by another task", key="report:1"),
    LockLost("lock 'report:1' was lost", key="report:1"),
    LockBackendUnavailable("Redis did not answer", url="redis://user:s3cret@host:6379/0", key="report:1"),
    LockKeyError("argument 'payload' has no canonical form", argument="payload", key="t:1"),
    ConfigurationError("lock_ttl must be positive", option="lock_ttl"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_pickles_with_its_message_and_attributes(error: LockError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.message == error.message
    assert copy.key == error.key
    for attribute in ("url", "option", "argument"):
        assert getattr(copy, attribute, None) == getattr(error, attribute, None)


def test_pickled_attributes_are_the_ones_given() -> None:
    unavailable = pickle.loads(pickle.dumps(ERRORS[3]))
    assert unavailable.url == "redis://user:***@host:6379/0"
    assert unavailable.key == "report:1"
    assert pickle.loads(pickle.dumps(ERRORS[4])).argument == "payload"
    assert pickle.loads(pickle.dumps(ERRORS[5])).option == "lock_ttl"


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_keeps_its_type_through_the_result_backend(error: LockError) -> None:
    # What AsyncResult.get() raises: Celery stores the exception (JSON by default).
    backend = Celery("errors", backend="cache+memory://", set_as_current=False).backend
    copy = backend.exception_to_python(backend.prepare_exception(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)


def test_every_error_is_a_lock_error() -> None:
    assert all(isinstance(error, LockError) for error in ERRORS)


def test_standard_bases() -> None:
    assert issubclass(LockContended, TimeoutError)
    assert issubclass(LockBackendUnavailable, ConnectionError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(LockKeyError, ValueError)
    assert not issubclass(LockLost, ValueError)


def test_lock_contended_is_caught_as_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        raise LockContended("held", key="k")


def test_backend_unavailable_masks_the_password() -> None:
    error = LockBackendUnavailable("down", url="redis://user:s3cret@host:6379/0")
    assert error.url == "redis://user:***@host:6379/0"
    assert b"s3cret" not in pickle.dumps(error)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cret@host/1", "redis://:***@host/1"),
        ("rediss://user:s3cret@host:6380/0?ssl_cert_reqs=none", "rediss://user:***@host:6380/0?ssl_cert_reqs=none"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("memory://", "memory://"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_url_keeps_an_ipv6_host_a_url() -> None:
    assert mask_url("redis://:s3cret@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
