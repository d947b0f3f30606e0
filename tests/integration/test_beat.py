"""HA beat end to end: real `celery beat` processes with SingletonScheduler, real workers.

One group of processes serves the whole module, in story order: two beats, a third one,
the leader SIGKILLed, the next leader SIGSTOPped past its lease and resumed. The leader
lease is 2 s (``CSL_BEAT_TTL``); the schedule emits every second. Every run records the
slot it was emitted for, so "never two runs of one slot" is checked over the whole story.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import time
import uuid
from collections import Counter

import pytest

from tests.conftest import wait_until
from tests.integration.processes import Beat, Worker

TTL = 2.0


class Story:
    """The module's processes and what they recorded."""

    def __init__(self, app, redis_url: str, log_dir, run: str):
        self.app, self.redis_url, self.log_dir, self.run = app, redis_url, log_dir, run
        self.beats: list[Beat] = []

    def add_beat(self) -> Beat:
        beat = Beat(self.redis_url, self.log_dir, CSL_BEAT_RUN=self.run, CSL_BEAT_TTL=str(TTL))
        self.beats.append(beat)
        return beat

    def runs(self) -> list[tuple[float, str]]:
        """(time, slot) of every run so far."""
        rows = [json.loads(r) for r in self.app.events.lrange(f"beat:{self.run}", 0, -1)]
        return [(row[0], row[2]) for row in rows]

    def leaderships(self) -> list[tuple[float, int]]:
        """(time, beat pid) of every election so far."""
        rows = [json.loads(r) for r in self.app.events.lrange(f"beat-leaders:{self.run}", 0, -1)]
        return [(row[0], row[1]) for row in rows]

    def leader(self) -> Beat:
        pid = self.leaderships()[-1][1]
        return next(beat for beat in self.beats if beat.pid == pid)

    def slots_after(self, moment: float) -> list[float]:
        """Slot instants (epoch seconds) of the runs that started after ``moment``."""
        return sorted(_instant(slot) for at, slot in self.runs() if at > moment)

    def assert_each_slot_ran_once(self) -> None:
        counts = Counter(slot for _, slot in self.runs())
        assert None not in counts, "a run without a slot header"
        twice = {slot: n for slot, n in counts.items() if n > 1}
        assert not twice, f"slots that ran more than once: {twice}"


def _instant(slot: str) -> float:
    return dt.datetime.fromisoformat(slot.split("@", 1)[1]).timestamp()


def missed(slots: list[float]) -> int:
    """Whole seconds between the first and last slot that no run was emitted for."""
    return round(slots[-1] - slots[0]) + 1 - len(slots) if slots else 0


@pytest.fixture(scope="module")
def story(redis_url, tmp_path_factory):
    os.environ["CSL_WORKER_REDIS_URL"] = redis_url
    app = importlib.import_module("tests.integration.beat_app")
    log_dir = tmp_path_factory.mktemp("beat")
    story = Story(app, redis_url, log_dir, uuid.uuid4().hex[:12])
    workers = [Worker(redis_url, log_dir, concurrency=2, app="tests.integration.beat_app") for _ in range(2)]
    try:
        for worker in workers:
            worker.wait_ready()
        yield story
    finally:
        for process in [*story.beats, *workers]:
            process.stop()


def observe(story: Story, seconds: int, since: float | None = None) -> list[float]:
    """Wait until runs for ``seconds`` more slots arrived; return their slot instants."""
    since = time.time() if since is None else since
    wait_until(lambda: len(story.slots_after(since)) >= seconds, seconds + 10, f"{seconds} scheduled runs")
    return story.slots_after(since)


def test_two_beats_emit_every_slot_once(story):
    first, second = story.add_beat(), story.add_beat()
    first.wait_ready()
    second.wait_ready()
    wait_until(story.runs, 20, "the first scheduled run")
    slots = observe(story, 10)
    story.assert_each_slot_ran_once()
    assert missed(slots) <= 1, f"slots {slots}"
    assert len({pid for _, pid in story.leaderships()}) == 1  # one election, no flapping
    assert sum("elected leader" in beat.text() for beat in story.beats) == 1


def test_a_third_beat_changes_nothing(story):
    third = story.add_beat()
    third.wait_for_log("another beat leads")
    slots = observe(story, 8)
    story.assert_each_slot_ran_once()
    assert missed(slots) <= 1, f"slots {slots}"
    assert len(story.leaderships()) == 1


def test_sigkilled_leader_is_replaced_within_its_ttl(story):
    leader = story.leader()
    before = story.slots_after(0)[-1]
    killed_at = time.time()
    leader.kill()
    wait_until(lambda: len(story.leaderships()) == 2, TTL + 5, "a standby to be elected")
    elected_at, new_pid = story.leaderships()[-1]
    takeover = elected_at - killed_at
    assert new_pid != leader.pid
    assert takeover <= TTL + 1, f"takeover took {takeover:.2f}s"
    after = observe(story, 3, since=elected_at)
    story.assert_each_slot_ran_once()
    gap = missed([before, *after])
    print(f"takeover after SIGKILL: {takeover:.2f}s; slots missed during the gap: {gap}")
    assert gap <= TTL + 1


def test_paused_leader_resumes_without_emitting_a_taken_slot(story):
    leader = story.leader()
    elections = len(story.leaderships())
    leader.pause()
    try:
        wait_until(lambda: len(story.leaderships()) > elections, TTL + 5, "a standby to be elected")
        observe(story, 2, since=story.leaderships()[-1][0])
    finally:
        leader.resume()
    leader.wait_for_log("lost the leadership", timeout=10)
    resumed_log = leader.text().split("lost the leadership", 1)[1]
    observe(story, 2)
    story.assert_each_slot_ran_once()
    assert "Sending due task" not in resumed_log
    assert story.leader() is not leader
