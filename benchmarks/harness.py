"""The small shared harness: statistics, server counters, a worker pool, result tables.

Everything here talks only to redis-server processes this suite starts itself on
127.0.0.1 (see :class:`celery_singleton_lock.testing.RedisServer`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import multiprocessing
import os
import statistics
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

# -- statistics ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table: NaN and None become an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def spread(values: list[float], digits: int = 0) -> str:
    """``min-max`` of the repetitions, for a table."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return "-"
    return f"{fmt(min(clean), digits)}-{fmt(max(clean), digits)}"


def rotate(items: list[Any], rep: int) -> list[Any]:
    """Round-robin order for repetition ``rep``: each item goes first in turn."""
    if not items:
        return []
    k = rep % len(items)
    return items[k:] + items[:k]


def interleaved(items: list[Any], reps: int, *, skip: Any = ()) -> Iterator[tuple[int, Any]]:
    """``(rep, item)`` for every repetition, items round-robin (see :func:`rotate`),
    leaving out those in ``skip`` (the ones that failed to prepare)."""
    for rep in range(reps):
        for item in rotate(items, rep):
            if item not in skip:
                yield rep, item


def sleep_until_ns(deadline_ns: int) -> None:
    """Sleep until ``time.monotonic_ns()`` reaches ``deadline_ns`` (start barrier)."""
    while True:
        left = deadline_ns - time.monotonic_ns()
        if left <= 0:
            return
        time.sleep(min(left / 1e9, 0.05))


# -- server counters ----------------------------------------------------------------------


@dataclass
class StatsSnapshot:
    total: int
    cmdstats: dict[str, int]


class ServerStats:
    """``INFO stats`` + ``INFO commandstats`` of one server, read in ONE command.

    ``total_commands_processed`` counts every command the server executed, including
    the commands a Lua script runs; the INFO of the first snapshot is subtracted.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def snapshot(self) -> StatsSnapshot:
        info = self.client.info("stats", "commandstats")
        cmds = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in info.items()
            if k.startswith("cmdstat_")
        }
        return StatsSnapshot(int(info["total_commands_processed"]), cmds)

    @staticmethod
    def delta(a: StatsSnapshot, b: StatsSnapshot) -> tuple[int, dict[str, int]]:
        """Commands between two snapshots, without the first snapshot's own INFO."""
        per = {k: b.cmdstats.get(k, 0) - a.cmdstats.get(k, 0) for k in b.cmdstats}
        per["info"] = per.get("info", 0) - 1
        per = {k: v for k, v in per.items() if v}
        return b.total - a.total - 1, per


def fmt_cmds(per: dict[str, int], scale: float = 1.0, limit: int = 4) -> str:
    """``evalsha 3, set 3`` (most frequent first), optionally divided by ``scale``."""
    items = sorted(per.items(), key=lambda kv: -kv[1])[:limit]
    if not items:
        return "none"
    if scale == 1.0:
        return ", ".join(f"{k} {v}" for k, v in items)
    return ", ".join(f"{k} {v / scale:.2f}" for k, v in items)


class CommandMonitor:
    """Records the commands clients send (MONITOR), to count round trips exactly.

    MONITOR marks the commands a Lua script runs with ``[lua]``; those are kept apart,
    so ``client_commands`` is the number of round trips the clients made. It slows the
    server a little: use it in passes that are not timed.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        # the stop sentinel goes through a connection made before MONITOR starts, so its
        # handshake (HELLO) is not recorded as a command of the code under test
        self.stopper = redis.Redis.from_url(url)
        self.entries: list[dict[str, Any]] = []
        self._sentinel = f"bench-monitor-stop-{uuid.uuid4().hex}"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> CommandMonitor:
        self.stopper.ping()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("MONITOR did not start")
        return self

    def _run(self) -> None:
        try:
            with self.client.monitor() as mon:
                self._ready.set()
                for entry in mon.listen():
                    if entry is None:
                        continue
                    if self._sentinel in entry["command"]:
                        return
                    self.entries.append(entry)
        except BaseException as exc:  # reported by __exit__
            self._error = exc
            self._ready.set()

    def __exit__(self, *exc: object) -> None:
        self.stopper.echo(self._sentinel)
        assert self._thread is not None
        self._thread.join(30)
        self.client.close()
        self.stopper.close()
        if self._error is not None:
            raise RuntimeError(f"MONITOR failed: {self._error!r}")

    @property
    def client_entries(self) -> list[dict[str, Any]]:
        """Commands sent by clients, not the ones their scripts ran."""
        return [e for e in self.entries if e["client_type"] != "lua"]

    def client_commands(self) -> Counter[str]:
        """Round trips by command name (first word, lower case)."""
        return Counter(e["command"].split(" ", 1)[0].lower() for e in self.client_entries)


# -- a pool of persistent worker processes --------------------------------------------------


class WorkerContext:
    """What a pool worker keeps between calls: its index, the server URL, adapters."""

    def __init__(self, index: int, url: str) -> None:
        self.index = index
        self.url = url
        self._adapters: dict[str, Any] = {}

    def adapter(self, lib: str) -> Any:
        if lib not in self._adapters:
            from benchmarks.libs import make_adapter

            self._adapters[lib] = make_adapter(lib, self.url)
        return self._adapters[lib]

    def close(self) -> None:
        for adapter in self._adapters.values():
            with contextlib.suppress(Exception):  # closing at exit: nothing useful to do
                adapter.close()


def prepare_libs(ctx: WorkerContext, libs: list[str]) -> dict[str, str | None]:
    """Set up each library in this worker and warm it up on a private key."""
    from benchmarks.libs import Unavailable

    out: dict[str, str | None] = {}
    for lib in libs:
        try:
            ad = ctx.adapter(lib)
            for _ in range(20):
                handle = ad.try_acquire(f"bench:warm:{lib}:{ctx.index}", 10.0)
                if handle is not None:
                    ad.release(handle)
            out[lib] = None
        except Unavailable as exc:
            out[lib] = f"unavailable: {exc}"
        except Exception as exc:
            out[lib] = f"warm-up failed: {exc!r}"
    return out


def bind(ctx: WorkerContext, adapters: dict[str, list[str]], ttl: float = 10.0) -> dict[str, str]:
    """Give this worker ``adapters`` ({name: [lib, url]}), each warmed up on a private
    key, so that functions run here later find them by name (:meth:`WorkerContext.adapter`),
    whatever server they are on; {lib: why it cannot run}."""
    from benchmarks.libs import make_adapter

    problems: dict[str, str] = {}
    for name, (lib, url) in adapters.items():
        try:
            ctx._adapters[name] = make_adapter(lib, url)
            handle = ctx._adapters[name].try_acquire(f"bench:warm:{name}:{ctx.index}", ttl)
            ctx._adapters[name].release(handle)
        except Exception as exc:  # reported in the table, the other libraries still run
            problems[lib] = repr(exc)
    return problems


def unbind(ctx: WorkerContext, names: list[str]) -> None:
    """Close this worker's adapters ``names`` before their server goes away (a kazoo
    client would otherwise keep reconnecting in the background)."""
    for name in names:
        adapter = ctx._adapters.pop(name, None)
        if adapter is not None:
            with contextlib.suppress(Exception):  # the server may be gone: nothing to do
                adapter.close()


def _pool_worker_main(conn: Any, url: str, index: int) -> None:
    ctx = WorkerContext(index, url)
    try:
        while True:
            msg = conn.recv()
            if msg.get("op") == "exit":
                return
            try:
                module, func = msg["fn"].split(":")
                result = getattr(importlib.import_module(module), func)(ctx, **msg["kwargs"])
                conn.send({"ok": True, "result": result})
            except BaseException as exc:
                conn.send({"ok": False, "error": f"{exc!r}", "trace": traceback.format_exc()})
    finally:
        ctx.close()


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """N spawned processes that each run ``module:function(ctx, **kwargs)`` on request.

    Started once and reused by the scenarios that need several processes, so process
    start-up and imports never fall inside a measurement.
    """

    def __init__(self, size: int, url: str) -> None:
        self.url = url
        self.mp = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for i in range(size):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(
            target=_pool_worker_main, args=(child, self.url, i), daemon=True,
            name=f"bench-worker-{i}",
        )
        proc.start()
        child.close()
        if i < len(self.procs):
            self.procs[i], self.conns[i] = proc, parent
        else:
            self.procs.append(proc)
            self.conns.append(parent)

    def __len__(self) -> int:
        return len(self.procs)

    def submit(self, i: int, fn: str, **kwargs: Any) -> None:
        self.conns[i].send({"fn": fn, "kwargs": kwargs})

    def result(self, i: int, timeout: float) -> Any:
        """The reply of worker ``i``; a worker that does not answer in time is replaced."""
        if not self.conns[i].poll(timeout):
            self.restart(i)
            raise WorkerError(f"worker {i} gave no answer within {timeout:.0f}s (restarted)")
        reply = self.conns[i].recv()
        if not reply["ok"]:
            raise WorkerError(f"worker {i}: {reply['error']}\n{reply['trace']}")
        return reply["result"]

    def run_all(self, indices: list[int], fn: str, timeout: float, **kwargs: Any) -> list[Any]:
        for i in indices:
            self.submit(i, fn, **kwargs)
        results, errors = [], []
        deadline = time.monotonic() + timeout
        for i in indices:
            try:
                results.append(self.result(i, max(0.1, deadline - time.monotonic())))
            except WorkerError as exc:
                errors.append(str(exc))
        if errors:
            raise WorkerError("; ".join(errors))
        return results

    def prepare(self, indices: list[int], libs: list[str]) -> dict[str, str]:
        """Import and warm up ``libs`` in those workers; {lib: why it cannot run}."""
        replies = self.run_all(indices, "benchmarks.harness:prepare_libs", timeout=180, libs=libs)
        errors: dict[str, str] = {}
        for lib in libs:
            problems = sorted({r[lib] for r in replies if r[lib]})
            if problems:
                errors[lib] = problems[0]
        return errors

    def restart(self, i: int) -> None:
        proc = self.procs[i]
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        self.conns[i].close()
        self._spawn(i)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send({"op": "exit"})
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# -- results ---------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        line = "  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True))
        out = [self.title, "=" * len(self.title), line, "-" * len(line)]
        out += [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in self.rows
        ]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join("---" for _ in self.columns) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)


@dataclass
class Goal:
    scenario: str
    text: str
    measured: str
    passed: bool | None  # None: could not be measured

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "N/A"}[self.passed]


@dataclass
class ScenarioResult:
    key: str
    title: str
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


# -- uncontended cycles ---------------------------------------------------------------------

#: Per backend, one figure per repetition.
Rates = dict[str, list[float]]


def uncontended_cycles(backend: Any, key: str, n: int, ttl: float) -> None:
    """``n`` acquire + release cycles of ``key`` that nobody else takes."""
    for _ in range(n):
        held = backend.acquire(key, ttl)
        if held is None:
            raise RuntimeError(f"uncontended acquire of {key!r} failed")
        backend.release(held)


def race_cycles(
    backends: dict[str, Any], reps: int, *, key: Callable[[str], str], cycles: int, chunks: int, ttl: float
) -> tuple[Rates, Rates]:
    """``backends`` (by name) taking turns in ``chunks`` slices of ``cycles`` uncontended
    cycles each (of ``key(name)``), for ``reps`` repetitions, after a warm-up
    (connections, scripts): per repetition, each one's cycles/s and this process's CPU
    µs per cycle (what the client code costs, which the load of a shared machine
    disturbs far less than the wall clock)."""
    rate: Rates = {name: [] for name in backends}
    cpu_us: Rates = {name: [] for name in backends}
    for name, backend in backends.items():
        uncontended_cycles(backend, key(name), 100, ttl)
    for rep in range(reps):
        elapsed = dict.fromkeys(backends, 0.0)
        cpu = dict.fromkeys(backends, 0.0)
        done = dict.fromkeys(backends, 0)
        for chunk in range(chunks):
            for name in rotate(list(backends), rep + chunk):
                gc.collect()
                started, cpu_started = time.perf_counter(), time.process_time()
                uncontended_cycles(backends[name], key(name), cycles, ttl)
                elapsed[name] += time.perf_counter() - started
                cpu[name] += time.process_time() - cpu_started
                done[name] += cycles
        for name in backends:
            rate[name].append(done[name] / elapsed[name])
            cpu_us[name].append(cpu[name] / done[name] * 1e6)
    return rate, cpu_us


def cycle_table(title: str, labels: dict[str, str], rate: Rates, cpu_us: Rates, reference: str) -> Table:
    """One row per backend of ``labels`` (in its order): cycles/s, its spread, the ratio
    to ``reference`` within each repetition (the median of them), µs and CPU µs per cycle."""
    table = Table(
        title,
        ["backend", "cycles/s (median)", "min-max", "x one Redis", "µs per cycle",
         "client CPU µs/cycle"],
    )
    for name, label in labels.items():
        ratios = [a / b for a, b in zip(rate[name], rate[reference], strict=True)]
        table.add(
            label, fmt(median(rate[name]), 0), spread(rate[name]), fmt(median(ratios)),
            fmt(1e6 / median(rate[name]), 1), fmt(median(cpu_us[name]), 1),
        )
    return table


def goal_table(results: list[ScenarioResult]) -> Table:
    table = Table("Goals (celery-singleton-lock)", ["scenario", "goal", "measured", "verdict"])
    for res in results:
        for g in res.goals:
            table.add(g.scenario, g.text, g.measured, g.verdict)
    return table


def machine_note() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average at start {load[0]:.2f}"
