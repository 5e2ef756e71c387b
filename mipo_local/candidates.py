"""A pair's two answers: K candidates a side, sampled in one batch, scored, and chosen.

The positive is the non-degenerate candidate with the highest pointwise mutual information
log p(y|c,x) - log p(y|c',x) under the sampling model (the first one when nothing is scored); the negative
the one with the lowest. A positive that loops, is empty, stops inside a repetition or copies the context
back (degenerate.verdict) is never chosen: when every candidate of a plan is degenerate, the positives are
sampled again with fresh seeds and without guidance (resample_sampling), up to RESAMPLE_ATTEMPTS times, and
the plan is dropped after that.

Seeds derive from the plan's key, the side, the candidate and the attempt, so the same plan always gives
the same answers (resume depends on it).

`choose_steps` yields a `ChooseStep` after every decode step of the engine, so a job reports progress and
stops between two decode steps; `choose` runs it through.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from .degenerate import verdict
from .engine import DecodeStep, GenRequest, GenResult, Penalties
from .progress import drain
from .settings import PairSettings

RESAMPLE_ATTEMPTS = 2  # extra rounds of positives for a plan whose every positive is degenerate
# A choice's share of time spent scoring: every answer is read twice (under c and c'), in wide parallel
# batches, which costs far less per token than sampling it one token per step.
SCORING_SHARE = 0.2


# Guidance rewards what only the context makes likely, and the wish's own words are that: on a sign-off wish
# the guided positive is often the sign-off alone ("Cheers, Tom!"), sampled again just the same under a new
# seed. Sampling again follows p(y|c,x) itself, and the last attempt at a chat's temperature at least.
RESAMPLE_TEMPERATURE = 0.7


def resample_sampling(settings: PairSettings, attempt: int) -> tuple[float, float]:
    """(temperature, guidance) of the positives' `attempt`-th sampling: 0 is the settings' own."""
    if attempt == 0:
        return settings.temperature, settings.guidance
    if attempt < RESAMPLE_ATTEMPTS:
        return settings.temperature, 0.0
    return max(settings.temperature, RESAMPLE_TEMPERATURE), 0.0


def stable_int(*parts: object) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class Item:
    """What one pair needs: prompt ids for the positive, the negative and the scoring of c', and the texts
    the degenerate check compares an answer with."""

    key: str
    pos: list[int]
    neg: list[int]
    score_neg: list[int]
    context: str
    question: str


@dataclass
class Choice:
    chosen: GenResult | None  # None: every positive was degenerate, on every attempt
    rejected: GenResult
    scores: dict | None
    degenerate: list[str] = field(default_factory=list)  # the verdicts of the positives passed over
    attempts: int = 1


def penalties(settings: PairSettings) -> Penalties:
    return Penalties(repeat=settings.repeat_penalty)


def _requests(items: list[Item], settings: PairSettings, side: str, attempt: int) -> list[GenRequest]:
    k = settings.candidates
    temperature, guidance = (
        resample_sampling(settings, attempt) if side == "pos" else (settings.temperature, 0)
    )
    out = []
    for item in items:
        # Only the positive is guided: a negative pushed away from c comes out as degenerate text
        # (repetitions in other scripts), and DPO would learn nothing from beating that.
        guide = item.score_neg if guidance else None
        for j in range(k):
            seed_parts = (item.key, side, j, settings.seed) + ((attempt,) if attempt else ())
            out.append(
                GenRequest(
                    item.pos if side == "pos" else item.neg,
                    max_tokens=settings.max_tokens,
                    temperature=temperature,
                    top_p=settings.top_p,
                    seed=stable_int(*seed_parts),
                    id=(item.key, side, j),
                    guide_prompt=guide,
                    guidance=guidance,
                    penalties=penalties(settings),
                )
            )
    return out


@dataclass(frozen=True)
class ChooseStep:
    """One decode step of `choose_steps`: the engine's step and the share of the whole choice done."""

    step: DecodeStep
    fraction: float
    attempt: int  # 0: the first sampling; 1..: positives sampled again after degenerate ones


def _scores(engine, items: list[Item], answers: dict, side: str, k: int) -> Generator[DecodeStep, None, dict]:
    """(log p(y|c,x), log p(y|c',x)) of each candidate of `side`, in one batched pass."""
    pairs = [(prompt, answers[(it.key, side, j)].tokens) for it in items for prompt in (it.pos, it.score_neg)
             for j in range(k)]  # fmt: skip
    flat = iter((yield from engine.score_many_steps(pairs)))
    out = {}
    for it in items:
        with_c = [next(flat) for _ in range(k)]
        with_neg = [next(flat) for _ in range(k)]
        out[it.key] = (with_c, with_neg)
    return out


def choose(
    engine, items: list[Item], settings: PairSettings, on_step: Callable[[ChooseStep], None] | None = None
) -> dict[str, Choice]:
    """Sample, score and choose both answers of every item (see the module docstring)."""
    return drain(choose_steps(engine, items, settings), on_step)


def _relay(steps: Generator, low: float, width: float, attempt: int):
    """The engine's steps as ChooseSteps whose share of the choice runs from `low` over `width`;
    returns what `steps` returns."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        yield ChooseStep(step, low + width * step.fraction, attempt)


def choose_steps(
    engine, items: list[Item], settings: PairSettings
) -> Generator[ChooseStep, None, dict[str, Choice]]:
    """`choose`, yielding a ChooseStep after every decode step; returns the choices by item key."""
    k, score = settings.candidates, settings.score or settings.candidates > 1
    choices: dict[str, Choice] = {}
    pending, passed_over = list(items), {it.key: [] for it in items}
    answers: dict = {}
    negs: dict = {}
    sampled = 1.0 - SCORING_SHARE if score else 1.0  # the share done when sampling ends
    for attempt in range(RESAMPLE_ATTEMPTS + 1):
        # The negatives decode with the first positives, in one continuous batch.
        requests = _requests(pending, settings, "pos", attempt)
        if attempt == 0:
            requests = _requests(items, settings, "neg", 0) + requests
        # The share of the choice done: sampling up to `sampled`, then each scoring pass its part of the
        # rest. Sampling again is unplanned work: its steps hold the share at "done" rather than move it back.
        first = attempt == 0
        for item in engine.generate_steps(requests):
            if isinstance(item, DecodeStep):
                yield ChooseStep(item, sampled * item.fraction if first else 1.0, attempt)
            else:
                answers[item.id] = item
        results = {}
        if score:
            passes = ([(items, "neg")] if first else []) + [(pending, "pos")]
            width = SCORING_SHARE / len(passes) if first else 0.0
            for n, (group, side) in enumerate(passes):
                low = sampled + n * width if first else 1.0
                results[side] = yield from _relay(
                    _scores(engine, group, answers, side, k), low, width, attempt
                )
        negs = results.get("neg", negs)
        poss = results.get("pos", {})
        retry = []
        for it in pending:
            cands = [answers[(it.key, "pos", j)] for j in range(k)]
            verdicts = [verdict(a.text, context=it.context, question=it.question, cut=a.finish_reason == "length")
                        for a in cands]  # fmt: skip
            good = [j for j in range(k) if verdicts[j] is None]
            passed_over[it.key] += [v for v in verdicts if v is not None]
            if not good and attempt < RESAMPLE_ATTEMPTS:
                retry.append(it)
                continue
            choices[it.key] = _pick(it, cands, good, poss.get(it.key), answers, negs.get(it.key), k)
            choices[it.key].degenerate = passed_over[it.key]
            choices[it.key].attempts = attempt + 1
        pending = retry
        if not pending:
            break
    return choices


def _pick(it: Item, cands, good, pos_scores, answers, neg_scores, k) -> Choice:
    negatives = [answers[(it.key, "neg", j)] for j in range(k)]
    if pos_scores is None:
        return Choice(cands[good[0]] if good else None, negatives[0], None)
    pmi_pos = [a - b for a, b in zip(*pos_scores, strict=True)]
    pmi_neg = [a - b for a, b in zip(*neg_scores, strict=True)]
    worst = int(np.argmin(pmi_neg))
    rejected = negatives[worst]
    if not good:
        return Choice(None, rejected, None)
    best = max(good, key=lambda j: pmi_pos[j])
    chosen = cands[best]
    scores = {
        "logp_chosen_c": pos_scores[0][best],
        "logp_chosen_cneg": pos_scores[1][best],
        "logp_rejected_c": neg_scores[0][worst],
        "logp_rejected_cneg": neg_scores[1][worst],
        "pmi_chosen": pmi_pos[best],
        "pmi_rejected": pmi_neg[worst],
        "chosen_tokens": len(chosen.tokens),
        "rejected_tokens": len(rejected.tokens),
    }
    return Choice(chosen, rejected, scores)
