"""A pair's two answers: K candidates a side, sampled in one batch, scored, and chosen.

The positive is the non-degenerate candidate with the highest pointwise mutual information
log p(y|c,x) - log p(y|c',x) under the sampling model (the first one when nothing is scored); the negative
the one with the lowest. A positive that loops, is empty, stops inside a repetition or copies the context
back (degenerate.verdict) is never chosen: when every candidate of a plan is degenerate, the positives are
sampled again with fresh seeds, up to RESAMPLE_ATTEMPTS times, and the plan is dropped after that.

Seeds derive from the plan's key, the side, the candidate and the attempt, so the same plan always gives
the same answers (resume depends on it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .degenerate import verdict
from .engine import GenRequest, GenResult, Penalties
from .settings import PairSettings

RESAMPLE_ATTEMPTS = 2  # extra rounds of positives for a plan whose every positive is degenerate


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
    out = []
    for item in items:
        # Only the positive is guided: a negative pushed away from c comes out as degenerate text
        # (repetitions in other scripts), and DPO would learn nothing from beating that.
        guide = item.score_neg if side == "pos" and settings.guidance else None
        for j in range(k):
            seed_parts = (item.key, side, j, settings.seed) + ((attempt,) if attempt else ())
            out.append(
                GenRequest(
                    item.pos if side == "pos" else item.neg,
                    max_tokens=settings.max_tokens,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    seed=stable_int(*seed_parts),
                    id=(item.key, side, j),
                    guide_prompt=guide,
                    guidance=settings.guidance,
                    penalties=penalties(settings),
                )
            )
    return out


def _scores(engine, items: list[Item], answers: dict, side: str, k: int) -> dict[str, tuple[list, list]]:
    """(log p(y|c,x), log p(y|c',x)) of each candidate of `side`, in one batched pass."""
    pairs = [(prompt, answers[(it.key, side, j)].tokens) for it in items for prompt in (it.pos, it.score_neg)
             for j in range(k)]  # fmt: skip
    flat = iter(engine.score_many(pairs))
    out = {}
    for it in items:
        with_c = [next(flat) for _ in range(k)]
        with_neg = [next(flat) for _ in range(k)]
        out[it.key] = (with_c, with_neg)
    return out


def choose(engine, items: list[Item], settings: PairSettings) -> dict[str, Choice]:
    """Sample, score and choose both answers of every item (see the module docstring)."""
    k, score = settings.candidates, settings.score or settings.candidates > 1
    choices: dict[str, Choice] = {}
    pending, passed_over = list(items), {it.key: [] for it in items}
    answers: dict = {}
    negs: dict = {}
    for attempt in range(RESAMPLE_ATTEMPTS + 1):
        # The negatives decode with the first positives, in one continuous batch.
        requests = _requests(pending, settings, "pos", attempt)
        if attempt == 0:
            requests = _requests(items, settings, "neg", 0) + requests
        answers.update({r.id: r for r in engine.generate(requests)})
        if attempt == 0 and score:
            negs = _scores(engine, items, answers, "neg", k)
        poss = _scores(engine, pending, answers, "pos", k) if score else {}
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
