"""Duplicate jobs, one at a time: what each contention policy does with a burst of copies.

Run it from the repository root (``make demo`` does exactly this)::

    .venv/bin/python examples/duplicate_jobs.py

It starts a throw-away ``redis-server`` (or uses ``REDIS_URL`` when set) and one real
Celery worker with four processes, then fires a burst of identical calls: 8 copies for
each of 3 keys, for each policy in ``demo_tasks.py`` (skip, retry, wait, raise). Each
task body sleeps ~0.4 s and records in Redis how many bodies run at once for its key.

The table shows what happened to the copies. The column that matters is *max per key*:
however many duplicates arrive together, it must be 1. The demo exits non-zero when it
is not, when a burst does not finish in time, or when the counts do not add up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from celery_singleton_lock.testing import RedisServer

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent

KEYS = ("report-eu", "report-us", "report-asia")
COPIES = 8  # identical calls per key, per policy
BURST_TIMEOUT = 15.0  # seconds for one policy's burst to finish before we call it hung
WORKER_START_TIMEOUT = 20.0
WORKER_STOP_GRACE = 5.0  # warm shutdown (SIGTERM) gets this long, then SIGKILL

WHAT_HAPPENS = {
    "skip": "copies that find the lock taken finish at once (SUCCESS, result None)",
    "retry": "copies that find the lock taken retry later: all run, one at a time",
    "wait": "copies that find the lock taken block until it is free: all run, one at a time",
    "raise": "copies that find the lock taken fail with LockContended",
}


class DemoError(Exception):
    """Something in the set-up went wrong (the worker did not start, or died)."""


# --- the worker ----------------------------------------------------------------------------

class Worker:
    """One ``celery worker`` subprocess, always stopped by its PID: TERM, then KILL."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Worker:
        # The worker imports demo_tasks (in examples/) and the library (in the repo root).
        pythonpath = [str(EXAMPLES), str(REPO), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, pythonpath)))
        command = [
            sys.executable, "-m", "celery", "-A", "demo_tasks", "worker",
            "-n", self.name,
            "-P", "prefork", "-c", "4",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, not the worker: we stop it
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            msg = f"the worker exited with code {self.process.returncode}"
            raise DemoError(msg)

    def wait_until_ready(self, app) -> float:
        """Ping the worker until it answers; return how long that took."""
        started = time.monotonic()
        while time.monotonic() - started < WORKER_START_TIMEOUT:
            self.check_alive()
            if app.control.ping(destination=[self.name], timeout=0.5):
                return time.monotonic() - started
        msg = f"the worker did not answer a ping within {WORKER_START_TIMEOUT:.0f} s"
        raise DemoError(msg)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            process.terminate()  # warm shutdown: running tasks may finish
            process.wait(timeout=WORKER_STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if process.poll() is None:
                # The worker leads its own process group: this takes its pool children too.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# --- one burst per policy ------------------------------------------------------------------

@dataclass
class Row:
    policy: str
    submitted: int
    executed: int = 0
    skipped: int = 0
    retried: int = 0
    waited: int = 0
    failed: int = 0
    max_per_key: int = 0
    wall: float = 0.0
    hung: bool = False
    errors: Counter[str] = field(default_factory=Counter)

    def problems(self) -> list[str]:
        found = []
        if self.max_per_key > 1:
            found.append(f"{self.max_per_key} copies ran at once for one key")
        if self.hung:
            found.append(f"the burst had not finished after {BURST_TIMEOUT:.0f} s")
        elif self.executed + self.skipped + self.failed != self.submitted:
            found.append("executed + skipped + failed != submitted")
        return found


def run_burst(demo_tasks, worker: Worker, policy: str) -> Row:
    """Send COPIES identical calls per key, all at once, and wait for every one."""
    task = demo_tasks.TASKS[policy]
    started = time.monotonic()
    ids = [task.delay(key).id for _ in range(COPIES) for key in KEYS]
    # Poll fresh result objects rather than keep delay()'s: those listen for their task's
    # end on the server, and one still listening after Ctrl-C (when the server is gone)
    # would spend ~20 s reconnecting to stop.
    results = [demo_tasks.app.AsyncResult(task_id) for task_id in ids]
    row = Row(policy, submitted=len(results))
    row.hung = not wait_for_all(results, worker, deadline=started + BURST_TIMEOUT)
    row.wall = time.monotonic() - started
    for result in results:
        if result.state == "FAILURE":
            row.failed += 1
            row.errors[type(result.result).__name__] += 1

    stats = demo_tasks.score.hgetall(demo_tasks.score_key(policy))
    for name in ("executed", "skipped", "retried", "waited"):
        setattr(row, name, int(stats.get(name.encode(), 0)))
    row.max_per_key = int(stats.get(b"max_concurrent", 0))
    return row


def wait_for_all(results, worker: Worker, deadline: float) -> bool:
    """Poll until every call has finished; False if some had not by ``deadline``."""
    pending = list(results)
    while True:
        worker.check_alive()
        pending = [result for result in pending if not result.ready()]
        if not pending:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# --- the report --------------------------------------------------------------------------

def print_table(rows: list[Row]) -> None:
    print()
    print(f"{'policy':<8}{'submitted':>10}{'executed':>10}{'skipped':>9}{'retries':>9}"
          f"{'waited':>8}{'failed':>8}{'max per key':>13}{'wall time':>11}")
    for r in rows:
        status = "; ".join(r.problems()) or "ok"
        print(f"{r.policy:<8}{r.submitted:>10}{r.executed:>10}{r.skipped:>9}{r.retried:>9}"
              f"{r.waited:>8}{r.failed:>8}{r.max_per_key:>13}{r.wall:>9.1f} s   {status}")
    print()
    for r in rows:
        errors = ", ".join(f"{n} x {name}" for name, n in r.errors.items())
        print(f"  {r.policy:<6} {WHAT_HAPPENS[r.policy]}" + (f"  [{errors}]" if errors else ""))
    print()


# --- main ----------------------------------------------------------------------------------

def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up like Ctrl-C
    log_dir = Path(tempfile.mkdtemp(prefix="csl-demo-"))
    worker_log = log_dir / "worker.log"
    run_id = uuid.uuid4().hex[:8]
    rows: list[Row] = []
    failure = None  # or why the demo stopped early
    try:
        with contextlib.ExitStack() as stack:  # on the way out: stop the worker, then Redis
            redis_url = users_redis = os.environ.get("REDIS_URL")
            if users_redis:
                print(f"using Redis at {redis_url}")
            else:
                redis_url = stack.enter_context(RedisServer()).url
                print(f"started redis-server at {redis_url}")

            # demo_tasks reads these when imported, here and in the worker.
            os.environ["DEMO_REDIS_URL"] = redis_url
            os.environ["DEMO_RUN_ID"] = run_id
            import demo_tasks  # here, not at the top: it reads the two variables above

            if users_redis:  # not our own server: tidy up after ourselves
                stack.callback(delete_keys, demo_tasks.score, demo_tasks.score_key("*"))
            worker = stack.enter_context(Worker(f"csl-demo-{run_id}@localhost", worker_log))
            took = worker.wait_until_ready(demo_tasks.app)
            print(f"worker ready after {took:.1f} s (4 processes); "
                  f"{COPIES} copies x {len(KEYS)} keys per policy, "
                  f"{demo_tasks.WORK_SECONDS} s of work each")

            for policy in demo_tasks.TASKS:
                rows.append(run_burst(demo_tasks, worker, policy))
                if rows[-1].hung:
                    break  # stuck tasks hold worker processes: the next burst would not be fair
    except DemoError as error:
        failure = f"demo failed: {error}"
    except KeyboardInterrupt:
        failure = "interrupted"

    if rows:
        print_table(rows)
    if failure is None and len(rows) == len(WHAT_HAPPENS) and not any(r.problems() for r in rows):
        shutil.rmtree(log_dir, ignore_errors=True)
        print("OK: never more than one copy of a task ran at once for the same key")
        return 0
    if failure is not None:
        print(f"{failure}: worker and server stopped", file=sys.stderr)
    print(f"FAILED (worker log kept at {worker_log})", file=sys.stderr)
    return 130 if failure == "interrupted" else 1


def delete_keys(client, pattern: str) -> None:
    """Remove this run's counters."""
    with contextlib.suppress(Exception):
        keys = list(client.scan_iter(match=pattern))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    sys.exit(main())
