"""Two beats, two workers, one leader SIGKILLed halfway: every slot still runs once.

    .venv/bin/python examples/ha_beat/run.py

Starts its own redis-server on a free 127.0.0.1 port (or uses ``REDIS_URL``), runs for
about 15 seconds, prints one line per slot, and exits non-zero if a slot ran twice.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from celery_singleton_lock.testing import RedisServer

HERE = Path(__file__).resolve().parent


def start(url: str, log_dir: str, name: str, *command: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": url, "PYTHONPATH": str(HERE)}
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "proj", *command, "-l", "info",
         "--logfile", f"{log_dir}/{name}.log"],
        cwd=log_dir, env=env, start_new_session=True,
    )


def leader_pid(beats: list[subprocess.Popen[bytes]], log_dir: str) -> int | None:
    for index, beat in enumerate(beats):
        text = Path(f"{log_dir}/beat{index}.log").read_text() if beat.poll() is None else ""
        if "elected leader" in text and "lost the leadership" not in text:
            return beat.pid
    return None


def main(url: str) -> int:
    log_dir = tempfile.mkdtemp(prefix="ha-beat-")
    runs = redis.Redis.from_url(f"{url}/3")
    runs.delete("ha-beat:runs")
    processes = [start(url, log_dir, f"worker{i}", "worker", "-c", "2", "-n", f"w{i}@%h") for i in range(2)]
    beats = [start(url, log_dir, f"beat{i}", "beat", "-S", "celery_singleton_lock.beat:SingletonScheduler",
                   "--pidfile=", "-s", f"{log_dir}/schedule{i}") for i in range(2)]
    processes += beats
    try:
        time.sleep(8)  # a demo: let it run, then pull the plug on the leader
        pid = leader_pid(beats, log_dir)
        if pid is not None:
            print(f"SIGKILL the leading beat (pid {pid})")
            os.killpg(pid, signal.SIGKILL)
        time.sleep(8)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(15)
    lines = [line.decode().split() for line in runs.lrange("ha-beat:runs", 0, -1)]
    per_slot = collections.Counter(slot for slot, _ in lines)
    for slot, count in sorted(per_slot.items()):
        print(f"{slot}  ran {count}x")
    twice = [slot for slot, count in per_slot.items() if count > 1]
    print(f"{len(per_slot)} slots, {len(twice)} ran more than once; logs in {log_dir}")
    return 1 if twice or not per_slot else 0


if __name__ == "__main__":
    if os.environ.get("REDIS_URL"):
        sys.exit(main(os.environ["REDIS_URL"].rstrip("/")))
    with RedisServer() as server:
        sys.exit(main(server.url))
