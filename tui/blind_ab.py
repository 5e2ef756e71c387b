"""Blind A/B bookkeeping: the latest evaluation's answers in a hidden random order, and the user's votes.

The answers are the ones `mipo-local eval` sampled on held-out prompts from the exported model and from the
base (report.samples), kept only where no training pair has the same prompt (evaluate.unseen_samples). Votes live
in the workspace config, per export, so the win rate survives restarts. Each vote that is not a tie is also one of
the user's pairs (chosen = the picked answer), for training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from mipo_local import user_pairs
from mipo_local.workspace import Workspace

VOTES_KEY = "tui.blind_ab_votes"
PICKS = ("personalized", "base", "tie")


@dataclass
class Trial:
    index: int  # position in the report's samples
    context: str
    prompt: str
    answers: tuple[str, str]  # (A, B) as shown
    sources: tuple[str, str]  # which model wrote A and B: "personalized" / "base"


def latest_report(ws: Workspace) -> dict | None:
    rows = ws.query("SELECT report FROM evals ORDER BY id DESC LIMIT 1")
    return json.loads(rows[0]["report"]) if rows else None


def votes(ws: Workspace, export_id: int) -> list[dict]:
    return (ws.get_config(VOTES_KEY) or {}).get(str(export_id), [])


def record_vote(ws: Workspace, export_id: int, trial: Trial, shown_pick: str) -> str:
    """Store a vote given as "A", "B" or "tie", and a pair of the user's for a pick; returns the model it
    favoured ("personalized", "base", "tie")."""
    pick = "tie" if shown_pick == "tie" else trial.sources[0 if shown_pick == "A" else 1]
    a, b = (x.strip() for x in trial.answers)
    if pick != "tie" and a and b and a != b:  # an empty or equal answer teaches nothing
        picked = 0 if shown_pick == "A" else 1
        user_pairs.save_ab_pick(
            ws, trial.context, trial.prompt, trial.answers[picked], trial.answers[1 - picked]
        )
    every = ws.get_config(VOTES_KEY) or {}
    every.setdefault(str(export_id), []).append({"sample": trial.index, "prompt": trial.prompt, "pick": pick})
    ws.set_config(VOTES_KEY, every)
    return pick


def win_rate(votes_: list[dict]) -> float | None:
    """The personalized model's share of the user's votes, a tie counting half."""
    if not votes_:
        return None
    score = sum(1.0 if v["pick"] == "personalized" else 0.5 if v["pick"] == "tie" else 0.0 for v in votes_)
    return score / len(votes_)


def next_trial(samples: list[tuple[int, dict]], done: int, rng: random.Random) -> Trial | None:
    """The next of `samples` ((position in the report, sample), as evaluate.unseen_samples gives them) to
    judge, cycling through them, with its answers in a random order."""
    if not samples:
        return None
    index, s = samples[done % len(samples)]
    sources = ("personalized", "base") if rng.random() < 0.5 else ("base", "personalized")
    return Trial(index, s["context"], s["prompt"], (s[sources[0]], s[sources[1]]), sources)
