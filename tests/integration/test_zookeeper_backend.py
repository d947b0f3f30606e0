"""The ZooKeeper backend against a real standalone ZooKeeper (the ensemble's faults are
in test_zookeeper_ensemble.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import socket
import threading
import time

import pytest
from kazoo.client import KazooClient

from celery_singleton_lock import ConfigurationError, LockBackendUnavailable, LockLost, connect
from celery_singleton_lock.backends.zookeeper import ZooKeeperBackend
from celery_singleton_lock.lease import LeaseKeeper
from celery_singleton_lock.signals import lock_lost
from celery_singleton_lock.testing import ZooKeeperEnsemble
from tests.conftest import wait_until
from tests.contract import BackendSpec, CrossProcessContract, ServerOperations
from tests.queue_contract import QueueContract, connections


@pytest.fixture(scope="module")
def zk_url(zookeeper_server):
    return zookeeper_server.url


@pytest.fixture(scope="module")
def raw(zookeeper_server):
    """A plain kazoo client of the same server, to look at and break nodes directly."""
    client = KazooClient(hosts=zookeeper_server.hosts)
    client.start(10)
    yield client
    client.stop()
    client.close()


@pytest.fixture(scope="module")
def counted_server():
    """A server of its own for counting requests: the count must not include other
    clients of this process (renewals of other tests' locks)."""
    with ZooKeeperEnsemble(size=1) as ensemble:
        yield ensemble


class TestZooKeeperContract(CrossProcessContract):
    # A dead session is noticed on the next tick (50 ms here), its nodes deleted and the
    # next waiter's watch fired at once.
    expiry_lateness = 0.5

    @pytest.fixture
    def backend_spec(self, zk_url):
        return BackendSpec(zk_url)

    @pytest.fixture
    def server_operations(self, counted_server):
        member = counted_server.members[0]
        # Every packet a client sends, requests and session pings alike (the 4-letter
        # word that reads the count is not one).
        return ServerOperations(count=member.packets_received, spec=BackendSpec(counted_server.url))

    @pytest.fixture(autouse=True)
    def _raw(self, raw):
        self.raw = raw

    def expire(self, backend, key):
        directory = backend._full_key(key)
        for name in self.raw.get_children(directory):
            self.raw.delete(f"{directory}/{name}")

    def unreachable_url(self, hosts, password):
        return f"zookeeper://app:{password}@{','.join(hosts)}/chroot"

    def check_unreachable(self, kind, error, elapsed):
        # kazoo keeps trying every member until connect_timeout (0.5 s) ends; the message
        # says what the last try met.
        assert elapsed >= 0.4
        if kind == "refused":
            assert "Connection refused" in str(error)


@pytest.fixture
def backend(zk_url):
    backend = connect(zk_url)
    yield backend
    backend.close()


@pytest.fixture
def backends(zk_url):
    """Make more backends of the server (each its own sessions, as another process's)."""
    with connections(zk_url) as make:
        yield make


@pytest.fixture
def line_length(backend, raw):
    return lambda key: len(raw.get_children(backend._full_key(key)))


class TestZooKeeperQueue(QueueContract):
    pass


class Proxy:
    """A TCP relay in front of a server, to break the connection on purpose.

    ``forward`` relays both ways; ``drop_replies`` still delivers requests but loses the
    server's replies (a reply lost on the way back: the server applied the request);
    ``blackhole`` relays nothing (a partition: connections stay open, silent);
    :meth:`cut` fails every relayed connection, as a network failure would.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme: str = "zookeeper", userinfo: str = "", path: str = "") -> str:
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if self.mode == "forward" or (self.mode == "drop_replies" and not replies):
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for each in (source, sink):
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)
                each.close()

    def cut(self) -> None:
        """Fail every relayed connection (the pumps close them)."""
        for each in self._sockets:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
        self._sockets.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


@pytest.fixture
def proxy(zookeeper_server):
    relay = Proxy(("127.0.0.1", zookeeper_server.members[0].client_port))
    yield relay
    relay.close()


def _session_of(backend, ttl: float):
    sessions = backend._state.get().sessions
    return sessions[round(max(ttl, 1.0) * 1000)]


def test_a_lock_is_an_ephemeral_node_named_by_its_token_in_a_container(backend, backends, raw, unique_key):
    key = unique_key + "/with/slashes"
    held = backend.acquire(key, ttl=5)
    directory = backend._full_key(key)
    assert directory == "/singleton-lock/" + unique_key.replace(":", ":") + "%2Fwith%2Fslashes"
    (name,) = raw.get_children(directory)
    assert name.startswith(held.token + "-")
    data, stat = raw.get(f"{directory}/{name}")
    assert stat.czxid == held.fencing_token  # the fencing token is the node's creation zxid
    assert stat.ephemeralOwner == _session_of(backend, 5).client.client_id[0]
    token, owner = data.split(b"\n", 1)
    assert token.decode() == held.token
    assert json.loads(owner)["pid"] == os.getpid()
    # The line is a container: the server removes it once empty (every second here).
    assert raw.get(directory)[1].ephemeralOwner == 0
    # A key that is a path prefix of another is a different lock.
    assert backend.acquire(unique_key + "/with", ttl=5) is not None
    assert backends().acquire(key, ttl=5) is None
    assert backend.release(held) is True
    wait_until(lambda: not raw.exists(directory), 5, "the empty container to be removed")
    again = backend.acquire(key, ttl=5)  # the line is made again
    assert again.fencing_token > held.fencing_token
    assert backend.release(again) is True


def test_keys_with_dots_and_odd_characters_are_locks_of_their_own(backend, unique_key):
    keys = [".", "..", "a.b", "ä/ö", "%2F", "/", "\x01"]
    held = [backend.acquire(f"{unique_key}{k}" if k not in (".", "..") else k, ttl=5) for k in keys]
    assert all(h is not None for h in held)
    assert len({backend._full_key(h.key) for h in held}) == len(keys)
    for each in held:
        assert backend.release(each) is True


def test_an_attempt_whose_reply_was_lost_leaves_no_node_behind(proxy, backends, raw, unique_key):
    # kazoo PR #760: a create sent just before the connection failed is applied by the
    # server; nobody holds its node, yet it lives as long as the session, which
    # reconnects: every later attempt on the key is refused, forever.
    holder = backends()
    held = holder.acquire(unique_key, ttl=10)
    backend = backends(proxy.url(), connect_timeout=1)
    assert backend.release(backend.acquire(unique_key + ":warm", ttl=10)) is True
    directory = backend._full_key(unique_key)
    proxy.mode = "drop_replies"
    with pytest.raises(LockBackendUnavailable):
        backend.acquire(unique_key, ttl=10)  # would be refused: not first in line
    assert len(raw.get_children(directory)) == 2  # the server did create its node
    proxy.cut()  # the connection fails; kazoo reconnects with the same session
    proxy.mode = "forward"
    wait_until(lambda: len(raw.get_children(directory)) == 1, 5, "the orphan node to be removed")
    assert holder.release(held) is True
    got = backend.acquire(unique_key, ttl=10)  # the line is free again, for anyone
    assert got is not None
    assert backend.release(got) is True


def test_a_suspended_connection_keeps_the_lock_only_while_it_is_proved(proxy, backends, unique_key):
    # While no server answers, the lock is in doubt: ensure_held() keeps passing until the
    # validity deadline of the last renewal (earlier than the session can expire), then
    # raises; a new holder can only get the lock after that.
    backend = backends(proxy.url(), connect_timeout=0.5)
    held = backend.acquire(unique_key, ttl=1.5)
    time.sleep(0.6)  # one renewal
    proxy.mode = "blackhole"
    silent_from = time.monotonic()
    held.ensure_held()
    wait_until(lambda: held.lost, 3, "the lock to be declared lost")
    assert time.monotonic() - silent_from < 1.5 + 0.1
    with pytest.raises(LockLost):
        held.ensure_held()
    successor = backends().acquire(unique_key, ttl=5, blocking=True, timeout=5)
    assert successor is not None  # the server expired the session and its node
    assert successor.fencing_token > held.fencing_token
    successor.release()


def test_a_connection_back_in_time_keeps_the_lock_and_renewal_goes_on(proxy, backends, unique_key):
    backend = backends(proxy.url(), connect_timeout=0.5)
    held = backend.acquire(unique_key, ttl=1.5)
    proxy.cut()  # a server restart or a fail-over: kazoo reconnects within the session
    time.sleep(2.0)  # past the TTL: only renewals after the reconnection can keep it
    assert not held.lost
    assert backends().acquire(unique_key, ttl=1.5) is None
    assert held.release() is True


def test_a_session_the_server_ended_marks_its_locks_lost_at_once(
    backend, zookeeper_server, unique_key, caplog
):
    caplog.set_level(logging.ERROR, logger="celery_singleton_lock.lease")
    lost: list[tuple[str, str]] = []

    def on_lost(sender, key, held, reason, **kwargs):
        lost.append((key, reason))

    lock_lost.connect(on_lost, weak=False)
    try:
        held = backend.acquire(unique_key, ttl=30)
        other = backend.acquire(unique_key + ":other", ttl=30)
        session_id, password = _session_of(backend, 30).client.client_id
        # The server ends the session as it would at its timeout: another client takes
        # it over, then closes it.
        thief = KazooClient(hosts=zookeeper_server.hosts, client_id=(session_id, password))
        thief.start(5)
        thief.stop()
        thief.close()
        wait_until(lambda: held.lost and other.lost, 5, "both locks to be declared lost")
        with pytest.raises(LockLost, match="session expired"):
            held.ensure_held()
        wait_until(lambda: len(lost) == 2, 2, "lock_lost for both")
        assert sorted(k for k, _ in lost) == sorted([unique_key, unique_key + ":other"])
        assert f"lock {unique_key!r} lost: its ZooKeeper session expired" in caplog.text
        assert held.release() is False
        again = backend.acquire(unique_key, ttl=30)  # a new session of the same TTL
        assert again is not None
        assert again.fencing_token > held.fencing_token
        assert backend.release(again) is True
    finally:
        lock_lost.disconnect(on_lost)


def _child_after_fork(backend, held, key, report) -> None:
    try:
        mine = backend.acquire(key + ":child", ttl=5)  # its own session, no hang
        report.send((
            mine is not None and backend.release(mine),
            backend.release(held),
            backend.renew([held]),
            backend.acquire(key, ttl=5) is None,
        ))
    except BaseException as exc:
        report.send(repr(exc))


def test_a_backend_made_before_a_fork_works_in_the_child_and_leaves_the_parents_lock(
    backend, backends, unique_key
):
    held = backend.acquire(unique_key, ttl=5)  # the parent's session exists before the fork
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    child = context.Process(target=_child_after_fork, args=(backend, held, unique_key, theirs))
    child.start()
    assert ours.poll(15), "the forked child hung"
    assert ours.recv() == (True, False, [False], True)
    child.join(10)
    assert backend.renew([held]) == [True]
    assert backends().acquire(unique_key, ttl=5) is None
    assert backend.release(held) is True


def test_a_ttl_above_the_servers_maximum_session_is_kept_by_proving_the_session(unique_key, caplog):
    # The server grants at most 1.5 s; a 6 s lock lives on that session. It is kept while
    # the session is proved (every 0.5 s), and declared lost as soon as it cannot be,
    # before the server could expire the session, not at its own 6 s validity.
    caplog.set_level(logging.WARNING, logger="celery_singleton_lock.zookeeper")
    with ZooKeeperEnsemble(size=1, max_session_timeout=1.5) as short:
        relay = Proxy(("127.0.0.1", short.members[0].client_port))
        backend = connect(relay.url(), connect_timeout=0.5)
        try:
            held = backend.acquire(unique_key, ttl=6)
            assert "granted sessions of 1.5s, not the 6s asked for" in caplog.text
            time.sleep(1.6)  # past one session timeout
            assert not held.lost
            relay.mode = "blackhole"
            silent_from = time.monotonic()
            wait_until(lambda: held.lost, 3, "the lock to be declared lost")
            # Due at the last proof (sent at most 0.5 s before the silence) + 1.5 s - drift,
            # when the server could first expire the session; a quarter second more for
            # the janitor thread and this loop's tick on a loaded machine. Far from 6 s.
            assert time.monotonic() - silent_from < 1.5 + 0.25
            assert "could not be proved alive" in held.lost_reason
        finally:
            backend.close()
            relay.close()


def test_urls_options_and_their_errors(zookeeper_server):
    backend = connect("zk://app:s3cret@127.0.0.1:1,[::1]/apps/locks?use_ssl=true&ca=/etc/ca.pem",
                      verify_certs="false", prefix="p.x")
    assert backend.url == "zk://app:***@127.0.0.1:1,[::1]/apps/locks?use_ssl=true&ca=/etc/ca.pem"
    assert backend._hosts == "127.0.0.1:1,[::1]:2181"
    assert backend._root == "/apps/locks/p%2Ex"
    options = backend._client_options
    assert options["auth_data"] == [("digest", "app:s3cret")]
    assert options["use_ssl"] is True
    assert options["verify_certs"] is False
    assert options["ca"] == "/etc/ca.pem"
    with pytest.raises(ConfigurationError) as info:
        connect(zookeeper_server.url, ssl_ca_certs="/x")
    assert info.value.option == "singleton_lock_backend_options"
    for bad in ("zookeeper://", "zookeeper://h:99999", "zookeeper://h/a//b", "zookeeper://:pw@h/a/../b"):
        with pytest.raises(ConfigurationError) as info:
            ZooKeeperBackend.check_url(bad, option="singleton_lock_backend")
        assert info.value.option == "singleton_lock_backend"
        assert "pw" not in str(info.value)


def test_digest_credentials_protect_the_nodes(zookeeper_server, backends, unique_key):
    url = zookeeper_server.url.replace("://", "://app:s3cret@") + "/digest"
    owner = backends(url)
    held = owner.acquire(unique_key, ttl=5)
    assert held is not None
    intruder = backends(url.replace("s3cret", "wrong"), connect_timeout=1)
    with pytest.raises(LockBackendUnavailable) as info:
        intruder.acquire(unique_key, ttl=5)
    assert "refused our credentials" in str(info.value)
    assert "wrong" not in str(info.value)
    assert owner.release(held) is True


def test_the_handler_of_os_threads_for_gevent_workers_locks_waits_and_renews(
    zk_url, unique_key, monkeypatch
):
    # What a gevent-patched process uses (its originals are the plain ones here).
    from celery_singleton_lock.backends import zookeeper

    monkeypatch.setattr(zookeeper, "_handler_for_process", zookeeper._NativeHandler)
    backend, other = connect(zk_url), connect(zk_url)
    try:
        held = backend.acquire(unique_key, ttl=0.9)
        assert isinstance(_session_of(backend, 0.9).client.handler, zookeeper._NativeHandler)
        assert other.acquire(unique_key, ttl=5, blocking=True, timeout=0.3) is None
        got: list = []
        waiter = threading.Thread(
            target=lambda: got.append(other.acquire(unique_key, ttl=5, blocking=True, timeout=10))
        )
        waiter.start()
        time.sleep(1.5)  # renewed past its TTL meanwhile
        assert not held.lost
        assert held.release() is True
        waiter.join(5)
        assert got[0] is not None
        assert got[0].fencing_token > held.fencing_token
        assert other.release(got[0]) is True
    finally:
        backend.close()
        other.close()


def test_a_loop_of_brief_locks_never_wakes_the_idle_janitor(backend, unique_key):
    # The janitor never sees these locks held: it must learn its idle interval from the
    # lock it is told about, or every acquisition costs a wake-up call (a thread switch).
    backend.release(backend.acquire(unique_key, ttl=30))
    janitor = backend._state.get().janitor
    before = janitor.wake_calls
    for _ in range(50):
        held = backend.acquire(unique_key, ttl=30)
        assert held is not None
        backend.release(held)
    # One call may wake a janitor that went on to sleep until called; then it sleeps
    # about a TTL, past every lock of the loop.
    assert janitor.wake_calls - before <= 1


def test_brief_locks_beside_a_longer_held_one_never_wake_the_janitor(backend, unique_key):
    # The janitor sleeps until the long lock is due, unless it learnt a shorter interval
    # from the locks it was told about: else each brief lock, due sooner, calls it.
    long_held = backend.acquire(f"{unique_key}:long", ttl=60)
    assert long_held is not None
    backend.release(backend.acquire(unique_key, ttl=30))
    janitor = backend._state.get().janitor
    before = janitor.wake_calls
    for _ in range(50):
        held = backend.acquire(unique_key, ttl=30)
        assert held is not None
        backend.release(held)
    assert janitor.wake_calls - before <= 1
    assert backend.release(long_held)


def test_keep_until_leaves_the_node_to_the_janitor_with_no_renewal(backend, backends, raw, unique_key):
    held = backend.acquire(unique_key, ttl=1)
    directory = backend._full_key(unique_key)
    assert backend.keep_until(held, backend.clock() + 1.5) is True
    assert held not in LeaseKeeper.for_process().tracked()
    assert len(raw.get_children(directory)) == 1
    assert backend.release(held) is False  # the janitor ends it at the deadline
    waiter = backends()
    got = waiter.acquire(unique_key, ttl=5, blocking=True, timeout=5)
    assert got is not None
    assert got.release() is True
