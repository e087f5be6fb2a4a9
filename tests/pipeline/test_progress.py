"""Progress from the sampler's steps, and the line a user reads when Ray retries a pack.

The board, the step reporter and the estimate are plain Python here (Ray only for a board
slow to answer); the
engine's use of them on a real cluster is checked in test_faults.py (progress lines and
the retry line of a killed actor) and in test_engine.py (the reporter's lines of a run).
"""

from __future__ import annotations

import logging

import pytest

from d4a_batch.pipeline.progress import (
    ActorState,
    ProgressBoard,
    ProgressReporter,
    StepReporter,
    estimate,
    format_seconds,
    progress_line,
)


class LocalBoard:
    """A ``ProgressBoard`` called the way a Ray actor handle is (``.method.remote(...)``)."""

    def __init__(self):
        self.board = ProgressBoard()
        for name in ("register", "update", "snapshot"):
            setattr(self, name, _Remote(getattr(self.board, name)))


class _Remote:
    def __init__(self, fn):
        self.remote = fn


def test_the_estimate_counts_row_steps_and_sums_the_actors_rates():
    now = 1000.0
    # two actors, 10 s into sampling, each 100 row-steps/s; 4 objects x 2 samples x 50 steps
    a = ActorState("a", 1, first_step=now - 10, sampled=600, inflight=400, finished_objects=3)
    b = ActorState("b", 2, first_step=now - 10, inflight=1000, inflight_objects=2)
    e = estimate([a, b], objects=10, samples=2, steps=100, now=now)
    assert e.total == 2000 and e.done == 3 * 200 + 400 + 1000 == 2000
    e = estimate([a, b], objects=20, samples=2, steps=100, now=now)
    assert e.done == 2000 and e.total == 4000
    assert e.eta_s == pytest.approx(2000 / 200)  # summed rate: 100 + 100 row-steps/s
    assert e.objects_done == 3 and e.actors == 2 and e.since_first_step == pytest.approx(10)
    assert "sampling 50% (3/20 objects done), 2 actors" in progress_line(e)
    assert "about 10 s to go" in progress_line(e)
    # the latest pack's time from its last step to its rows is still to come
    b.post_s = 3.0
    assert estimate([a, b], objects=20, samples=2, steps=100, now=now).eta_s == pytest.approx(13)
    # before any step: no rate, no ETA, no time since the first step
    e = estimate([ActorState("a", 1)], objects=4, samples=2, steps=5, now=now)
    assert e.eta_s is None and e.since_first_step is None and e.done == 0
    # objects not known (staged packs): counts, no percentage, no ETA
    e = estimate([a], objects=None, samples=2, steps=100, now=now)
    assert e.eta_s is None and progress_line(e).startswith("sampling (3 objects done), 1 actor;")
    assert [format_seconds(s) for s in (5, 300, 9000)] == ["5 s", "5 min", "2.5 h"]


def test_the_step_reporter_reports_each_packs_steps_and_objects():
    remote = LocalBoard()
    rep = StepReporter(remote, samples=2, steps=3)
    (state,) = remote.board.snapshot()[0]
    assert state.first_step is None and state.pid == rep.pid
    rep.pack_started([11, 12, 13])
    for i in reversed(range(3)):
        rep.step(i, None)
    (state,) = remote.board.snapshot()[0]
    assert state.inflight_objects == 3 and state.inflight_ids == (11, 12, 13)
    assert state.first_step is not None
    rep.pack_finished(3)
    rep.pack_finished(2)  # a pack of error rows: no steps, its objects count in full
    (state,) = remote.board.snapshot()[0]
    assert (state.sampled, state.inflight, state.finished_objects) == (3 * 3 * 2, 0, 5)
    e = estimate([state], objects=5, samples=2, steps=3)
    assert e.done == e.total == 30 and e.objects_done == 5


def test_a_restarted_actor_yields_one_line_naming_the_retried_pack():
    board = ProgressBoard()
    board.register("actor-1", 100)
    board.update("actor-1", 100, inflight=40, inflight_objects=2, inflight_ids=(7, 8))
    board.register("actor-2", 200)
    assert board.snapshot()[1] == []
    board.register("actor-1", 101)  # Ray restarted actor-1 in a new process
    states, events = board.snapshot()
    assert sorted((s.actor_id, s.pid) for s in states) == [("actor-1", 101), ("actor-2", 200)]
    (line,) = events
    assert "died (process 100) while sampling a pack of 2 objects (7, 8)" in line
    assert "sampling that pack again: nothing is lost" in line
    assert board.snapshot()[1] == []  # each line once
    # the dead process's unfinished steps left the count
    assert estimate(states, objects=4, samples=2, steps=10).done == 0


def test_a_board_that_cannot_be_reached_never_fails_the_actor(caplog):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("board gone")

    with caplog.at_level(logging.DEBUG):
        rep = StepReporter(Broken(), samples=2, steps=3)
        rep.pack_started([1])
        rep.step(0, None)
        rep.pack_finished(1)
    assert rep.board is None and rep.state.finished_objects == 1
    rep = StepReporter(None, samples=2, steps=3)  # no board: counts, sends nothing
    rep.pack_started([1, 2])
    rep.step(0, None)
    assert rep.state.inflight == 4


@pytest.mark.ray
def test_a_board_slow_to_answer_loses_no_retry_line_and_progress_goes_on(ray_local):
    """CI, 2 cores: the board's process started after the sampling actors' and the first
    snapshot waited past its timeout; the reporter then stopped for the whole run. Now a
    late answer is waited on at the next poll (the request is not sent again: the board
    hands each retry line out once)."""
    import time

    ray = ray_local
    late = ray.remote(num_cpus=0)(lambda s: (time.sleep(s), ([], ["a retry line"]))[1])

    class SlowBoard:
        asked = 0

        class snapshot:  # called like an actor handle's method
            @staticmethod
            def remote():
                SlowBoard.asked += 1
                return late.remote(3.0)

    reporter = ProgressReporter(SlowBoard(), objects=4, samples=2, steps=10)
    assert reporter._snapshot(timeout=0.2) == ([], [])  # not yet: the run goes on
    assert reporter._snapshot(timeout=60) == ([], ["a retry line"])
    assert SlowBoard.asked == 1
