"""Progress as typed events. Long jobs yield these; the CLI draws a bar, the TUI posts messages.

A job is a generator of `Progress` events (and may yield `Log` lines). Cancelling is closing the
generator (or raising Cancelled from the consumer's callback); each job commits what it finished first.
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

    @property
    def fraction(self) -> float:
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


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def run_to_end(job):
    """Consume a job generator without drawing anything; return its result (for scripts and tests)."""
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value
