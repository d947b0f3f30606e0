"""(i) ZooKeeper: our backend beside kazoo's ``Lock`` recipe, a raw kazoo loop and a socket.

Started here: one standalone ZooKeeper of the scenario's own
(:class:`~celery_singleton_lock.testing.ZooKeeperEnsemble`: every four-letter word
enabled, so ``mntr`` can be read), with the server's default durability: every write
waits for the transaction log's fsync. Three measurements, the libraries interleaved, medians:

1. uncontended acquire+release cycles per second in one process, beside floors: a raw
   kazoo loop (create an ephemeral sequential node, delete it: two requests through
   kazoo's connection thread), the same with the read of the line that any correct
   sequential-node lock needs (create | getChildren, delete), and a bare socket sending
   the two requests in ZooKeeper's jute encoding after a session handshake (the physical
   floor); requests
   per cycle from the server's own ``zk_packets_received``, and by opcode from an untimed
   pass through :class:`RequestCounter`;
2. 8 pool processes contending for one key (the loop and the analysis of scenario (b)):
   handoff latency, the share of turns in strict rotation (FIFO: with every process
   always queued, the holder of turn ``i`` holds turn ``i + 8`` again), acquisitions per
   process, requests and watch notifications per acquisition;
3. 4 pool processes waiting on a held key: requests the server received, and (through
   :class:`RequestCounter`) which requests the waiters sent.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import struct
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from benchmarks import scenario_etcd, scenario_handoff
from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    Table,
    WorkerError,
    fmt,
    fmt_cmds,
    interleaved,
    median,
    percentile,
    rotate,
    spread,
)
from benchmarks.libs import KAZOO_SESSION_S, LABELS, WAIT_STYLE, make_adapter

if TYPE_CHECKING:
    from celery_singleton_lock.testing import ZooKeeperEnsemble, ZooKeeperMember

LIBS = ["zk-socket", "zk-raw", "zk-raw-line", "ours-zk", "kazoo"]
CONTENDERS = ["ours-zk", "kazoo"]
TTL = 30.0
CHUNKS = 4
CYCLES = 250  # per slice: CHUNKS slices per library per repetition
COUNTED_CYCLES = 100
WAITERS = 4
SETTLE_S = 1.0
FN = "benchmarks.scenario_zookeeper"
#: suffix of the pool adapters that talk through the request counter
COUNTED = "@counted"

#: ZooKeeper request opcodes (``ZooDefs.OpCode``) that clients send.
OPCODES = {
    1: "create", 2: "delete", 3: "exists", 4: "getData", 5: "setData", 6: "getACL",
    7: "setACL", 8: "getChildren", 9: "sync", 11: "ping", 12: "getChildren2", 13: "check",
    14: "multi", 15: "create2", 16: "reconfig", 17: "checkWatches", 18: "removeWatches",
    19: "createContainer", 20: "deleteContainer", 21: "createTTL", 22: "multiRead",
    100: "auth", 101: "setWatches", 102: "sasl", 103: "getEphemerals",
    104: "getAllChildrenNumber", 105: "setWatches2", 106: "addWatch", 107: "whoAmI",
    -11: "closeSession",
}


# -- the server and its counters ------------------------------------------------------------


class Packets:
    """``zk_packets_received`` / ``zk_packets_sent`` deltas, without the reads' own cost.

    A client's every request is one packet received and its reply one sent; watch
    notifications are packets sent with no request, so ``sent - received`` counts them.
    What one ``mntr`` adds itself is measured once, on an otherwise silent server.
    """

    def __init__(self, member: ZooKeeperMember) -> None:
        self.member = member
        a, b = self.read(), self.read()
        self.own = (b[0] - a[0], b[1] - a[1])

    def read(self) -> tuple[int, int]:
        m = self.member.metrics()
        return int(m["zk_packets_received"]), int(m["zk_packets_sent"])

    def delta(self, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        """(requests, watch notifications) between two reads."""
        received = b[0] - a[0] - self.own[0]
        sent = b[1] - a[1] - self.own[1]
        return received, sent - received


class RequestCounter:
    """A TCP relay in front of the server that counts what clients send, by opcode.

    It parses ZooKeeper's framing (``int32 length`` + body): a connection's first frame
    from the client is the session handshake, every later one starts ``xid, opcode``;
    from the server, ``xid == -1`` marks a watch notification. It adds a hop: use it
    where time is not measured.
    """

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="zk-counter", daemon=True).start()

    @property
    def url(self) -> str:
        return f"zookeeper://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.server_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        buf, first = b"", True
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
                buf += chunk
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from(">i", buf)[0]:
                    size = struct.unpack_from(">i", buf)[0]
                    frame, buf = buf[4:4 + size], buf[4 + size:]
                    self._count(frame, upstream, first)
                    first = False
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _count(self, frame: bytes, upstream: bool, first: bool) -> None:
        if first:
            name = "connect" if upstream else ""
        elif upstream:
            opcode = struct.unpack_from(">i", frame, 4)[0]
            name = OPCODES.get(opcode, f"op{opcode}")
        else:
            name = "(watch event)" if struct.unpack_from(">i", frame)[0] == -1 else ""
        if name:
            with self._lock:
                self.counts[name] += 1

    def close(self) -> None:
        self.listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


def lock_requests(counts: Counter[str]) -> int:
    """Requests other than session heartbeats (pings) and handshakes."""
    return sum(v for k, v in counts.items() if k not in ("ping", "connect", "(watch event)"))


# -- run inside the worker processes ------------------------------------------------------


def _bind(env: Env, workers: list[int], adapters: dict[str, list[str]], errors: dict[str, str]) -> None:
    for reply in env.pool.run_all(workers, "benchmarks.harness:bind", timeout=120, adapters=adapters):
        for lib, why in reply.items():
            errors.setdefault(lib, why)


def _unbind(env: Env, workers: list[int], names: list[str]) -> None:
    env.pool.run_all(workers, "benchmarks.harness:unbind", timeout=60, names=names)


# -- the three measurements ---------------------------------------------------------------


def _cycles(adapter: Any, key: str, n: int) -> None:
    for _ in range(n):
        handle = adapter.try_acquire(key, TTL)
        if handle is None:
            raise RuntimeError(f"uncontended acquire of {key!r} failed")
        if not adapter.release(handle):
            raise RuntimeError(f"uncontended release of {key!r} found the lock lost")


def round_trip(server: ZooKeeperEnsemble, n: int = 500) -> dict[str, float]:
    """A bare-socket ping and a bare-socket create+delete, in ms: the unit of it all."""
    sock = make_adapter("zk-socket", server.url)
    pings, writes = [], []
    for i in range(n):
        t0 = time.perf_counter_ns()
        sock.ping()
        pings.append((time.perf_counter_ns() - t0) / 1e6)
        if i % 5 == 0:
            t0 = time.perf_counter_ns()
            sock.release(sock.try_acquire("bench:i:rtt", TTL))
            writes.append((time.perf_counter_ns() - t0) / 1e6)
    sock.close()
    return {"ping_p50": percentile(pings, 50), "ping_p99": percentile(pings, 99),
            "cycle_p50": percentile(writes, 50), "cycle_p99": percentile(writes, 99)}


def uncontended(
    env: Env, packets: Packets, adapters: dict[str, Any], reps: int, errors: dict[str, str]
) -> dict[str, Any]:
    rate: dict[str, list[float]] = {lib: [] for lib in adapters}
    requests: dict[str, list[float]] = {lib: [] for lib in adapters}
    count = CYCLES // (4 if env.quick else 1)
    for rep in range(reps):
        # the libraries take turns slice by slice: a burst of machine (or disk) noise
        # hits them all alike
        elapsed = dict.fromkeys(adapters, 0.0)
        sent = dict.fromkeys(adapters, 0)
        done = dict.fromkeys(adapters, 0)
        for chunk in range(CHUNKS):
            for lib in rotate(list(adapters), rep + chunk):
                if lib in errors:
                    continue
                gc.collect()
                before = packets.read()
                t0 = time.perf_counter()
                try:
                    _cycles(adapters[lib], f"bench:i:a:{lib}", count)
                except Exception as exc:
                    errors[lib] = f"rep {rep}: {exc!r}"
                    continue
                elapsed[lib] += time.perf_counter() - t0
                sent[lib] += packets.delta(before, packets.read())[0]
                done[lib] += count
        for lib in adapters:
            if lib not in errors and done[lib]:
                rate[lib].append(done[lib] / elapsed[lib])
                requests[lib].append(sent[lib] / done[lib])
    ratio: dict[str, dict[str, list[float]]] = {}
    for floor in ("zk-raw", "zk-raw-line", "zk-socket"):
        ratio[floor] = {
            lib: [r / f for r, f in zip(rate[lib], rate.get(floor, []), strict=False)]
            for lib in adapters
        }
    ratio["kazoo"] = {"ours-zk": [r / k for r, k in zip(rate.get("ours-zk", []),
                                                        rate.get("kazoo", []), strict=False)]}
    return {"rate": rate, "requests_per_cycle": requests, "ratio": ratio}


def counted_pass(libs: list[str], counter: RequestCounter) -> dict[str, dict[str, float]]:
    """Requests per cycle by opcode: fresh clients through the counter, untimed."""
    out: dict[str, dict[str, float]] = {}
    for lib in libs:
        adapter = make_adapter(lib, counter.url)
        _cycles(adapter, f"bench:i:counted:{lib}", 20)  # parents, code paths
        counter.reset()
        _cycles(adapter, f"bench:i:counted:{lib}", COUNTED_CYCLES)
        counts = counter.snapshot()
        adapter.close()
        out[lib] = {k: v / COUNTED_CYCLES for k, v in counts.items()}
    return out


def contended(
    env: Env, packets: Packets, libs: list[str], reps: int, seconds: float, errors: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    pool = env.pool
    workers = list(range(min(8, len(pool))))
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for lib in libs:  # one unmeasured round: the blocking path warmed in every process
        start = time.monotonic_ns() + 300_000_000
        pool.run_all(workers, "benchmarks.scenario_handoff:contend", timeout=60, lib=lib,
                     key=f"bench:i:b:warm:{lib}", start_ns=start, end_ns=start + 500_000_000)
    for rep, lib in interleaved(libs, reps, skip=errors):
        start = time.monotonic_ns() + 300_000_000
        end = start + int(seconds * 1e9)
        before = packets.read()
        try:
            results = pool.run_all(
                workers, "benchmarks.scenario_handoff:contend", timeout=seconds + 60,
                lib=lib, key=f"bench:i:b:{lib}:{rep}", start_ns=start, end_ns=end,
            )
        except WorkerError as exc:
            errors[lib] = f"rep {rep}: {str(exc)[:300]}"
            continue
        sent, events = packets.delta(before, packets.read())
        result = scenario_handoff.analyse(results, start, end)
        order = scenario_etcd.analyse([r["events"] for r in results], start, end)
        acquisitions = sum(len(r["events"]) for r in results)
        result.update(
            fifo_share=order["fifo_share"], spread=order["spread"],
            requests_per_acq=sent / max(1, acquisitions),
            events_per_acq=events / max(1, acquisitions),
        )
        del result["handoffs_ms"]
        runs[lib].append(result)
    return runs


def contended_by_opcode(
    env: Env, counter: RequestCounter, libs: list[str], seconds: float
) -> dict[str, dict[str, float]]:
    """Requests per acquisition by opcode: one untimed contended run through the relay."""
    workers = list(range(min(8, len(env.pool))))
    out: dict[str, dict[str, float]] = {}
    for lib in libs:
        start = time.monotonic_ns() + 300_000_000
        counter.reset()
        results = env.pool.run_all(
            workers, "benchmarks.scenario_handoff:contend", timeout=seconds + 60,
            lib=lib + COUNTED, key=f"bench:i:b:counted:{lib}", start_ns=start,
            end_ns=start + int(seconds * 1e9),
        )
        counts = counter.snapshot()
        acquisitions = max(1, sum(len(r["events"]) for r in results))
        out[lib] = {k: v / acquisitions for k, v in counts.items()}
    return out


def idle(
    env: Env, packets: Packets, counter: RequestCounter,
    holders: dict[str, Any], reps: int, window: float, errors: dict[str, str],
) -> dict[str, list[dict[str, Any]]]:
    pool = env.pool
    waiters = list(range(WAITERS))
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in holders}
    for rep, lib in interleaved(list(holders), reps, skip=errors):
        # this library's waiters only: the relay then sees no other client's heartbeats
        _bind(env, waiters, {lib + COUNTED: [lib, counter.url]}, errors)
        key = f"bench:i:c:{lib}:{rep}"
        held = holders[lib].try_acquire(key, TTL)
        if held is None:
            errors[lib] = f"rep {rep}: the holder could not take the free key"
            _unbind(env, waiters, [lib + COUNTED])
            continue
        for i in waiters:
            pool.submit(i, "benchmarks.scenario_waiters:wait_once", lib=lib + COUNTED, key=key,
                        ttl=TTL, timeout=SETTLE_S + window + 20)
        time.sleep(SETTLE_S)  # every waiter reaches its watch
        counter.reset()
        before = packets.read()
        t0 = time.monotonic()
        time.sleep(window)
        requests, _events = packets.delta(before, packets.read())
        counts = counter.snapshot()
        elapsed = time.monotonic() - t0
        holders[lib].release(held)
        try:
            replies = [pool.result(i, SETTLE_S + window + 30) for i in waiters]
        except WorkerError as exc:
            errors[lib] = f"rep {rep}: {str(exc)[:300]}"
            continue
        finally:
            _unbind(env, waiters, [lib + COUNTED])
        runs[lib].append({
            "server_requests": requests, "window": elapsed,
            "waiter_requests": dict(counts), "lock_requests": lock_requests(counts),
            "served": sum(1 for r in replies if r["t_acq"] is not None),
        })
    return runs


# -- the scenario --------------------------------------------------------------------------


def run(env: Env, reps: int = 5) -> ScenarioResult:
    res = ScenarioResult("i", "(i) ZooKeeper: one server, beside kazoo's Lock")
    reps = env.reps(reps)
    seconds = 1.0 if env.quick else 3.0
    window = 1.0 if env.quick else 3.0
    errors: dict[str, str] = {}
    from celery_singleton_lock.testing import ZooKeeperEnsemble

    # The test servers' settings (tick 50 ms, a small JVM) but the server's default
    # durability: every write waits for its fsync, as etcd's in (h) does.
    server = ZooKeeperEnsemble(size=1, extra_config=["forceSync=yes"]).start()
    counter = RequestCounter(server.members[0].client_port)
    bound: list[str] = []
    adapters: dict[str, Any] = {}
    try:
        packets = Packets(server.members[0])
        server_version = server.members[0].metrics().get("zk_version", "?").split("-")[0]
        rtt = round_trip(server)
        for lib in LIBS:
            try:
                adapters[lib] = make_adapter(lib, server.url)
                _cycles(adapters[lib], f"bench:i:a:{lib}", 50)  # warm-up: session, code paths
            except Exception as exc:  # reported in the table, the others still run
                errors[lib] = f"{exc!r}"
                adapters.pop(lib, None)
        fast = uncontended(env, packets, adapters, reps, errors)
        by_opcode = counted_pass([lib for lib in adapters if lib not in errors], counter)
        # The pool's clients connect only now, so their heartbeats stay out of the counts
        # above; each phase binds the clients it needs and closes them after, so that the
        # relay sees only the sessions of the processes it measures.
        everyone = list(range(len(env.pool)))
        contenders = [lib for lib in CONTENDERS if lib in adapters and lib not in errors]
        direct = {lib: [lib, server.url] for lib in contenders}
        counted = {lib + COUNTED: [lib, counter.url] for lib in contenders}
        bound = [*direct, *counted]
        _bind(env, everyone, direct, errors)
        contenders = [lib for lib in contenders if lib not in errors]
        handoffs = contended(env, packets, contenders, env.reps(3), seconds, errors)
        _unbind(env, everyone, list(direct))
        _bind(env, everyone, counted, errors)
        contended_ops = contended_by_opcode(
            env, counter, [lib for lib in contenders if lib not in errors], 1.0)
        _unbind(env, everyone, list(counted))
        for lib in ("zk-socket", "zk-raw", "zk-raw-line"):  # fewer idle sessions on the server
            with contextlib.suppress(Exception):
                adapters.pop(lib).close()
        waiting = idle(env, packets, counter, {lib: adapters[lib] for lib in contenders},
                       env.reps(2), window, errors)
    finally:
        with contextlib.suppress(Exception):  # best effort before the server goes
            _unbind(env, list(range(len(env.pool))), bound)
        for adapter in adapters.values():
            with contextlib.suppress(Exception):
                adapter.close()
        counter.close()
        server.stop()

    versions = {**_versions(), "zookeeper": server_version}
    _tables(res, reps, seconds, window, rtt, fast, by_opcode, handoffs, contended_ops, waiting,
            errors, versions)
    res.raw = {
        "reps": reps, "seconds": seconds, "window": window, "round_trip_ms": rtt,
        "uncontended": fast, "requests_by_opcode_per_cycle": by_opcode, "contended": handoffs,
        "contended_requests_by_opcode_per_acq": contended_ops,
        "idle": waiting, "errors": errors, "versions": versions,
    }
    return res


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    try:
        out["kazoo"] = version("kazoo")
    except PackageNotFoundError:
        out["kazoo"] = "not installed"
    return out


def _tables(
    res: ScenarioResult, reps: int, seconds: float, window: float, rtt: dict[str, float],
    fast: dict[str, Any], by_opcode: dict[str, dict[str, float]],
    handoffs: dict[str, list[dict[str, Any]]], contended_ops: dict[str, dict[str, float]],
    waiting: dict[str, list[dict[str, Any]]], errors: dict[str, str], versions: dict[str, str],
) -> None:
    rate, ratio = fast["rate"], fast["ratio"]
    t1 = Table("(i1) ZooKeeper uncontended acquire+release, one process",
               ["library", "cycles/s", "min-max", "x raw kazoo", "x raw + line read", "x socket",
                "requests/cycle", "requests sent per cycle"])
    for lib in LIBS:
        if not rate.get(lib):
            t1.add(LABELS[lib], "not run", "", "", "", "", "", errors.get(lib, "")[:80])
            continue
        t1.add(LABELS[lib], fmt(median(rate[lib]), 0), spread(rate[lib]),
               fmt(median(ratio["zk-raw"][lib])), fmt(median(ratio["zk-raw-line"][lib])),
               fmt(median(ratio["zk-socket"][lib])),
               fmt(median(fast["requests_per_cycle"][lib])),
               fmt_cmds({k: round(v, 2) for k, v in by_opcode.get(lib, {}).items()}, limit=5))
    t1.notes += [
        f"{CHUNKS} slices of {CYCLES} cycles per library per repetition, libraries taking turns "
        f"(first one rotating), {reps} repetitions, after 50 warm-up cycles; ratios within a "
        "repetition, then the median.",
        f"unit: a bare-socket ping round trip p50 {rtt['ping_p50']:.3f} ms (p99 "
        f"{rtt['ping_p99']:.3f}); a bare-socket create+delete p50 {rtt['cycle_p50']:.3f} ms "
        f"(p99 {rtt['cycle_p99']:.3f}): every write waits for the transaction log's fsync.",
        "requests/cycle: the server's zk_packets_received delta per cycle (the mntr reads "
        "excluded); requests sent per cycle: by opcode, counted by a relay in an untimed pass "
        f"of {COUNTED_CYCLES} cycles.",
        f"peers: one KazooClient each (session timeout {KAZOO_SESSION_S:.0f} s, kazoo's "
        "default); kazoo's Lock is one object per lock path, acquired again and again as its "
        f"docs show; ours: connect(url), ttl {TTL:.0f} s. ZooKeeper {versions['zookeeper']} "
        f"(standalone, forceSync=yes), kazoo {versions['kazoo']}.",
    ]
    res.tables.append(t1)

    t2 = Table("(i2) ZooKeeper: 8 processes contending for one key",
               ["library", "wait", "handoff p50 ms", "p99 ms", "acq/s", "per process min/max",
                "strict rotation %", "same-process re-acquire %", "requests per acq",
                "by opcode", "watch events per acq", "overlaps"])
    for lib in CONTENDERS:
        rs = handoffs.get(lib, [])
        if not rs:
            t2.add(LABELS[lib], WAIT_STYLE[lib], "not run", "", "", "", "", "", "", "", "",
                   errors.get(lib, "")[:80])
            continue
        t2.add(
            LABELS[lib], WAIT_STYLE[lib], fmt(median([r["p50"] for r in rs]), 2),
            fmt(median([r["p99"] for r in rs]), 2), fmt(median([r["per_s"] for r in rs]), 0),
            f"{fmt(median([min(r['per_worker']) for r in rs]), 0)}/"
            f"{fmt(median([max(r['per_worker']) for r in rs]), 0)}",
            fmt(100 * median([r["fifo_share"] for r in rs]), 1),
            fmt(median([100 * r["same_worker"] / max(1, r["acquisitions"]) for r in rs]), 1),
            fmt(median([r["requests_per_acq"] for r in rs]), 2),
            fmt_cmds({k: round(v, 2) for k, v in contended_ops.get(lib, {}).items()}, limit=6),
            fmt(median([r["events_per_acq"] for r in rs]), 2),
            str(sum(r["overlaps"] for r in rs)),
        )
    t2.notes += [
        f"8 pool processes, {seconds:.0f} s per library per repetition, interleaved, after one "
        f"unmeasured round; the loop of (b): blocking acquire (ttl {scenario_handoff.TTL:.0f} s), "
        f"hold {scenario_handoff.HOLD_S * 1000:.0f} ms, release.",
        "handoff: the holder's release call to another process's acquire return (p50/p99 per "
        "repetition, then the median).",
        "strict rotation: share of steady-state acquisitions made by the process that held the "
        "lock 8 acquisitions earlier (strict FIFO with 8 always-queued processes gives 100 %).",
        "requests and watch events per acquisition: zk_packets_received and (packets sent - "
        "received) deltas over the run, per acquisition; 1 watch event means each release woke "
        "only the next waiter. by opcode: per acquisition, from one more (untimed) 1 s run "
        "through the request relay.",
    ]
    res.tables.append(t2)

    t3 = Table(f"(i3) ZooKeeper: {WAITERS} processes waiting on a held key",
               ["library", "server requests/s", "waiters' requests (window)",
                "lock requests by waiters", "served after release"])
    for lib in CONTENDERS:
        rs = waiting.get(lib, [])
        if not rs:
            t3.add(LABELS[lib], "not run", errors.get(lib, "")[:80], "", "")
            continue
        names = {k for r in rs for k in r["waiter_requests"]}
        per = {k: median([r["waiter_requests"].get(k, 0) for r in rs]) for k in names}
        t3.add(LABELS[lib], fmt(median([r["server_requests"] / r["window"] for r in rs]), 2),
               fmt_cmds({k: round(v, 1) for k, v in per.items()}),
               fmt(median([float(r["lock_requests"]) for r in rs]), 0),
               f"{min(r['served'] for r in rs)}/{WAITERS}")
    t3.notes += [
        f"the main process holds the key (ttl {TTL:.0f} s); {WAITERS} pool processes wait on it "
        f"through the request relay; {window:.0f} s window after {SETTLE_S} s settling, "
        "interleaved repetitions.",
        "server requests/s: zk_packets_received delta: every open session's, the holder's and "
        "the pool's idle clients' heartbeats included; "
        "waiters' requests: what the waiters sent in the window, by opcode. A ping is the "
        "session heartbeat (kazoo sends one after a third of the session timeout without "
        "traffic): it keeps the session, and so the lease, alive, and no waiting adds to it.",
    ]
    res.tables.append(t3)
    for lib, err in errors.items():
        t1.notes.append(f"{LABELS.get(lib, lib)}: {err[:300]}")
    _goals(res, fast, handoffs, waiting, errors)


def _goals(
    res: ScenarioResult, fast: dict[str, Any], handoffs: dict[str, list[dict[str, Any]]],
    waiting: dict[str, list[dict[str, Any]]], errors: dict[str, str],
) -> None:
    if not fast["rate"].get("ours-zk"):
        res.goals.append(Goal("i", "ZooKeeper uncontended ≥ 0.9 x raw kazoo loop",
                              errors.get("ours-zk", "not run")[:80], None))
        return
    raw = median(fast["ratio"]["zk-raw"]["ours-zk"])
    kazoo = median(fast["ratio"]["kazoo"]["ours-zk"])
    res.goals += [
        Goal("i", "ZooKeeper uncontended ≥ 0.9 x raw kazoo loop", f"{raw:.2f} x raw", raw >= 0.9),
        Goal("i", "ZooKeeper uncontended ahead of kazoo's Lock", f"{kazoo:.2f} x kazoo Lock",
             kazoo > 1.0),
    ]
    ours = handoffs.get("ours-zk", [])
    if ours:
        p50, p99 = median([r["p50"] for r in ours]), median([r["p99"] for r in ours])
        fifo = median([r["fifo_share"] for r in ours])
        spread_ = max(r["spread"] for r in ours)
        events = median([r["events_per_acq"] for r in ours])
        overlaps = sum(r["overlaps"] for r in ours)
        res.goals += [
            Goal("i", "ZooKeeper handoff p50 ≤ 3 ms", f"{p50:.2f} ms", p50 <= 3.0),
            Goal("i", "ZooKeeper handoff p99 ≤ 10 ms", f"{p99:.2f} ms", p99 <= 10.0),
            Goal("i", "ZooKeeper FIFO order (strict rotation)", f"{100 * fifo:.1f} %",
                 fifo >= 0.99),
            Goal("i", "ZooKeeper acquisitions per process equal ±2", f"max-min {spread_}",
                 spread_ <= 4),
            Goal("i", "ZooKeeper one waiter woken per release", f"{events:.2f} watch events/acq",
                 events <= 1.05),
            Goal("i", "ZooKeeper mutual exclusion (overlaps = 0)", str(overlaps), overlaps == 0),
        ]
    idle_ = waiting.get("ours-zk", [])
    if idle_:
        lock = median([float(r["lock_requests"]) for r in idle_])
        pings = median([float(r["waiter_requests"].get("ping", 0)) for r in idle_])
        res.goals.append(Goal("i", "ZooKeeper idle waiters 0 requests",
                              f"{lock:.0f} lock requests, {pings:.0f} session pings in the window",
                              lock == 0))
