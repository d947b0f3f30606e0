"""Duplicate jobs, one at a time: what each contention policy does with a burst of copies.

Run it from the repository root (``make demo`` does exactly this)::

    .venv/bin/python examples/duplicate_jobs.py                  # no server at all
    .venv/bin/python examples/duplicate_jobs.py --backend redis  # or etcd, zookeeper, postgres

It starts one real Celery worker with four processes on kombu's ``filesystem://`` broker
(messages and results are files in a temporary directory), then fires a burst of identical
calls: 8 copies for each of 3 keys, for each policy in ``demo_tasks.py`` (skip, retry,
wait, raise). Each task body sleeps ~0.4 s and records in a SQLite file how many bodies
run at once for its key.

The locks: by default the app sets no ``singleton_lock_backend``, and a broker that
serves one host makes ``file://`` (kernel file locks, docs/file.md) the default, so the
demo needs no server. ``--backend redis|etcd|zookeeper|postgres`` runs the same table with
the locks on a throw-away server of that kind (its binary must be installed; ``make
servers`` installs them on Debian).

The table shows what happened to the copies. The column that matters is *max per key*:
however many duplicates arrive together, it must be 1. The demo exits non-zero when it
is not, when a burst does not finish in time, or when the counts do not add up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from celery_singleton_lock import testing
from celery_singleton_lock.backends import registered_schemes

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent

KEYS = ("report-eu", "report-us", "report-asia")
COPIES = 8  # identical calls per key, per policy
BURST_TIMEOUT = 15.0  # seconds for one policy's burst to finish before we call it hung
WORKER_START_TIMEOUT = 20.0
# Warm shutdown (SIGTERM) gets this long, then SIGKILL: Celery's loop on the filesystem
# transport takes ~5 s to stop, and nothing runs any more when the demo stops it (a killed
# holder's file locks are freed by the kernel anyway).
WORKER_STOP_GRACE = 3.0
BACKENDS = ("file", "redis", "etcd", "zookeeper", "postgres")

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

    stats = demo_tasks.stats(policy)
    for name in ("executed", "skipped", "retried", "waited"):
        setattr(row, name, stats.get(name, 0))
    row.max_per_key = stats.get("max_concurrent", 0)
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


# --- the lock server ----------------------------------------------------------------------

@contextlib.contextmanager
def lock_server(backend: str) -> Iterator[str | None]:
    """A throw-away server for ``backend``, as the URL of its locks (None: file://, the
    default, needs none).

    :raises DemoError: when the server cannot be had (its binary missing, say).
    """
    if backend == "file":
        yield None
        return
    if backend == "postgres":
        with postgres_server() as url:
            yield url
        return
    servers: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
        "redis": testing.RedisServer,
        "etcd": testing.EtcdCluster,
        "zookeeper": testing.ZooKeeperEnsemble,
    }
    try:
        with servers[backend]() as server:
            url = server.url  # type: ignore[attr-defined]
            yield url + "/0" if backend == "redis" else url
    except (OSError, RuntimeError, TimeoutError) as error:
        msg = f"cannot start a {backend} server for the locks ({error}); `make servers` installs it"
        raise DemoError(msg) from error


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """``CSL_POSTGRES_URL``, or a PostgreSQL server of our own."""
    if "postgresql" not in registered_schemes() or not hasattr(testing, "PostgresServer"):
        msg = "BACKEND=postgres: this version has no PostgreSQL backend yet (postgresql://)"
        raise DemoError(msg)
    if os.environ.get("CSL_POSTGRES_URL"):
        yield os.environ["CSL_POSTGRES_URL"]
        return
    with testing.PostgresServer() as server:
        yield server.url


# --- main ----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", choices=BACKENDS, default=os.environ.get("BACKEND") or "file",
        help="where the locks live (default: file, the embedded default; no server)",
    )
    backend = parser.parse_args().backend
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up like Ctrl-C
    demo_dir = Path(tempfile.mkdtemp(prefix="csl-demo-"))
    for folder in ("queue", "control", "results"):
        (demo_dir / folder).mkdir()
    worker_log = demo_dir / "worker.log"
    run_id = uuid.uuid4().hex[:8]
    rows: list[Row] = []
    failure = None  # or why the demo stopped early
    try:
        with contextlib.ExitStack() as stack:  # on the way out: stop the worker, then the server
            lock_url = stack.enter_context(lock_server(backend))
            # demo_tasks reads these when imported, here and in the worker.
            os.environ.update(DEMO_DIR=str(demo_dir), DEMO_RUN_ID=run_id)
            if lock_url is None:
                os.environ.pop("DEMO_LOCK_URL", None)
            else:
                os.environ["DEMO_LOCK_URL"] = lock_url
            demo_tasks = importlib.import_module("demo_tasks")  # reads the variables above
            demo_tasks.create_score()
            print(f"broker: filesystem:// (files in {demo_dir}); locks: "
                  + (f"{backend} at {lock_url}" if lock_url else
                     "file://, the default for a one-host broker (kernel file locks, no server)"))
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
        shutil.rmtree(demo_dir, ignore_errors=True)
        print("OK: never more than one copy of a task ran at once for the same key")
        return 0
    if failure is not None:
        print(f"{failure}: worker and server stopped", file=sys.stderr)
    print(f"FAILED (worker log kept at {worker_log})", file=sys.stderr)
    return 130 if failure == "interrupted" else 1


if __name__ == "__main__":
    sys.exit(main())
