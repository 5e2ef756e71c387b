"""Progress events of a pairs job, one per decode step, in units a person reads.

A chunk of pairs is committed only when all of it is sampled and scored, which takes minutes on a slow
CPU; counting its decode steps makes the bar, the token count and the ETA move during a chunk too.
"""

from __future__ import annotations

import time

from .candidates import ChooseStep
from .progress import EtaClock, Progress, ShareClock

STAGE = "pairs"


class PairsMeter:
    """Turns a job's ChooseSteps and commits into `Progress` events over the whole job."""

    def __init__(self, total_pairs: int, chunks: int) -> None:
        self.total = total_pairs
        self.chunks = chunks
        self.finished = 0  # pairs committed (kept or dropped)
        self.chunk = 0
        self.chunk_size = 0
        self._share_clock = ShareClock()
        self._pairs_clock = EtaClock(total_pairs)
        self._phase: tuple[str, int, int] | None = None  # (phase, attempt, chunk) whose rate is measured
        self._phase_start = 0.0

    def loading(self) -> Progress:
        return Progress(
            STAGE, 0, self.total, "loading the model", unit="pairs", phase="loading model", share=0.0
        )

    def start_chunk(self, size: int) -> None:
        self.chunk += 1
        self.chunk_size = size

    def step(self, s: ChooseStep, **metrics) -> Progress:
        """The event of one decode step inside the current chunk."""
        share = (self.finished + s.fraction * self.chunk_size) / max(1, self.total)
        phase = "sampling again" if s.attempt else s.step.phase
        key = (phase, s.attempt, self.chunk)
        now = time.monotonic()
        if key != self._phase:
            self._phase, self._phase_start = key, now
        where = f"chunk {self.chunk}/{self.chunks}"
        if s.step.phase == "sampling":
            elapsed = now - self._phase_start
            speed = f" ({s.step.tokens / elapsed:.0f} tok/s)" if elapsed > 0.5 else ""
            message = f"{where}, {s.step.tokens} tokens{speed}, {s.step.done}/{s.step.total} answers done"
        else:
            message = f"{where}, {s.step.done}/{s.step.total} answers read"
        return self._event(message, phase, share, metrics)

    def committed(self, n: int, **metrics) -> Progress:
        """The event of a chunk committed: `n` more pairs are done."""
        self.finished += n
        message = f"chunk {self.chunk}/{self.chunks} saved"
        return self._event(message, "sampling", self.finished / max(1, self.total), metrics)

    def _event(self, message: str, phase: str, share: float, metrics: dict) -> Progress:
        rate, _ = self._pairs_clock.estimate(self.finished)
        eta = self._share_clock.eta(share)
        return Progress(STAGE, self.finished, self.total, message, eta, rate, "pairs", metrics, phase, share)
