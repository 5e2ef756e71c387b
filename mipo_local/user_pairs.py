"""The user's own choices as preference pairs (source = 'user'): reviewed pairs, thumbs in chat, A/B picks.

A user pair records where it came from in `origin`: `review` (a generated pair the user kept, swapped or
rewrote), `chat` (an answer marked good or bad in chat) or `ab` (a pick in the blind comparison). It is
never overwritten by `pairs regenerate` or a rerun of `pairs` (its pair_key stays taken), and training
reads it with its own weight (train/loop.py). Every change is one transaction.

Chat turns become single-turn pairs: the prompt is the user's last message, the context the user's
contexts (the system turn MIPO trains under), whatever the conversation before it was.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace

import numpy as np

from . import candidates, modelsource
from .errors import UserInputError
from .pairs import PairPlan, sample_choice, stored_settings
from .pairs_store import Pair, get_pair
from .personas import negative_pool
from .settings import PairSettings
from .validation import ANSWER_CHARS_MAX, check_text
from .workspace import Workspace

USER = "user"
ORIGINS = ("review", "chat", "ab")
REVIEW_ACTIONS = ("keep", "drop", "swap", "edit")
USER_STRATEGY = "user"  # the strategy of a pair the user wrote or picked (no MIPO negative recipe)
DROPPED = "dropped by you"  # pair_skips reason: a rerun of `pairs` never samples a dropped pair again


def list_user_pairs(ws: Workspace) -> list[Pair]:
    return [Pair.from_row(r) for r in ws.query("SELECT * FROM pairs WHERE source = ? ORDER BY id", (USER,))]


def count_user_pairs(ws: Workspace) -> int:
    return ws.query("SELECT COUNT(*) AS n FROM pairs WHERE source = ?", (USER,))[0]["n"]


def remove_user_pair(ws: Workspace, pair_id: int) -> None:
    with ws.transaction() as conn:
        row = conn.execute("SELECT source FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        if row is None or row["source"] != USER:
            raise UserInputError(
                f"There is no pair of yours with id {pair_id} (see `mipo-local feedback list`)."
            )
        conn.execute("DELETE FROM pairs WHERE id = ?", (pair_id,))


def review_pair(ws: Workspace, pair_id: int, action: str, chosen: str | None = None) -> Pair | None:
    """Keep, drop, swap or edit (a new chosen answer) pair `pair_id`; returns the stored pair (None when
    dropped). A kept, swapped or edited pair becomes the user's; a dropped one is deleted and remembered,
    so no rerun of `pairs` samples it again."""
    if action not in REVIEW_ACTIONS:
        raise ValueError(action)
    if action == "edit":
        chosen = check_text(chosen or "", "The chosen answer", ANSWER_CHARS_MAX, "write the answer you want")
    with ws.transaction() as conn:
        row = conn.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        if row is None:
            raise UserInputError(f"There is no pair with id {pair_id}.")
        if action == "drop":
            conn.execute("DELETE FROM pairs WHERE id = ?", (pair_id,))
            conn.execute(
                "INSERT OR REPLACE INTO pair_skips(pair_key, reason, created_at) VALUES (?, ?, ?)",
                (row["pair_key"], DROPPED, time.time()),
            )
            return None
        values = {"id": pair_id, "chosen": row["chosen"], "rejected": row["rejected"],
                  "scores": row["scores"], "pmi_margin": row["pmi_margin"]}  # fmt: skip
        if action == "swap":
            values.update(
                chosen=row["rejected"], rejected=row["chosen"], scores=_swapped_scores(row["scores"])
            )
            values["pmi_margin"] = None if row["pmi_margin"] is None else -row["pmi_margin"]
        elif action == "edit":
            if chosen == row["rejected"]:
                raise UserInputError(
                    "The chosen answer is the same as the rejected one; write a different one."
                )
            # The scores measured the sampled answer, not this one.
            values.update(chosen=chosen, scores=None, pmi_margin=None)
        conn.execute(
            "UPDATE pairs SET chosen = :chosen, rejected = :rejected, scores = :scores, pmi_margin = :pmi_margin,"
            " source = 'user', origin = COALESCE(origin, 'review') WHERE id = :id",
            values,
        )
        if action in ("swap", "edit"):  # cached reference log-probs describe the old answers
            conn.execute("DELETE FROM ref_logps WHERE pair_id = ?", (pair_id,))
    return get_pair(ws, pair_id)


def _swapped_scores(raw: str | None) -> str | None:
    """A pair's scores with its two answers' roles exchanged (both were scored under c and c')."""
    if not raw:
        return raw
    s = json.loads(raw)
    swap = {"logp_chosen_c": "logp_rejected_c", "logp_chosen_cneg": "logp_rejected_cneg",
            "pmi_chosen": "pmi_rejected", "chosen_tokens": "rejected_tokens"}  # fmt: skip
    swap.update({v: k for k, v in swap.items()})
    return json.dumps({swap.get(k, k): v for k, v in s.items()})


def add_user_pair(
    ws: Workspace,
    *,
    origin: str,
    context: str,
    prompt: str,
    chosen: str,
    rejected: str,
    identity: list,
    neg_context: str | None = None,
    strategy: str = USER_STRATEGY,
    settings: dict | None = None,
) -> Pair:
    """Store one choice of the user. `identity` names the choice (e.g. the judged answer): the same choice
    made again replaces the earlier answers, since the latest is what the user wants now."""
    if origin not in ORIGINS:
        raise ValueError(origin)
    chosen = check_text(chosen, "The chosen answer", ANSWER_CHARS_MAX, "write the answer you want")
    rejected = check_text(rejected, "The rejected answer", ANSWER_CHARS_MAX)
    if chosen == rejected:
        raise UserInputError("The chosen answer is the same as the rejected one; write a different one.")
    digest = hashlib.sha256(json.dumps([origin, context, prompt, *identity]).encode()).hexdigest()[:24]
    row = {
        "pair_key": f"user-{origin}-{digest}",
        "prompt": prompt,
        "context": context,
        "neg_context": neg_context,
        "strategy": strategy,
        "chosen": chosen,
        "rejected": rejected,
        "seed": 0,
        "settings": json.dumps(settings or {}),
        "origin": origin,
        "created_at": time.time(),
    }
    with ws.transaction() as conn:
        conn.execute(
            "INSERT INTO pairs(pair_key, prompt, context, neg_context, strategy, chosen, rejected, seed, settings,"
            " source, origin, created_at) VALUES (:pair_key, :prompt, :context, :neg_context, :strategy,"
            " :chosen, :rejected, :seed, :settings, 'user', :origin, :created_at)"
            " ON CONFLICT(pair_key) DO UPDATE SET chosen = excluded.chosen, rejected = excluded.rejected,"
            " neg_context = excluded.neg_context, strategy = excluded.strategy, settings = excluded.settings",
            row,
        )
        pair_id = conn.execute("SELECT id FROM pairs WHERE pair_key = ?", (row["pair_key"],)).fetchone()[0]
        conn.execute("DELETE FROM ref_logps WHERE pair_id = ?", (pair_id,))  # a replaced choice: new answers
    return get_pair(ws, pair_id)


# -- chat thumbs ------------------------------------------------------------------------------------------


def user_context(ws: Workspace) -> str:
    """The context a chat pair trains under: the user's contexts, as the chat's system turn has them."""
    from .conversation import system_from_contexts

    system = system_from_contexts(ws)
    if not system:
        raise UserInputError(
            "There are no contexts yet, so a chat answer cannot become a pair.",
            hint='Add one: mipo-local context add "I am ..."',
        )
    return system


def pair_settings(ws: Workspace) -> PairSettings:
    """How the workspace samples its pairs: the recipe of its newest generated pair (defaults before any)."""
    rows = ws.query("SELECT settings FROM pairs WHERE source = 'generated' ORDER BY id DESC LIMIT 1")
    if not rows:
        return PairSettings()
    return replace(stored_settings(json.loads(rows[0]["settings"])), min_pmi=None)


def _mipo_plan(ws: Workspace, context: str, prompt: str, answer: str) -> PairPlan:
    """A random-context plan for `prompt`, as `pairs` makes them, keyed by the judged `answer` (the same
    judgement samples the same answers)."""
    key = hashlib.sha256(json.dumps(["chat", context, prompt, answer]).encode()).hexdigest()[:24]
    pool = negative_pool(context, [c.text for c in ws.contexts() if c.text != context])
    neg_context = pool[int(np.random.default_rng(candidates.stable_int(key, "plan")).integers(len(pool)))]
    return PairPlan(key, None, None, prompt, context, neg_context, None, "random-context",
                    candidates.stable_int(key, "seed"))  # fmt: skip


def save_chat_good(ws: Workspace, prompt: str, good: str) -> Pair:
    """A good answer is the chosen one; its rejected side is sampled by the base under a random context, as
    MIPO samples its negatives."""
    context = user_context(ws)
    plan, settings, model = (
        _mipo_plan(ws, context, prompt, good),
        pair_settings(ws),
        modelsource.base_model(ws),
    )
    rejected = sample_choice(model, plan, settings).rejected.text
    recipe = {**asdict(settings), "model_sha256": model.sha256}
    return add_user_pair(ws, origin="chat", context=context, prompt=prompt, chosen=good, rejected=rejected,
                         identity=["good", good], neg_context=plan.neg_context, strategy="random-context",
                         settings=recipe)  # fmt: skip


def sample_better(ws: Workspace, prompt: str, bad: str) -> str:
    """A fresh positive for a bad answer, sampled by the base under the user's context as `pairs` samples
    positives (shown to the user, who accepts it or not)."""
    plan = _mipo_plan(ws, user_context(ws), prompt, bad)
    chosen = sample_choice(modelsource.base_model(ws), plan, pair_settings(ws)).chosen
    if chosen is None:
        raise UserInputError(
            "Every answer the base model sampled for this message was degenerate (a loop or an echo); "
            "write the answer you wanted with /better TEXT."
        )
    return chosen.text.strip()


def save_chat_better(ws: Workspace, prompt: str, bad: str, better: str) -> Pair:
    """A bad answer and the one the user wanted (written, or sampled and accepted) make a pair."""
    return add_user_pair(ws, origin="chat", context=user_context(ws), prompt=prompt, chosen=better, rejected=bad,
                         identity=["bad", bad])  # fmt: skip


# -- blind A/B --------------------------------------------------------------------------------------------


def save_ab_pick(ws: Workspace, context: str, prompt: str, picked: str, other: str) -> Pair:
    """A pick in the blind comparison: chosen = the picked answer. Voting on the same two answers again
    replaces the earlier pick."""
    return add_user_pair(ws, origin="ab", context=context, prompt=prompt, chosen=picked, rejected=other,
                         identity=sorted([picked, other]))  # fmt: skip
