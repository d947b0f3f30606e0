"""The file:// backend: the contract suite on kernel file locks, and what the kernel adds
(a dead holder's lock is free at once) or takes away (no lease expiry for a living one)."""

from __future__ import annotations

import fcntl
import gc
import multiprocessing
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
from celery import Celery

from celery_singleton_lock import ConfigurationError, LockBackendUnavailable, LockError, connect
from celery_singleton_lock.backends import file as file_backend
from celery_singleton_lock.backends.owner import HOST, Owner
from celery_singleton_lock.config import read_settings
from celery_singleton_lock.lease import LeaseKeeper
from tests import contract_processes
from tests.conftest import wait_until
from tests.contract import BackendSpec, CrossProcessContract, ServerOperations
from tests.contract_processes import lease_started_at

#: The promise that replaces lease expiry: how soon a SIGKILLed holder's lock is free.
FREE_AFTER_KILL = 0.05


@pytest.fixture(scope="module")
def lock_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("file-locks")


@pytest.fixture(scope="module")
def file_url(lock_dir) -> str:
    return f"file://{lock_dir}"


def _die_here(backend, key: str) -> None:
    """Close this process's descriptors holding ``key``: what the kernel does at death."""
    path = backend.path_of(key)
    for held_path, token in list(file_backend._process.held):
        if held_path == path:
            file_backend._drop(held_path, token)


class TestFileContract(CrossProcessContract):
    """Every promise; those about lease expiry become promises about the kernel."""

    @pytest.fixture
    def backend_spec(self, file_url):
        return BackendSpec(file_url)

    @pytest.fixture
    def server_operations(self, monkeypatch):
        # No server: count the lock-file system calls of this process, where the
        # contract's waiters run (a waiter blocked in the kernel makes none).
        calls = [0]
        original = file_backend._lock

        def counted(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(file_backend, "_lock", counted)
        return ServerOperations(count=lambda: calls[0])

    def expire(self, backend, key):
        # The kernel is the lease: a lock ends when its holder's descriptor closes.
        _die_here(backend, key)

    def test_waiter_gets_the_lock_when_a_dead_holders_lease_expires(
        self, backend, second_backend, unique_key
    ):
        # Replaced: a lease nobody renews does not end; the holder's death does, at once.
        held = backend.acquire(unique_key, ttl=0.3)
        LeaseKeeper.for_process().untrack(held)
        assert second_backend.acquire(unique_key, ttl=5, blocking=True, timeout=0.9) is None
        got: list = []
        waiter = threading.Thread(
            target=lambda: got.append(second_backend.acquire(unique_key, ttl=5, blocking=True, timeout=5))
        )
        waiter.start()
        wait_until(lambda: backend.path_of(unique_key) in file_backend._process.rooms, 5, "a waiter")
        died_at = time.monotonic()
        self.expire(backend, unique_key)
        waiter.join(5)
        assert got[0] is not None
        assert time.monotonic() - died_at < FREE_AFTER_KILL
        second_backend.release(got[0])

    def test_a_sigkilled_holder_is_replaced_at_lease_expiry_never_before(self, backend_spec, unique_key):
        # Replaced: there is no lease to wait out; the lock is free when the holder dies.
        _sigkilled_holder_is_replaced_within(backend_spec.url, unique_key, FREE_AFTER_KILL)

    def test_a_paused_holder_is_replaced_then_learns_it_lost_and_holds_an_older_token(
        self, backend_spec, unique_key
    ):
        # Replaced: a living holder is never replaced, stopped or not (lock_ttl has no part
        # in liveness; docs/file.md).
        holder, pipe, _ = _start_holder(backend_spec.url, unique_key, ttl=0.2)
        backend = backend_spec.connect()
        try:
            os.kill(holder.pid, signal.SIGSTOP)
            assert backend.acquire(unique_key, ttl=1, blocking=True, timeout=0.8) is None  # 4 TTLs
            os.kill(holder.pid, signal.SIGCONT)
            # (Its lease keeper, resumed past the validity deadline, tells it the lock is
            # lost, as every backend's does: it cannot know that nobody took it meanwhile.)
            pipe.send("release")
            assert pipe.poll(10)
            assert pipe.recv() is True  # nobody had taken it
            # (Blocking: the thread of the wait that timed out takes it for a moment.)
            assert backend.acquire(unique_key, ttl=1, blocking=True, timeout=2) is not None
        finally:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.join(5)

    def test_a_semaphore_grants_its_limit_of_slots_with_rising_fencing_tokens_then_refuses(
        self, backend, second_backend, unique_key
    ):
        # As the base's, but the slot freed after a timed-out wait is taken blocking: that
        # wait's watchers stay blocked in the kernel until a slot frees, and one takes it
        # for a moment to let it go (docs/file.md).
        held = [b.acquire(unique_key, ttl=10, limit=3) for b in (backend, second_backend, backend)]
        assert sorted(h.slot for h in held) == [0, 1, 2]
        tokens = [h.fencing_token for h in held]
        assert tokens == sorted(tokens)
        assert len(set(tokens)) == 3
        assert second_backend.acquire(unique_key, ttl=10, limit=3) is None
        assert second_backend.acquire(unique_key, ttl=10, limit=3, blocking=True, timeout=0.2) is None
        assert [h.backend.renew([h]) for h in held] == [[True]] * 3
        assert held.pop(1).release() is True
        again = second_backend.acquire(unique_key, ttl=10, limit=3, blocking=True, timeout=5)
        assert again is not None
        assert again.slot == 1
        assert again.fencing_token > max(tokens)
        for h in [*held, again]:
            assert h.release() is True
        assert backend.lock_info(unique_key) == []

    def test_a_sigkilled_holders_slot_is_freed_at_lease_expiry_never_before(
        self, backend_spec, backend, unique_key
    ):
        # Replaced: the kernel frees a dead holder's slot at once, and wakes a watcher.
        kept = backend.acquire(unique_key, ttl=30, limit=2)
        assert kept is not None
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        holder = context.Process(
            target=contract_processes.hold_slot, args=(backend_spec, unique_key, 1.0, 2, theirs), daemon=True
        )
        holder.start()
        try:
            assert ours.poll(60)
            _, token, _, _ = ours.recv()
            got: list = []
            waiter = threading.Thread(target=lambda: got.append(
                (backend.acquire(unique_key, ttl=5, limit=2, blocking=True, timeout=10), time.monotonic())
            ))
            waiter.start()
            path = backend.path_of(unique_key)
            wait_until(lambda: (path, 2) in file_backend._process.slot_rooms, 5, "the waiter to block")
            killed_at = time.monotonic()
            os.kill(holder.pid, signal.SIGKILL)
            waiter.join(10)
        finally:
            holder.kill()
            holder.join(5)
        held, acquired_at = got[0]
        assert held is not None
        freed_after = acquired_at - killed_at
        assert freed_after < FREE_AFTER_KILL * 4, f"free {freed_after:.3f}s after the kill"
        assert held.fencing_token > max(token, kept.fencing_token)
        assert backend.release(held) is True
        assert backend.release(kept) is True

    def test_an_unreachable_server_fails_within_the_connect_timeout_with_the_password_masked(
        self, tmp_path, unique_key
    ):
        # Replaced: no server to be unreachable; a lock directory that became unusable
        # (here a file where it was) fails at once, naming the URL.
        directory = tmp_path / "locks"
        backend = connect(f"file://{directory}")
        directory.rmdir()
        directory.write_text("not a directory")
        start = time.monotonic()
        with pytest.raises(LockBackendUnavailable) as info:
            backend.acquire(unique_key, ttl=5)
        assert time.monotonic() - start < 0.5
        assert info.value.url == f"file://{directory}"
        assert str(directory) in str(info.value)

    def test_ping_of_an_unreachable_server_fails_in_bounded_time_with_the_password_masked(
        self, tmp_path
    ):
        # Replaced: no server; a lock directory that became unusable fails the probe at once.
        directory = tmp_path / "locks"
        backend = connect(f"file://{directory}")
        directory.rmdir()
        directory.write_text("not a directory")
        report = backend.ping()
        assert not report.can_grant
        assert str(directory) in (report.grant_error or "")

    def test_a_lock_of_another_process_is_listed_with_its_owner_and_broken_from_here(
        self, backend_spec, backend, unique_key
    ):
        # Replaced: the kernel holds a live process's lock for it; breaking it is refused,
        # naming the process to stop, and its death frees it at once.
        owner = Owner(HOST, 4545, task_id="task-X")
        holder, _pipe, fencing_token = _start_holder(backend_spec.url, unique_key, owner=owner)
        try:
            [info] = backend.lock_info(unique_key)
            assert (info.owner, info.fencing_token, info.ttl) == (owner, fencing_token, None)
            with pytest.raises(LockError, match="kill 4545"):
                backend.break_lock(info)
            assert backend.acquire(unique_key, ttl=1) is None
        finally:
            holder.kill()
            holder.join(5)
        assert backend.lock_info(unique_key) == []

    def test_release_owned_from_another_process_needs_the_holders_host_pid_and_task_id(
        self, backend_spec, unique_key
    ):
        # Replaced: the kernel freed a dead holder's lock already; release_owned clears
        # the record that still names it (listings), and only for its exact owner.
        _release_owned_clears_only_the_exact_record(backend_spec.url, unique_key)

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_neither_renews_its_parents_lock_nor_frees_it_by_exiting(
        self, backend_spec, backend, second_backend, unique_key
    ):
        # As the base's, with a death instead of an expiry: the parent lets `left` go (its
        # descriptor closes, as at its death); the child, alive, must not keep it.
        kept = backend.acquire(unique_key + ":kept", ttl=0.6)
        left = backend.acquire(unique_key + ":left", ttl=0.6)
        args = (kept, False, backend_spec, unique_key + ":child", 0.6)
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe()
        child = context.Process(target=contract_processes.inherit, args=(*args, theirs), daemon=True)
        child.start()
        try:
            assert ours.poll(30)
            ours.recv()
            _die_here(backend, left.key)
            got = second_backend.acquire(unique_key + ":left", ttl=5)
            assert got is not None  # at once, the child still alive
            assert second_backend.release(got) is True
            assert second_backend.acquire(unique_key + ":kept", ttl=1) is None
            ours.send("exit")
            child.join(10)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
        exited_at = time.monotonic()
        wait_until(lambda: lease_started_at(kept) > exited_at, 1, "a renewal after the child exited")
        assert not kept.lost
        assert second_backend.acquire(unique_key + ":kept", ttl=1) is None
        assert backend.release(kept) is True


# -- processes ------------------------------------------------------------------------------

def _hold(url: str, key: str, ttl: float, owner: Owner | None, report) -> None:
    """In a spawned child: take ``key``, report (pid, fencing token), keep it until killed."""
    backend = connect(url)
    held = backend.acquire(key, ttl=ttl, owner=owner)
    report.send((os.getpid(), held.fencing_token if held else None))
    while True:
        try:
            command = report.recv()
        except EOFError:  # the test is over
            return
        if command == "release":
            report.send(backend.release(held))


def _start_holder(url: str, key: str, ttl: float = 10, owner: Owner | None = None):
    """A spawned holder of ``key``, its pipe (keep it: the holder ends when it closes) and
    its fencing token."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    holder = context.Process(target=_hold, args=(url, key, ttl, owner, theirs), daemon=True)
    holder.start()
    assert ours.poll(30), "the holder did not start"
    _, token = ours.recv()
    assert token is not None, "the holder did not get the lock"
    return holder, ours, token


def _sigkilled_holder_is_replaced_within(url: str, key: str, bound: float) -> None:
    holder, _pipe, token = _start_holder(url, key)
    backend = connect(url)
    assert backend.acquire(key, ttl=10) is None
    got: list = []
    waiter = threading.Thread(
        target=lambda: got.append((backend.acquire(key, ttl=10, blocking=True, timeout=10), time.monotonic()))
    )
    waiter.start()
    path = backend.path_of(key)
    wait_until(lambda: path in file_backend._process.rooms, 5, "the waiter to block in the kernel")
    killed_at = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    waiter.join(10)
    held, acquired_at = got[0]
    assert held is not None
    assert acquired_at - killed_at < bound, f"free {acquired_at - killed_at:.3f}s after the kill"
    assert held.fencing_token > token
    holder.join(5)
    backend.release(held)


def test_a_reaped_holders_lock_is_free_at_once(file_url, unique_key):
    holder, _pipe, _ = _start_holder(file_url, unique_key)
    backend = connect(file_url)
    assert backend.acquire(unique_key, ttl=10) is None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(5)
    held = backend.acquire(unique_key, ttl=10)  # no wait at all: the kernel freed it at exit
    assert held is not None
    backend.release(held)


def _release_owned_clears_only_the_exact_record(file_url: str, unique_key: str) -> None:
    # The worker's main process, after one of its pool processes died: the kernel freed the
    # lock already; the record that still names it is cleared, and only for that owner.
    holder, _pipe, _ = _start_holder(file_url, unique_key, owner=Owner(HOST, 4242, task_id="task-A"))
    backend = connect(file_url)
    path = backend.path_of(unique_key)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(5)
    strangers = (Owner(HOST, 4242, "task-B"), Owner(HOST, 4243, "task-A"), Owner("other", 4242, "task-A"))
    for stranger in strangers:
        assert backend.release_owned(unique_key, stranger) is False
    assert "task-A" in Path(path).read_text()
    assert backend.release_owned(unique_key, Owner(HOST, 4242, task_id="task-A")) is True
    assert "task-A" not in Path(path).read_text()
    assert backend.release_owned(unique_key, Owner(HOST, 4242, task_id="task-A")) is False


def test_release_owned_of_a_living_holder_elsewhere_frees_nothing(file_url, unique_key):
    owner = Owner(HOST, 4343, task_id="task-live")
    holder, _pipe, _ = _start_holder(file_url, unique_key, owner=owner)
    backend = connect(file_url)
    try:
        assert backend.release_owned(unique_key, owner) is False  # its lock is its descriptor
        assert backend.acquire(unique_key, ttl=5) is None
    finally:
        holder.kill()
        holder.join(5)


# -- fork -----------------------------------------------------------------------------------

def _in_fork(child) -> int:
    """Run ``child()`` in a forked child; its return value (0-255) is the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 99
        try:
            status = child()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_neither_releases_renews_nor_keeps_its_parents_lock(file_url, unique_key):
    backend = connect(file_url)
    held = backend.acquire(unique_key, ttl=10)
    fd = file_backend._process.held_fd(backend.path_of(unique_key), held.token)

    def child() -> int:
        try:
            os.fstat(fd)
        except OSError:
            pass
        else:
            return 1  # the inherited descriptor is still open in the child
        if file_backend._process.held or file_backend._process.open:
            return 2
        if backend.renew([held]) != [False]:
            return 3
        if backend.release(held) is not False:  # and it must not clear the record
            return 4
        if connect(file_url).acquire(unique_key, ttl=1) is not None:
            return 5  # the child is not its parent: the lock is taken for it too
        return 0

    assert _in_fork(child) == 0
    assert held.token in Path(backend.path_of(unique_key)).read_text()
    assert backend.renew([held]) == [True]
    assert connect(file_url).acquire(unique_key, ttl=1) is None  # still ours after the child closed
    assert backend.release(held) is True


def _hold_and_fork(url: str, key: str, report) -> None:
    backend = connect(url)
    held = backend.acquire(key, ttl=10)
    ready_r, ready_w = os.pipe()
    grandchild = os.fork()
    if grandchild == 0:  # outlives us, with a copy of every descriptor we had at the fork
        os.write(ready_w, b"!")  # fork() returned here: the at-fork hooks have run
        time.sleep(60)
        os._exit(0)
    os.read(ready_r, 1)
    report.send((grandchild, held.fencing_token))
    time.sleep(60)


def test_a_forked_child_does_not_keep_the_lock_of_its_dead_parent(file_url, unique_key):
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    parent = context.Process(target=_hold_and_fork, args=(file_url, unique_key, theirs), daemon=True)
    parent.start()
    assert ours.poll(30)
    grandchild, _ = ours.recv()
    backend = connect(file_url)
    try:
        assert backend.acquire(unique_key, ttl=5) is None
        os.kill(parent.pid, signal.SIGKILL)
        # (Not join(): the grandchild has a copy of the pipe join() waits to see closed.)
        wait_until(lambda: parent.exitcode is not None, 5, "the parent to be reaped")
        os.kill(grandchild, 0)  # alive
        held = backend.acquire(unique_key, ttl=5)
        assert held is not None
        backend.release(held)
    finally:
        os.kill(grandchild, signal.SIGKILL)


# -- files ----------------------------------------------------------------------------------

def test_keys_are_hashed_into_the_directory(file_url, lock_dir, unique_key):
    backend = connect(file_url)
    key = f"../../{unique_key}/\x00/ünï"
    held = backend.acquire(key, ttl=5)
    path = Path(backend.path_of(key))
    assert path.parent == lock_dir
    assert len(path.stem) == 64
    assert set(path.stem) <= set("0123456789abcdef")
    record = path.read_text()
    assert held.token in record
    assert "ünï" in record  # the key is kept, for listing
    backend.release(held)


def test_fencing_tokens_rise_across_the_file_being_deleted(file_url, unique_key):
    backend = connect(file_url)
    first = backend.acquire(unique_key, ttl=5)
    backend.release(first)
    os.unlink(backend.path_of(unique_key))
    second = backend.acquire(unique_key, ttl=5)
    assert second.fencing_token > first.fencing_token  # the clock is the floor
    backend.release(second)


def test_a_lock_file_deleted_under_its_holder_is_lost_not_shared(file_url, unique_key):
    backend = connect(file_url)
    held = backend.acquire(unique_key, ttl=0.6)
    os.unlink(backend.path_of(unique_key))  # a tmp cleaner, a person
    other = connect(file_url).acquire(unique_key, ttl=5)
    assert other is not None  # a new file, a new lock ...
    wait_until(lambda: held.lost, 3, "the first holder to learn its file is gone")
    assert held.release() is False
    other.release()


def test_a_dropped_handle_frees_its_lock(file_url, unique_key):
    backend = connect(file_url)
    assert backend.acquire(unique_key, ttl=5) is not None  # dropped at once
    gc.collect()
    held = backend.acquire(unique_key, ttl=5)
    assert held is not None
    backend.release(held)


def test_a_handle_dropped_while_its_thread_holds_the_guard_is_freed_without_a_deadlock(
    file_url, unique_key
):
    # The garbage collector runs finalizers in whatever thread it interrupts, maybe one
    # inside the descriptors' guard (a CI run hung so, in a waiting room's set-up).
    backend = connect(file_url)
    held = backend.acquire(unique_key, ttl=5)
    assert held is not None
    path = backend.path_of(unique_key)
    done = threading.Event()

    def finalize_inside_the_guard() -> None:
        with file_backend._process.guard:
            file_backend._drop(path, held.token)
        done.set()

    thread = threading.Thread(target=finalize_inside_the_guard, daemon=True)
    thread.start()
    assert done.wait(5), "the finalizer waited for the guard its own thread held"
    # Freed by the next open of this process: the lock is free again.
    other = backend.acquire(unique_key, ttl=5)
    assert other is not None
    backend.release(other)


def test_a_timed_out_waiter_leaves_nothing_behind(file_url, unique_key):
    backend = connect(file_url)
    held = backend.acquire(unique_key, ttl=5)
    assert backend.acquire(unique_key, ttl=5, blocking=True, timeout=0.2) is None
    backend.release(held)
    path = backend.path_of(unique_key)
    wait_until(lambda: path not in file_backend._process.rooms, 2, "the room's thread to end")
    again = connect(file_url).acquire(unique_key, ttl=5)
    assert again is not None
    again.release()


def _mark(url: str, key: str, ttl: float, task_id: str) -> bool:
    held = connect(url).acquire(key, ttl=ttl, owner=Owner.of_message(task_id))
    return held is not None


def test_a_message_marker_outlives_its_process_and_ends_at_its_ttl(file_url, unique_key):
    # enqueue_once's queued marker, beat's slot claim: written by one process, cleared by
    # another or by time.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        assert pool.apply(_mark, (file_url, unique_key, 0.6, "queued-1"))
        assert pool.apply(_mark, (file_url, unique_key + "-2", 30, "queued-2"))
    backend = connect(file_url)
    refused = backend.attempt(unique_key, ttl=5)
    assert refused.holder_task_id == "queued-1"
    assert 0 < refused.holder_ttl <= 0.6
    waited_from = time.monotonic()
    held = backend.acquire(unique_key, ttl=5, blocking=True, timeout=5)  # at its expiry
    assert held is not None
    assert 0.2 < time.monotonic() - waited_from < 1.2
    backend.release(held)
    assert backend.release_owned(unique_key + "-2", Owner.of_message("queued-2")) is True
    assert backend.acquire(unique_key + "-2", ttl=5) is not None


# -- configuration --------------------------------------------------------------------------

def test_the_default_directory_is_ours_alone(tmp_path, monkeypatch, unique_key):
    monkeypatch.setattr(file_backend.tempfile, "gettempdir", lambda: str(tmp_path))
    backend = connect("file://")
    directory = tmp_path / f"celery-singleton-lock-{os.getuid()}"
    assert backend.directory == directory
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    held = backend.acquire(unique_key, ttl=5)
    backend.release(held)
    directory.chmod(0o755)
    with pytest.raises(ConfigurationError, match=r"mode 0755, open to other users") as info:
        connect("file://")
    assert info.value.option == "singleton_lock_backend"
    directory.chmod(0o700)
    os.chown(directory, os.getuid() + 1000, -1) if os.getuid() == 0 else None
    if os.getuid() == 0:
        with pytest.raises(ConfigurationError, match=r"belongs to uid"):
            connect("file://")
    directory.rename(tmp_path / "elsewhere")
    directory.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigurationError, match=r"is not a directory \(a symlink\?\)"):
        connect("file://")


def test_a_network_filesystem_is_refused_naming_the_setting(lock_dir, monkeypatch):
    assert file_backend.filesystem_type(lock_dir) not in file_backend.NETWORK_FILESYSTEMS
    monkeypatch.setattr(file_backend, "filesystem_type", lambda path: "nfs4")
    with pytest.raises(ConfigurationError, match=r"is on a nfs4 filesystem") as info:
        connect(f"file://{lock_dir}")
    assert info.value.option == "singleton_lock_backend"
    app = Celery("nfs", broker="memory://", set_as_current=False)
    app.conf.singleton_lock_backend = f"file://{lock_dir}"
    with pytest.raises(ConfigurationError, match="singleton_lock_backend"):
        read_settings(app.conf)  # already when the settings are read


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file://otherhost/var/locks", "names the host 'otherhost'"),
        ("file:///var/locks?mode=1", "no query"),
    ],
)
def test_a_url_that_is_not_a_local_directory_is_refused(url, words):
    with pytest.raises(ConfigurationError, match=words) as info:
        connect(url)
    assert info.value.option == "singleton_lock_backend"


def test_unknown_options_name_the_options_setting(file_url):
    with pytest.raises(ConfigurationError) as info:
        connect(file_url, ssl=True)
    assert info.value.option == "singleton_lock_backend_options"


def test_a_removed_directory_is_made_again(tmp_path, unique_key):
    directory = tmp_path / "cleaned"
    backend = connect(f"file://{directory}")
    held = backend.acquire(unique_key, ttl=5)
    backend.release(held)
    for each in directory.iterdir():
        each.unlink()
    directory.rmdir()  # a temp cleaner
    again = backend.acquire(unique_key, ttl=5)
    assert again is not None
    assert again.fencing_token > held.fencing_token
    backend.release(again)


def test_a_wait_interrupted_by_an_exception_leaves_no_lock_behind(file_url, unique_key, monkeypatch):
    # A soft time limit (an exception raised into the waiting thread) can end a wait at
    # any moment, also while the room hands it the lock: that lock must not stay held.
    backend = connect(file_url)
    held = backend.acquire(unique_key, ttl=5)
    original = file_backend._Waiter.wait
    calls = []

    def interrupted(self, timeout):
        calls.append(timeout)
        if len(calls) == 1:
            threading.Timer(0.1, lambda: backend.release(held)).start()
            original(self, timeout)  # woken: the room handed it the lock ...
            raise KeyboardInterrupt  # ... and the exception lands before it returns
        return original(self, timeout)

    monkeypatch.setattr(file_backend._Waiter, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backend.acquire(unique_key, ttl=5, blocking=True, timeout=5)
    monkeypatch.undo()
    again = connect(file_url).acquire(unique_key, ttl=5)
    assert again is not None
    again.release()


def test_a_semaphore_waiter_gets_whichever_slot_frees_first_and_its_watchers_end(file_url, unique_key):
    backend = connect(file_url)
    held = [backend.acquire(unique_key, ttl=10, limit=3) for _ in range(3)]
    assert [h.slot for h in held] == [0, 1, 2]
    got: list = []
    waiter = threading.Thread(
        target=lambda: got.append(backend.acquire(unique_key, ttl=10, limit=3, blocking=True, timeout=10))
    )
    waiter.start()
    path = backend.path_of(unique_key)
    wait_until(lambda: (path, 3) in file_backend._process.slot_rooms, 5, "the waiter's watchers")
    assert held[2].release() is True  # the last slot, not the first
    waiter.join(10)
    assert got[0] is not None
    assert got[0].slot == 2
    for each in (held[0], held[1], got[0]):
        assert each.release() is True
    # Each watcher let its freed slot go and ended; nothing of the wait is left.
    wait_until(lambda: (path, 3) not in file_backend._process.slot_rooms, 5, "the watchers to end")
    assert backend.acquire(unique_key, ttl=10, limit=3, blocking=True, timeout=5).release() is True
    assert backend.lock_info(unique_key) == []


def test_a_slot_passing_through_a_watcher_is_looked_at_again_not_refused(file_url, unique_key, monkeypatch):
    # A watcher whose waiters left is woken by a release and lets the slot go a few
    # system calls later; an attempt in between must not turn a call away.
    backend = connect(file_url)
    held = [backend.acquire(unique_key, ttl=10, limit=2) for _ in range(2)]
    assert held[1].release() is True
    path = backend.path_of(unique_key)
    watcher = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert file_backend._lock(watcher, file_backend._slot_byte(1), fcntl.F_WRLCK, wait=False)
        yields: list[float] = []

        def let_go(seconds: float) -> None:
            yields.append(seconds)
            file_backend._lock(watcher, file_backend._slot_byte(1), fcntl.F_UNLCK, wait=False)

        monkeypatch.setattr(file_backend.time, "sleep", let_go)
        again = backend.acquire(unique_key, ttl=10, limit=2)
        assert again is not None
        assert again.slot == 1
        assert yields == [0]
        monkeypatch.undo()
        assert backend.acquire(unique_key, ttl=10, limit=2) is None  # a real holder: refused
    finally:
        os.close(watcher)
    assert again.release() is True
    assert held[0].release() is True
