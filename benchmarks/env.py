"""What every scenario receives: the lock server, a client to read its counters, a pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from benchmarks.harness import ServerStats, WorkerPool


@dataclass
class Env:
    url: str  #: the lock server, ``redis://127.0.0.1:PORT/0``
    quick: bool = False  #: fewer repetitions and shorter runs (a smoke test, not a result)
    pool_size: int = 8
    _pool: WorkerPool | None = field(default=None, repr=False)
    _client: redis.Redis | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def client(self) -> redis.Redis:
        """A plain client for FLUSHALL, INFO, PTTL: never used by a library under test."""
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        return self._client

    @property
    def stats(self) -> ServerStats:
        return ServerStats(self.client)

    @property
    def pool(self) -> WorkerPool:
        """The spawned worker processes, started on first use and kept for the run."""
        if self._pool is None:
            self._pool = WorkerPool(self.pool_size, self.url)
        return self._pool

    def reps(self, full: int) -> int:
        return 1 if self.quick else full

    def reset_server(self) -> None:
        """Empty the database and zero the command counters between runs."""
        self.client.flushall()
        self.client.config_resetstat()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None
