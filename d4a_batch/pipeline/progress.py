"""Progress of a run from the sampler's own steps, and what Ray retried.

The sampling actors report as they sample: after each reverse step of a pack (at most
every ``REPORT_EVERY_S`` seconds, and at every pack's start and end) each sends its
state to one small Ray actor of the run, the ``ProgressBoard`` (no CPU; owned by the
driver, so it ends with the run). The driver's ``ProgressReporter`` thread reads the
board every second or so and prints a line (a log line; a tqdm bar when stderr is a
terminal) from the first step on:

    sampling 23% (7/32 objects done), 2 actors; 41 s since the first step, about 137 s to go

Work is counted in row-steps (objects x samples x steps): a finished pack counts its
objects in full (error objects too: they need no sampling), a pack being sampled counts
the steps its rows have done. The rate is each actor's sampled row-steps over the wall
time since its own first step (waiting, post-processing and packing included), summed
over the actors; the ETA is the remaining row-steps over that rate, plus the time the
latest pack took from its last step to its rows (summaries, flags); the last writes,
commits and the catalog metadata after the last pack are not counted (on the 2-core VM
they took 10-15 s of a 110 s demo run, docs/HISTORY.md). Error packs and
packs that could not be sampled still count as done, so the bar reaches 100 %.

A sampling actor that dies is restarted by Ray in place (same actor id, a new process)
and the pack it held is sampled again. The restarted actor registers with the board,
which sees the actor id come back with a new process id and records what the dead one
held; the driver prints one line saying what is being retried and that nothing is lost
(every object still ends as exactly one row: partitions are committed only when their
row count matches). The dead process's unfinished steps leave the count.

Nothing here may fail a run: reports are fire-and-forget, and any error reaching the
board is swallowed (the run just reports less).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
REPORT_EVERY_S = 2.0  # an actor reports at most this often while it samples
POLL_S = 1.0  # the driver reads the board this often


@dataclass
class ActorState:
    """What one sampling actor process reported last (the board keeps one per process)."""

    actor_id: str
    pid: int
    first_step: float | None = None  # wall time (time.time()) its first step began
    sampled: int = 0  # row-steps sampled in finished packs
    inflight: int = 0  # row-steps done in the pack being sampled
    inflight_objects: int = 0  # objects of the pack being sampled (0: none)
    inflight_ids: tuple[int, ...] = ()  # their object ids (the first few)
    finished_objects: int = 0  # objects of finished packs (sampled or error)
    post_s: float = 0.0  # its last sampled pack: seconds from the last step to the pack's rows
    updated: float = 0.0


class ProgressBoard:
    """The run's progress store (a Ray actor: ``ProgressBoard.start()``)."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, int], ActorState] = {}
        self.events: list[str] = []

    @staticmethod
    def start():
        """A board actor owned by this process (0 CPU, never restarted)."""
        import ray

        return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()

    def register(self, actor_id: str, pid: int) -> None:
        """A sampling actor process started; a known actor id in a new process is a restart."""
        dead = [s for (a, p), s in self.states.items() if a == actor_id and p != pid]
        for s in dead:
            self.states.pop((s.actor_id, s.pid))
            self.events.append(retry_line(s))
        self.states.setdefault((actor_id, pid), ActorState(actor_id, pid, updated=time.time()))

    def update(self, actor_id: str, pid: int, **fields: Any) -> None:
        state = self.states.setdefault((actor_id, pid), ActorState(actor_id, pid))
        for k, v in fields.items():
            setattr(state, k, v)
        state.updated = time.time()

    def snapshot(self) -> tuple[list[ActorState], list[str]]:
        """(every live process's state, the retry lines since the last snapshot)."""
        events, self.events = self.events, []
        return list(self.states.values()), events


def retry_line(dead: ActorState) -> str:
    """The one line a user reads when a sampling actor died and Ray retries its pack."""
    if dead.inflight_objects:
        ids = ", ".join(str(i) for i in dead.inflight_ids)
        more = "" if len(dead.inflight_ids) >= dead.inflight_objects else ", ..."
        held = f"while sampling a pack of {dead.inflight_objects} objects ({ids}{more})"
        what = "Ray restarted it and is sampling that pack again"
    else:
        held, what = "between packs", "Ray restarted it"
    return (
        f"a sampling actor died (process {dead.pid}) {held}; {what}: nothing is lost "
        "(every object still gets exactly one row; a partition is committed only when its "
        "row count matches)"
    )


class StepReporter:
    """The actor side: counts a pack's steps and sends them to the board (never raises)."""

    def __init__(self, board, samples: int, steps: int) -> None:
        self.board, self.samples, self.steps = board, int(samples), int(steps)
        self.pid = os.getpid()
        self.actor_id = ""
        self._last_step = 0.0
        self.state = ActorState("", self.pid)
        self._last = 0.0
        if board is None:
            return
        try:
            import ray

            # the Ray actor's id survives a restart (a new process); outside Ray: the pid
            actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
            self.actor_id = actor_id or f"pid-{self.pid}"
            self.state.actor_id = self.actor_id
            board.register.remote(self.actor_id, self.pid)
        except Exception:  # progress is never worth a failed actor
            log.debug("progress board unreachable", exc_info=True)
            self.board = None

    def _send(self, force: bool = False) -> None:
        now = time.time()
        if self.board is None or (not force and now - self._last < REPORT_EVERY_S):
            return
        self._last = now
        s = self.state
        try:
            self.board.update.remote(
                self.actor_id, self.pid, first_step=s.first_step, sampled=s.sampled,
                inflight=s.inflight, inflight_objects=s.inflight_objects,
                inflight_ids=s.inflight_ids, finished_objects=s.finished_objects,
                post_s=s.post_s,
            )  # fmt: skip
        except Exception:
            log.debug("progress report failed", exc_info=True)

    def pack_started(self, object_ids: list[int]) -> None:
        """A pack of objects to sample (its first step begins now)."""
        if self.state.first_step is None:
            self.state.first_step = time.time()
        self.state.inflight, self.state.inflight_objects = 0, len(object_ids)
        self.state.inflight_ids = tuple(int(i) for i in object_ids[:8])
        self._rows = len(object_ids) * self.samples
        self._send(force=True)

    def step(self, *_: Any) -> None:
        """The sampler's step callback: one reverse step of every row of the pack."""
        first = not (self.state.sampled or self.state.inflight)
        self.state.inflight += self._rows
        self._last_step = time.time()
        self._send(force=first)  # the first step at once: the rate starts from it

    def pack_finished(self, n_objects: int) -> None:
        """A pack is done (sampled, or error rows): its objects count in full."""
        if self.state.inflight:  # summaries, flags, rows of a sampled pack after its last step
            self.state.post_s = time.time() - self._last_step
        self.state.sampled += self.state.inflight
        self.state.inflight, self.state.inflight_objects, self.state.inflight_ids = 0, 0, ()
        self.state.finished_objects += int(n_objects)
        self._send(force=True)


# --------------------------------------------------------------------------- the driver
@dataclass
class Estimate:
    """What the progress line says."""

    done: int  # row-steps
    total: int
    objects_done: int
    objects: int
    actors: int  # sampling actor processes that reported
    since_first_step: float | None
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def estimate(
    states: list[ActorState],
    objects: int | None,
    samples: int,
    steps: int,
    now: float | None = None,
) -> Estimate:
    """Row-steps done, and the time to go at the actors' summed rate (``None`` before a
    step, or when the run's objects are not known: staged packs)."""
    now = time.time() if now is None else now
    per_object = samples * steps
    total = (objects or 0) * per_object
    finished = sum(s.finished_objects for s in states)
    done = finished * per_object + sum(s.inflight for s in states)
    done = min(total, done) if objects else done
    started = [s for s in states if s.first_step is not None and s.sampled + s.inflight > 0]
    rate = sum((s.sampled + s.inflight) / max(now - s.first_step, 1e-3) for s in started)
    first = min((s.first_step for s in started), default=None)
    # after the last step, the last pack still becomes rows (as long as the latest pack did)
    tail = max((s.post_s for s in states), default=0.0)
    eta = (total - done) / rate + tail if rate > 0 and objects else None
    return Estimate(
        done, total, min(finished, objects) if objects else finished, objects or 0, len(states),
        None if first is None else now - first, eta,
    )  # fmt: skip


def progress_line(e: Estimate) -> str:
    if e.total:
        text = f"sampling {100 * e.fraction:.0f}% ({e.objects_done}/{e.objects} objects done)"
    else:
        text = f"sampling ({e.objects_done} objects done)"
    text += f", {e.actors} actor{'s' if e.actors != 1 else ''}"
    if e.since_first_step is not None:
        text += f"; {e.since_first_step:.0f} s since the first step"
    if e.eta_s is not None and e.done < e.total:
        text += f", about {format_seconds(e.eta_s)} to go"
    return text


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "? s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class ProgressReporter:
    """The driver's thread: reads the board, prints progress lines and retry lines.

    ``interval_s``: seconds between progress lines (the first comes at the first poll
    after the first step plus ``first_after_s``); ``bar``: a tqdm bar on stderr instead
    of progress log lines (None: when stderr is a terminal). Retry lines are always
    logged, at once.
    """

    board: Any
    objects: int | None  # None: not known (staged packs): no percentage, no ETA
    samples: int
    steps: int
    interval_s: float = 15.0
    first_after_s: float = 5.0
    bar: bool | None = None
    lines: list[str] = field(default_factory=list)  # every line printed (tests read them)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pending: Any = None  # a snapshot request the board has not answered yet

    def __enter__(self) -> ProgressReporter:
        if self.bar is None:
            self.bar = sys.stderr.isatty()
        self._thread = threading.Thread(target=self._run, name="d4a-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for line in (self._snapshot() or ([], []))[1]:  # retries reported at the very end
            self._emit(line, None)

    def _snapshot(self, timeout: float = 30.0) -> tuple[list[ActorState], list[str]] | None:
        """The board's states and new retry lines; ([], []) when it did not answer in time
        (a loaded machine may start the board's process late: the next poll waits on the
        same request, so no retry line it already handed out is lost); None when the board
        is gone (the driver is shutting down)."""
        import ray

        try:
            if self._pending is None:
                self._pending = self.board.snapshot.remote()
            ready, _ = ray.wait([self._pending], timeout=timeout)
            if not ready:
                log.debug("progress board slow to answer; waiting on it at the next poll")
                return [], []
            ref, self._pending = self._pending, None
            return ray.get(ref)
        except Exception:
            log.debug("progress board unreachable", exc_info=True)
            return None

    def _run(self) -> None:
        tqdm_bar, last_line = None, None
        try:
            while not self._stop.wait(POLL_S):
                snap = self._snapshot()
                if snap is None:
                    return
                states, events = snap
                for line in events:
                    self._emit(line, tqdm_bar)
                e = estimate(states, self.objects, self.samples, self.steps)
                if e.since_first_step is None:
                    continue
                if self.bar:
                    tqdm_bar = tqdm_bar or _new_bar(e.total or None)
                    tqdm_bar.n = e.done
                    tqdm_bar.set_postfix_str(_bar_postfix(e), refresh=True)
                    continue
                now = time.monotonic()
                due = (
                    e.since_first_step >= self.first_after_s
                    if last_line is None
                    else now - last_line >= self.interval_s
                )
                if due and (not e.total or e.done < e.total):
                    self._emit(progress_line(e), None)
                    last_line = now
        finally:
            if tqdm_bar is not None:
                tqdm_bar.close()

    def _emit(self, line: str, tqdm_bar) -> None:
        self.lines.append(line)
        if tqdm_bar is not None:
            tqdm_bar.write(f"[d4a] {line}", file=sys.stderr)
        else:
            log.info(line)


def _new_bar(total: int):
    from tqdm import tqdm

    return tqdm(
        total=total, file=sys.stderr, unit="row-step", unit_scale=True, dynamic_ncols=True,
        bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}",
        desc="[d4a] sampling ",
    )  # fmt: skip


def _bar_postfix(e: Estimate) -> str:
    eta = "" if e.eta_s is None else f", about {format_seconds(e.eta_s)} to go"
    return f"{e.objects_done}/{e.objects} objects{eta}"
