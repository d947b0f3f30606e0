"""(f) 1,000 no-op tasks through a real ``celery worker``: SingletonTask vs a plain task.

One worker (``-P prefork -c 2``, no gossip/mingle/heartbeat) runs on a redis-server of
its own that is broker, lock backend and counter store. For each run the worker's
processes are paused (SIGSTOP to the worker's own process group), the 1,000 calls
(distinct arguments, so no two contend) are published to its queue, and the clock
starts when the worker is resumed (SIGCONT); it stops when BLPOP returns the done signal
pushed by the task that completes the count. So only the worker's draining of a full
queue is timed, the publisher does not compete for the CPU, and nothing polls.
(``add_consumer`` on a pre-filled queue was tried first: kombu's Redis transport then
served about 60 tasks/s, so it would have measured the transport, not the tasks.)
Variants alternate, the first one changing each repetition.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from benchmarks.env import Env
from benchmarks.harness import (
    Goal,
    ScenarioResult,
    ServerStats,
    Table,
    fmt,
    interleaved,
    median,
    spread,
)

VARIANTS = ["plain", "singleton"]
TASK_NAMES = {"plain": "bench.noop_plain", "singleton": "bench.noop_singleton"}
LABELS = {"plain": "plain @app.task", "singleton": "@app.task(base=SingletonTask)"}
REPO = Path(__file__).resolve().parent.parent
QUEUE = "bench.f"
#: Goals of issue 14: throughput beside a plain task, and server commands per task.
RATIO_GOAL = 0.95
CMDS_GOAL = 14


class Worker:
    """A ``celery worker`` subprocess of our own, stopped by its PID."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.log = tempfile.NamedTemporaryFile(prefix="bench-celery-", suffix=".log")  # noqa: SIM115
        env = {**os.environ, "BENCH_REDIS_URL": url,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.worker_app", "worker",
             "-P", "prefork", "-c", "2", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-Q", QUEUE, "--loglevel", "WARNING",
             "-n", "bench-f@%h"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: pause/resume reach only it
        )

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by ``root`` and by its live children: the
    worker's main process, and its pool processes."""
    main = pool = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
        used = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
        if int(entry.name) == root:
            main += used
        elif int(fields[1]) == root:
            pool += used
    return main, pool


def server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def one_run(
    app: Any, client: redis.Redis, worker: Worker, variant: str, n: int
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:12]
    task = app.tasks[TASK_NAMES[variant]]
    stats = ServerStats(client)
    worker.pause()
    try:
        t_pub = time.monotonic()
        with app.producer_or_acquire() as producer:
            for i in range(n):
                task.apply_async(args=(i, run_id, n), queue=QUEUE, producer=producer)
        publish_s = time.monotonic() - t_pub
        time.sleep(0.05)
        s0 = stats.snapshot()
        cpu0, server0 = process_tree_cpu(worker.proc.pid), server_cpu(client)
    finally:
        t0 = time.monotonic()
        worker.resume()
    done = client.blpop([f"bench:f:done:{run_id}"], timeout=120)
    t1 = time.monotonic()
    if done is None:
        count = client.get(f"bench:f:count:{run_id}")
        raise RuntimeError(f"only {count!r} of {n} {variant} tasks ran within 120 s")
    main1, pool1 = process_tree_cpu(worker.proc.pid)
    redis_cpu = server_cpu(client) - server0
    total, per = stats.delta(s0, stats.snapshot())
    return {"tasks_per_s": n / (t1 - t0), "seconds": t1 - t0, "publish_s": publish_s,
            "server_cmds_per_task": total / n, "evalsha_per_task": per.get("evalsha", 0) / n,
            "main_cpu_us_per_task": (main1 - cpu0[0]) / n * 1e6,
            "pool_cpu_us_per_task": (pool1 - cpu0[1]) / n * 1e6,
            "server_cpu_us_per_task": redis_cpu / n * 1e6}


def run(env: Env, reps: int = 5, n: int = 1000, warmup: int = 200) -> ScenarioResult:
    from celery_singleton_lock.testing import RedisServer

    res = ScenarioResult("f", "(f) No-op tasks through a real celery worker")
    reps = env.reps(reps)
    n = 200 if env.quick else n
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    errors: dict[str, str] = {}
    with RedisServer() as broker:
        url = broker.url + "/0"
        os.environ["BENCH_REDIS_URL"] = url
        worker_app = importlib.import_module("benchmarks.worker_app")
        if url != worker_app.URL:  # imported before with another URL: read it again
            worker_app = importlib.reload(worker_app)
        app = worker_app.app
        variants = [v for v in VARIANTS if TASK_NAMES[v] in app.tasks]
        if "singleton" not in variants:
            errors["singleton"] = "celery_singleton_lock.SingletonTask is not importable"
        client = redis.Redis.from_url(url)
        worker = Worker(url)
        try:
            if client.blpop([worker_app.READY_LIST], timeout=60) is None:
                raise RuntimeError(f"the celery worker did not start:\n{worker.tail()}")
            for v in variants:
                one_run(app, client, worker, v, warmup)
            for rep, v in interleaved(variants, reps, skip=errors):
                try:
                    runs[v].append(one_run(app, client, worker, v, n))
                except Exception as exc:
                    errors[v] = f"rep {rep}: {exc!r}"[:300] + "\n" + worker.tail()[-800:]
        finally:
            worker.stop()
            client.close()
            app.close()

    table = Table(res.title, ["task", "tasks/s (median)", "min-max", "x plain",
                              "CPU µs/task: worker main + pool", "redis CPU µs/task",
                              "server cmds/task", "EVALSHA/task", "publish s (not timed)"])
    ratios = [s["tasks_per_s"] / p["tasks_per_s"]
              for p, s in zip(runs["plain"], runs["singleton"], strict=False)]
    for v in VARIANTS:
        rs = runs[v]
        if not rs:
            table.add(LABELS[v], "ERROR", errors.get(v, "")[:80], "", "", "", "", "", "")
            continue
        rates = [r["tasks_per_s"] for r in rs]
        table.add(LABELS[v], fmt(median(rates), 0), spread(rates),
                  "1.00" if v == "plain" else fmt(median(ratios)),
                  f'{fmt(median([r["main_cpu_us_per_task"] for r in rs]), 0)} + '
                  f'{fmt(median([r["pool_cpu_us_per_task"] for r in rs]), 0)}',
                  fmt(median([r["server_cpu_us_per_task"] for r in rs]), 0),
                  fmt(median([r["server_cmds_per_task"] for r in rs])),
                  fmt(median([r["evalsha_per_task"] for r in rs])),
                  fmt(median([r["publish_s"] for r in rs])))
    table.notes += [
        f"{n} no-op tasks with distinct arguments per run, {reps} runs per variant, "
        f"alternating; {warmup} warm-up tasks each first. Worker: -P prefork -c 2, "
        "--without-gossip --without-mingle --without-heartbeat, Redis broker; results ignored.",
        "Timed from resuming the paused worker (its queue pre-filled) to BLPOP of the done "
        "signal; publish s: the time to publish the calls meanwhile, not part of tasks/s.",
        "x plain: median over repetitions of (singleton / plain of the same repetition).",
        "server cmds/task, EVALSHA/task: broker-server counters over the timed part "
        "(broker traffic, the task's INCR, lock scripts and their inner commands).",
        "CPU: user+system time over the timed part, per task (/proc, 10 ms ticks): the "
        "worker's main process (broker traffic, dispatch) + its two pool processes together "
        "(the task bodies and the lock); redis CPU: the server's (INFO cpu).",
    ]
    for v, err in errors.items():
        table.notes.append(f"{LABELS[v]}: {err.splitlines()[0]}")
    res.tables.append(table)
    goal_text = f"SingletonTask tasks/s ≥ {RATIO_GOAL} x plain task"
    cmds_text = f"SingletonTask ≤ {CMDS_GOAL} server commands per task"
    if ratios:
        ratio = median(ratios)
        res.goals.append(Goal("f", goal_text, f"{ratio:.3f} x plain", ratio >= RATIO_GOAL))
        cmds = median([r["server_cmds_per_task"] for r in runs["singleton"]])
        plain = median([r["server_cmds_per_task"] for r in runs["plain"]])
        res.goals.append(Goal("f", cmds_text, f"{cmds:.1f} (plain {plain:.1f})", cmds <= CMDS_GOAL))
    else:
        why = errors.get("singleton", "")[:80]
        res.goals.append(Goal("f", goal_text, why, None))
        res.goals.append(Goal("f", cmds_text, why, None))
    res.raw = {"n": n, "reps": reps, "runs": runs, "ratios": ratios, "errors": errors}
    return res
