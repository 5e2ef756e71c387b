"""Progress as typed events. Long jobs yield these; the CLI draws a bar, the TUI posts messages.

A job is a generator of `Progress` events (and may yield `Log` lines). Cancelling is closing the
generator (or raising Cancelled from the consumer's callback); each job commits what it finished first.
Jobs yield between their smallest units of work (a decode step, a training micro-batch), so a consumer
gets control, and may close the job, within one such unit; it draws at the pace it likes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    stage: str  # pairs | synth | train | export | eval | run
    done: int
    total: int
    message: str = ""
    eta_s: float | None = None
    rate: float | None = None  # units per second
    unit: str = "it"
    metrics: dict[str, Any] = field(default_factory=dict)
    phase: str = ""  # what the job is doing now: loading model, sampling, reference pass, training...
    share: float | None = None  # the whole job's share done, partial units included (None: done/total)

    @property
    def fraction(self) -> float:
        if self.share is not None:
            return min(1.0, max(0.0, self.share))
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


@dataclass
class Log:
    stage: str
    message: str
    level: str = "info"  # info | warning


class EtaClock:
    """Estimate rate and time left from the units finished since start (excluding resumed units)."""

    def __init__(self, total: int, already_done: int = 0):
        self.total = total
        self.start_done = already_done
        self.start = time.monotonic()

    def estimate(self, done: int) -> tuple[float | None, float | None]:
        elapsed = time.monotonic() - self.start
        fresh = done - self.start_done
        if fresh <= 0 or elapsed <= 0:
            return None, None
        rate = fresh / elapsed
        return rate, max(0.0, (self.total - done) / rate)

    def event(self, stage: str, done: int, message: str = "", unit: str = "it", **metrics: Any) -> Progress:
        rate, eta = self.estimate(done)
        return Progress(stage, done, self.total, message, eta, rate, unit, metrics)


class ShareClock:
    """The ETA of a job from its share done (0..1, partial units included), measured from the first call.

    The share moves at every decode step or micro-batch, so the ETA moves with it instead of waiting for a
    whole unit; time spent before the first call (loading a model) does not count against the rate."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.start_share = 0.0

    def eta(self, share: float) -> float | None:
        now = time.monotonic()
        if self.start is None:
            self.start, self.start_share = now, share
            return None
        fresh, elapsed = share - self.start_share, now - self.start
        if fresh <= 0 or elapsed <= 0:
            return None
        return max(0.0, (1.0 - share) * elapsed / fresh)


class PhaseMeter:
    """Progress events of a job of several phases (loading a model, scoring, sampling...): each event
    names its phase and that phase's counts, and carries one share over the whole job, in which each
    planned phase weighs its `weight` (the tokens it reads, say). Engine DecodeSteps are relayed as they
    come, so the job yields, and can be closed, between two decode steps."""

    def __init__(self, stage: str, plan: list[tuple[str, float]]) -> None:
        self.stage = stage
        self.offset: dict[str, tuple[float, float]] = {}
        total = 0.0
        for key, weight in plan:
            self.offset[key] = (total, weight)
            total += weight
        self.total = max(total, 1.0)
        self.clock = ShareClock()
        self.share = 0.0

    def loading(self, what: str) -> Progress:
        # The ETA of the job so far (none before its first step: the first load does not set the rate).
        eta = None if self.clock.start is None else self.clock.eta(self.share)
        return Progress(self.stage, 0, 0, what, eta, phase="loading model", share=self.share)

    def step(self, key: str, fraction: float, phase: str, message: str, done: int, total: int, unit: str):
        """The event of phase `key` being `fraction` done; the share never runs backwards."""
        low, weight = self.offset[key]
        self.share = max(self.share, (low + weight * min(1.0, fraction)) / self.total)
        eta = self.clock.eta(self.share)
        return Progress(self.stage, done, total, message, eta, None, unit, {}, phase, self.share)

    def relay(
        self, steps, key: str, phase: str, what: str, unit: str, before: int = 0, whole: int | None = None
    ):
        """The DecodeSteps of `steps` as events of `phase`; returns what `steps` returns. `before` /
        `whole`: the work done before this call in a phase of several calls, and the phase's."""
        while True:
            try:
                s = next(steps)
            except StopIteration as stop:
                return stop.value
            fraction = s.fraction if whole is None else (before + s.work_done) / max(1, whole)
            tokens = f", {s.tokens} tokens" if s.phase == "sampling" else ""
            yield self.step(key, fraction, phase, f"{what}{tokens}", s.done, s.total, unit)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def drain(steps, on_step=None):
    """Run a generator of steps through, passing each to `on_step` (when given); returns its value."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(step)


def run_to_end(job):
    """Consume a job generator without drawing anything; return its result (for scripts and tests)."""
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value
