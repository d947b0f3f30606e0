"""The seam between the base class and a backend: registration, the wait hooks, URLs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from celery_singleton_lock import ConfigurationError, connect
from celery_singleton_lock.backends import (
    BACKEND_ALIASES,
    ENTRY_POINT_GROUP,
    LockBackend,
    backend_class,
    registered_schemes,
)
from celery_singleton_lock.backends.base import Granted
from celery_singleton_lock.backends.memory import MemoryBackend
from celery_singleton_lock.config import read_settings


def test_our_schemes_are_registered_as_entry_points_exactly_as_the_built_in_table():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"][ENTRY_POINT_GROUP] == BACKEND_ALIASES


def test_a_scheme_of_another_package_is_found_through_the_entry_point_group(monkeypatch):
    class Point:
        name, value = "ttlstore", f"{__name__}:_TTLStore"

    monkeypatch.setattr(
        "celery_singleton_lock.backends.entry_points",
        lambda group: [Point()] if group == ENTRY_POINT_GROUP else [],
    )
    registered_schemes.cache_clear()
    try:
        assert backend_class("ttlstore://somewhere") is _TTLStore
        assert "ttlstore" in registered_schemes()
    finally:
        registered_schemes.cache_clear()


def test_an_entry_point_that_is_not_a_backend_class_is_a_configuration_error(monkeypatch):
    class Point:
        name, value = "broken", "os.path:join"

    monkeypatch.setattr("celery_singleton_lock.backends.entry_points", lambda group: [Point()])
    registered_schemes.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match=r"broken:// \(os.path:join\) is not a LockBackend"):
            backend_class("broken://x", option="singleton_lock_backend")
    finally:
        registered_schemes.cache_clear()


def test_a_backend_without_a_way_to_wait_is_refused_when_its_class_is_made():
    with pytest.raises(TypeError, match=r"_wait_for_release .*or _wait_turn"):

        class NoWait(LockBackend):  # pragma: no cover - the class statement fails
            def _try_acquire(self, key, token, ttl, owner): ...
            def _renew(self, items): ...
            def _release(self, key, field, value): ...


class _TTLStore(MemoryBackend):
    schemes = ("ttlstore",)


class _QueueStore(MemoryBackend):
    """Overrides only the queue hook: the base's wait must call it and hold its grant."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.turns: list[tuple[str, float | None]] = []

    def _wait_turn(self, key, token, ttl, owner, deadline, refused=None):
        self.turns.append((key, deadline))
        if deadline is not None:
            return None
        return Granted(fencing_token=77, token="queue-token", valid_until=self.clock() + ttl)


def test_wait_hands_a_queue_store_its_full_key_and_deadline_and_holds_what_it_grants():
    store = _QueueStore(prefix="p")
    held = store.wait("k", 5, timeout=None)
    assert held is not None
    assert (held.fencing_token, held.token) == (77, "queue-token")
    assert store.turns[0] == ("p:k", None)
    assert store.wait("k", 5, timeout=2) is None
    deadline = store.turns[-1][1]
    assert deadline is not None
    assert deadline == pytest.approx(store.clock() + 2, abs=0.5)


def test_the_default_wait_of_a_ttl_store_gives_a_grant_its_validity_after_the_wait():
    backend = MemoryBackend(shared=False)
    first = backend.acquire("k", 10)
    assert first is not None
    backend.release(first)
    held = backend.wait("k", 10, timeout=1)
    assert held is not None
    assert held.valid_for == pytest.approx(10 - 0.1 - 0.002, abs=0.05)
    backend.release(held)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("etcd://:s3cret@h1:2379,h2:x9", "port 'x9'"),
        ("redis://:s3cret@h:99999/0", "bad port"),
        ("redis://:s3cret@h:6379/db1", "must be a number"),
        ("redlock://:s3cret@h1,h2", "at least 3"),
    ],
)
def test_settings_refuse_a_url_its_backend_cannot_use_naming_the_option_never_the_password(url, shown):
    with pytest.raises(ConfigurationError, match=shown) as caught:
        read_settings({"singleton_lock_backend": url})
    assert caught.value.option == "singleton_lock_backend"
    assert "s3cret" not in str(caught.value)


def test_settings_repr_masks_the_backend_password():
    settings = read_settings({"singleton_lock_backend": "redis://:s3cret@h:6379/0"})
    assert "s3cret" not in repr(settings)
    assert "h:6379" in repr(settings)


def test_connect_gives_memory_urls_one_store_per_process():
    first, second = connect("memory://seam"), connect("memory://seam")
    held = first.acquire("k", 5)
    assert held is not None
    assert second.acquire("k", 5) is None
    first.release(held)


def test_check_url_of_a_list_checks_every_url():
    urls: Sequence[str] = ["etcd://h1:2379", "etcd://h2:0"]
    with pytest.raises(ConfigurationError, match="port '0'"):
        LockBackend.check_url(urls, option="x")
