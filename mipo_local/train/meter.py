"""Progress of a training job over all its phases, so that its bar and ETA cover the whole job.

A job loads the model, computes the reference log-probs it has not cached, trains (with held-out
evaluations along the way), then scores the held-out pairs for the export check. The work of each phase is
counted in pair forward passes (a training pair costs three: its forward and a backward about twice as
long), so the ETA measured during one phase covers those still to come.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from ..progress import Progress, ShareClock

STAGE = "train"
LOADING, REFERENCE, TRAINING, HELDOUT = "loading model", "reference pass", "training", "held-out scoring"
COST = {REFERENCE: 1.0, TRAINING: 3.0, HELDOUT: 1.0}  # forward passes per pair


@dataclass
class Plan:
    """How much work each phase has: pairs to score, steps to train, and evaluations along the way."""

    reference_pairs: int
    steps: int  # left to train
    pairs_per_step: int
    heldout_pairs: int
    evaluations: int  # held-out evaluations left, the final one included


class TrainMeter:
    def __init__(self, plan: Plan | None = None) -> None:
        self.clock = ShareClock()
        self.done = 0.0
        self.total = 1.0
        if plan is not None:
            self.plan(plan)

    def plan(self, p: Plan) -> None:
        """The work still to do is `p` (a resumed run plans again once it knows its step)."""
        left = (
            p.reference_pairs * COST[REFERENCE]
            + p.steps * p.pairs_per_step * COST[TRAINING]
            + p.evaluations * p.heldout_pairs * COST[HELDOUT]
        )
        self.total = max(1.0, self.done + left)

    def advance(self, phase: str, pairs: float) -> None:
        """`pairs` more pairs of `phase` are done."""
        self.done = min(self.total, self.done + pairs * COST[phase])

    def event(self, phase: str, done: int, total: int, unit: str, message: str = "", **metrics) -> Progress:
        share = self.done / self.total
        eta = None if phase == LOADING else self.clock.eta(share)
        return Progress(STAGE, done, total, message, eta, None, unit, metrics, phase, share)

    def relay(self, phase: str, events: Generator) -> Generator[Progress, None, object]:
        """Re-issue a sub-job's pair counts (reference_logps') as this job's events; returns its value."""
        seen = 0
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                return stop.value
            self.advance(phase, event.done - seen)
            seen = event.done
            yield self.event(phase, event.done, event.total, event.unit, event.message)
