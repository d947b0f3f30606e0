"""Real `celery worker` and `celery beat` subprocesses for the integration tests.

Each runs in its own process group (session) and is stopped by its PID: never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]


class _Process:
    """A celery sub-command in a session of its own, logging to ``self.log``."""

    def __init__(self, command: list[str], log: Path, redis_url: str, env_extra: dict[str, str]):
        self.log = log
        env = {**os.environ, "CSL_WORKER_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), **env_extra}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", *command, "-l", "info", "--logfile", str(log)],
            cwd=ROOT, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for_log(self, line: str, timeout: float = 60) -> None:
        def logged():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.log.name} exited: {self.text()[-2000:]}")
            return line in self.text()

        wait_until(logged, timeout, f"{self.log.name} to log {line!r}")

    def kill(self) -> None:
        """SIGKILL the whole process group (a worker's pool children too)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def pause(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused one must see the SIGTERM
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Worker(_Process):
    """A real `celery worker` (prefork unless told otherwise)."""

    def __init__(
        self,
        redis_url: str,
        log_dir: Path,
        *,
        queues: str = "celery",
        concurrency: int = 4,
        pool: str = "prefork",
        app: str = "tests.integration.worker_app",
        options: tuple[str, ...] = (),
        **env_extra: str,
    ):
        """:param options: more `celery worker` options (``("-E",)``)."""
        self.name = f"{queues.replace(',', '-')}-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
        super().__init__(
            [
                "-A", app, "worker", "-P", pool, "-c", str(concurrency), "-Q", queues,
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", self.name,
                *options,
            ],
            log_dir / f"worker-{self.name.split('@')[0]}.log", redis_url, env_extra,
        )

    def wait_ready(self, app=None, timeout: float = 60) -> None:
        self.wait_for_log("ready.", timeout)


class Beat(_Process):
    """A real `celery beat` with ``scheduler`` (by default our SingletonScheduler)."""

    def __init__(
        self,
        redis_url: str,
        log_dir: Path,
        *,
        app: str = "tests.integration.beat_app",
        scheduler: str = "celery_singleton_lock.beat:SingletonScheduler",
        **env_extra: str,
    ):
        name = uuid.uuid4().hex[:6]
        super().__init__(
            # No pidfile: several beats share a directory, as several hosts would not.
            ["-A", app, "beat", "-S", scheduler, "--pidfile=", "-s", str(log_dir / f"schedule-{name}")],
            log_dir / f"beat-{name}.log", redis_url, env_extra,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_for_log("beat: Starting...", timeout)
