"""What the metrics cost a task call: ``python benchmarks/metrics_overhead.py off|main|child``.

A direct call of a singleton task on ``memory://`` (lock, body, release; no broker, no
result backend), best of 15 rounds of 20,000 calls, CPU time (``time.process_time``):

- ``off``: no ``singleton_lock_metrics_port`` (what every worker without it pays);
- ``main``: metrics on, calls in the serving process (a solo or threads worker);
- ``child``: metrics on, calls in a forked process that pushes its observations to the
  serving one (a prefork pool process); also prints the serving process's CPU per call.

Not part of ``make bench``: docs/monitoring.md ("Cost") quotes its figures.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from celery import Celery

from celery_singleton_lock import SingletonTask, metrics

ROUNDS, CALLS = 15, 20_000

app = Celery("bench_metrics", broker="memory://")
app.conf.singleton_lock_backend = "memory://"


@app.task(base=SingletonTask)
def noop(n: int) -> int:
    return n


def best_microseconds_per_call() -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(CALLS):
            noop(1)
        best = min(best, (time.process_time() - started) / CALLS * 1e6)
    return best


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(mode: str) -> None:
    if mode == "off":
        print(f"off: {best_microseconds_per_call():.2f} us/call")
        return
    app.conf.singleton_lock_metrics_port = free_port()
    server = metrics.start(app, pool_processes=mode == "child")
    assert server is not None
    if mode == "main":
        print(f"on, in the serving process: {best_microseconds_per_call():.2f} us/call")
        return
    read_end, write_end = os.pipe()
    serving_cpu = time.process_time()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, f"{best_microseconds_per_call():.2f}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(1)  # the serving process adds up the last lines
    serving_cpu = (time.process_time() - serving_cpu) / (ROUNDS * CALLS) * 1e6
    print(
        f"on, in a pool process: {os.read(read_end, 100).decode()} us/call; "
        f"the serving process: {serving_cpu:.2f} us CPU per call"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "off")
