"""``celery -A tests.integration.cli_app locks ...`` run as an operator runs it: a real
``celery`` subprocess against real servers, looking at a lock taken by a real task call
(eager, in a thread of this process) that holds it until the test lets it go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery_singleton_lock import HeldLock, connect
from celery_singleton_lock.backends.owner import HOST, Owner
from celery_singleton_lock.testing import RedisServer
from tests.conftest import wait_until
from tests.integration.cli_app import make_app

ROOT = Path(__file__).resolve().parents[2]
#: The call the tests hold: ``cli.report(42, full=True)``.
CALL = "cli.report(42,) {'full': True}"


def _locks(
    url: str, *args: str, stdin: str | None = None, connect_timeout: float = 1.0
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "CSL_CLI_BACKEND": url,
        "CSL_CLI_CONNECT_TIMEOUT": str(connect_timeout),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.cli_app", "locks", *args],
        env=env, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


@contextmanager
def _running_report(url: str, task_id: str) -> Iterator[tuple[Any, HeldLock]]:
    """``cli.report(42, full=True)`` running (eagerly, in a thread) under its lock."""
    app = make_app(url, connect_timeout=1.0)
    thread = threading.Thread(
        target=app.tasks["cli.report"].apply, args=((42,), {"full": True}), kwargs={"task_id": task_id}
    )
    thread.start()
    try:
        yield app, app.running.get(timeout=30)
    finally:
        app.stop.set()
        thread.join(30)


def test_an_operator_lists_shows_and_releases_a_redis_lock_and_its_holder_sees_it_lost(redis_url):
    url = redis_url + "/3"
    with _running_report(url, "t-cli-redis") as (_, held):
        listed = _locks(url, "list", "--json", "--task", "cli.report")
        assert listed.returncode == 0, listed.stderr
        [shown] = json.loads(listed.stdout)
        assert shown["key"] == held.key
        assert (shown["task"], shown["signature"], shown["task_id"]) == ("cli.report", CALL, "t-cli-redis")
        assert (shown["host"], shown["pid"]) == (HOST, os.getpid())
        assert shown["fencing_token"] == held.fencing_token
        assert 0 < shown["ttl"] <= 4

        table = _locks(url, "list", "--task", "cli.report")
        assert table.returncode == 0
        assert held.key in table.stdout
        assert CALL in table.stdout

        key = _locks(url, "key", "cli.report", "42", "--kwargs", '{"full": true}')
        assert key.returncode == 0, key.stderr
        assert f"key: {held.key}" in key.stdout
        assert "held: by task t-cli-redis" in key.stdout

        released = _locks(url, "release", "{singleton-lock:" + held.key + "}", "--yes")
        assert released.returncode == 0, released.stderr
        assert f"Released {held.key}." in released.stdout
        assert "WARNING celery_singleton_lock.cli" in released.stderr
        assert "released by hand by" in released.stderr
        assert f"@{HOST} (pid " in released.stderr
        assert "t-cli-redis" in released.stderr
        # The live holder learns it at its next renewal (a third of its 4 s TTL).
        wait_until(lambda: held.lost, 5, "the holder to see its lock lost")

        assert connect(url).lock_info(held.key) == []


def test_ping_shows_every_node_warns_of_a_connect_timeout_above_a_ttl_and_fails_when_unreachable(
    redis_url,
):
    good = _locks(redis_url + "/3", "ping", connect_timeout=4.0)
    assert good.returncode == 0, good.stderr
    assert " ok " in good.stdout
    assert "clock " in good.stdout
    assert "connect_timeout (4s) is not below lock_ttl of cli.report (4s)" in good.stdout
    assert "locks can be granted" in good.stdout

    bad = _locks("redis://:s3cret@127.0.0.1:1/0", "ping", connect_timeout=0.5)
    assert bad.returncode == 1
    assert "UNREACHABLE" in bad.stdout
    assert "cannot grant locks" in bad.stderr
    assert "s3cret" not in bad.stdout + bad.stderr
    assert "redis://:***@127.0.0.1:1/0" in bad.stdout


def test_the_password_of_a_reachable_server_is_masked_in_every_line():
    with RedisServer(password="s3cret") as server:
        url = server.url + "/0"
        backend = connect(url)
        held = backend.acquire("res:invoice:7", ttl=30)
        try:
            result = _locks(url, "list", "--json")
            assert result.returncode == 0, result.stderr
            assert "s3cret" not in result.stdout + result.stderr
            assert [shown["location"] for shown in json.loads(result.stdout)] == [
                f"redis://:***@127.0.0.1:{server.port}/0 {{singleton-lock:res:invoice:7}}"
            ]
        finally:
            backend.release(held)
            backend.close()


def test_on_etcd_a_release_hands_the_lock_to_the_next_in_line_and_the_holder_sees_it_lost(etcd_url):
    with _running_report(etcd_url, "t-cli-etcd") as (_, held):
        backend = connect(etcd_url)
        waited: list[HeldLock | None] = []
        waiter = threading.Thread(
            target=lambda: waited.append(backend.acquire(held.key, ttl=10, blocking=True, timeout=20))
        )
        waiter.start()
        try:
            wait_until(lambda: backend.lock_info(held.key)[0].waiting == 1, 10, "the waiter in line")
            [shown] = json.loads(_locks(etcd_url, "list", "--json", "--task", "cli.report").stdout)
            assert (shown["key"], shown["signature"], shown["waiting"]) == (held.key, CALL, 1)
            assert shown["fencing_token"] == held.fencing_token

            released = _locks(etcd_url, "release", held.key, "--yes")
            assert released.returncode == 0, released.stderr
            waiter.join(10)
            assert waited[0] is not None  # the next in line got it at once
            assert waited[0].fencing_token > held.fencing_token
            wait_until(lambda: held.lost, 5, "the holder to see its lock lost")
        finally:
            waiter.join(20)
            for got in waited:
                if got is not None:
                    backend.release(got)
            backend.close()


def test_semaphore_slots_are_shown_apart_and_released_one_by_fencing_token_or_all_at_once(
    postgres_url, unique_key
):
    backend = connect(postgres_url)
    held = [
        backend.acquire(unique_key, ttl=30, limit=4, owner=Owner.here(f"t-slot-{n}")) for n in range(3)
    ]
    try:
        assert None not in held
        listed = _locks(postgres_url, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        mine = [shown for shown in json.loads(listed.stdout) if shown["key"] == unique_key]
        assert sorted((s["slot"], s["limit"], s["task_id"]) for s in mine) == [
            (h.slot, 4, f"t-slot-{n}") for n, h in enumerate(held)
        ]
        shown = _locks(postgres_url, "show", unique_key)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("slot:          ") == 3
        assert "slot:          2 of 4" in shown.stdout

        # Several holders and no choice: nothing is released, --yes or not.
        unsure = _locks(postgres_url, "release", unique_key, "--yes")
        assert unsure.returncode == 2
        assert "has 3 holders" in unsure.stderr
        assert "--fencing-token" in unsure.stderr
        assert len(backend.lock_info(unique_key)) == 3

        token = str(held[1].fencing_token)
        one = _locks(postgres_url, "release", unique_key, "--fencing-token", token, "--yes")
        assert one.returncode == 0, one.stderr
        assert f"Released {unique_key} (slot 2 of 4)." in one.stdout
        assert "t-slot-1" in one.stderr
        assert sorted(i.owner.task_id for i in backend.lock_info(unique_key)) == ["t-slot-0", "t-slot-2"]

        gone = _locks(postgres_url, "release", unique_key, "--fencing-token", token)
        assert gone.returncode == 3

        declined = _locks(postgres_url, "release", unique_key, "--all", stdin="n\n")
        assert declined.returncode == 4
        assert "Release all 2?" in declined.stdout

        every = _locks(postgres_url, "release", unique_key, "--all", "--yes")
        assert every.returncode == 0, every.stderr
        assert every.stdout.count(f"Released {unique_key} (slot ") == 2
        assert backend.lock_info(unique_key) == []
    finally:
        for each in held:
            if each is not None:
                backend.release(each)
        backend.close()


def test_file_semaphore_slots_of_another_process_are_listed_with_slot_and_limit(tmp_path, unique_key):
    url = f"file://{tmp_path}"
    backend = connect(url)
    held = [backend.acquire(unique_key, ttl=30, limit=2, owner=Owner.here(f"t-file-{n}")) for n in range(2)]
    try:
        assert None not in held
        listed = _locks(url, "list")
        assert listed.returncode == 0, listed.stderr
        assert "SLOT" in listed.stdout
        assert {line.split()[0] for line in listed.stdout.splitlines() if "t-file-" in line} == {unique_key}
        assert " 1/2 " in listed.stdout
        assert " 2/2 " in listed.stdout
        [data] = [s for s in json.loads(_locks(url, "show", unique_key, "--json").stdout) if s["slot"] == 1]
        assert (data["limit"], data["task_id"], data["ttl"]) == (2, "t-file-1", None)
    finally:
        for each in held:
            backend.release(each)
        backend.close()
