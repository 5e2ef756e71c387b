"""The MIPO recipe: preference pairs whose positive uses the user's context and whose negative does not.

For a prompt x and the user's context c:
    y+ ~ base(. | c, x)                       the answer with the user's context
    y- ~ base(. | c', x)   random-context     c' an unrelated persona (or another of the user's contexts)
    y- ~ base(. | x)       no-context
    y- ~ base(. | c, x')   random-prompt      generic MIPO: the answer to a different prompt
DPO then trains on (prompt=(c, x), chosen=y+, rejected=y-), with c as the system turn.

Both answers are sampled with their context at the head of the question's turn (`context_turn` "user"), where
a small model follows it far more often than from the system turn, and trained with it in the system turn,
where the user's contexts sit in chat and in the exported Modelfile: the model learns to do from the system
turn what the base does only when the wish stands next to the question.

With `candidates` K > 1, K answers are sampled per side and the positive with the highest pointwise mutual
information log p(y|c,x) - log p(y|c',x) under the base is kept, and the negative with the lowest.

With `guidance` g > 0 the same quantity steers every sampled token of the positive (context-contrastive
decoding): y+ is drawn from p(y|c,x) [p(y|c,x) / p(y|c',x)]^g, c' being the pair's negative context (none for
no-context and random-prompt). A small model that barely follows its system turn then writes positives that
carry the user's wishes far more often (bench/README.md has the numbers), which is what DPO needs to learn.

Every pair has a `pair_key` naming its request; each finished chunk is committed in one transaction, so a
rerun after Ctrl-C or kill -9 skips what is done and regenerates nothing. Seeds derive from the key, so the
same settings give the same pairs whatever ran before.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from . import candidates, modelsource, rounds
from .chat import chat_format
from .errors import UserInputError
from .pairs_progress import PairsMeter
from .personas import negative_pool
from .progress import Log, Progress
from .rounds import Sampler
from .settings import CONTEXT_TURNS, NEGATIVE_STRATEGIES, PairSettings
from .validation import require_number, require_seed
from .workspace import Workspace

MAX_TOKENS_RANGE = (1, 4096)
CHUNK_PAIRS = 16  # pairs generated and committed together (kill -9 loses at most one chunk)
PMI_DROP = "pmi margin"  # how a --min-pmi drop's reason begins in pair_skips


@dataclass
class PairPlan:
    key: str
    prompt_id: int | None
    context_id: int | None
    prompt: str
    context: str
    neg_context: str | None
    neg_prompt: str | None
    strategy: str
    seed: int


@dataclass
class PairsSummary:
    planned: int
    already_done: int
    generated: int
    dropped: int  # by --min-pmi
    skipped_prompts: int
    degenerate: int = 0  # degenerate positive candidates passed over (loops, empty, echoes)
    resampled: int = 0  # pairs whose positives were sampled again because every candidate was degenerate
    dropped_degenerate: int = 0  # pairs dropped because every positive stayed degenerate


def describe(s: PairsSummary) -> str:
    """The summary as one sentence, for the CLI and the app."""
    parts = [f"{s.already_done} already done"]
    if s.dropped:
        parts.append(f"{s.dropped} dropped by --min-pmi")
    if s.degenerate:
        parts.append(
            f"{s.degenerate} degenerate positives passed over ({s.resampled} pairs sampled again, "
            f"{s.dropped_degenerate} dropped)"
        )
    if s.skipped_prompts:
        parts.append(f"{s.skipped_prompts} prompts skipped")
    return f"{s.generated} new pairs ({', '.join(parts)})"


def validate(settings: PairSettings) -> None:
    if settings.context_turn not in CONTEXT_TURNS:
        raise UserInputError(
            f"--context-turn must be one of {', '.join(CONTEXT_TURNS)}, not '{settings.context_turn}'."
        )
    if settings.strategy not in NEGATIVE_STRATEGIES:
        raise UserInputError(
            f"--strategy must be one of {', '.join(NEGATIVE_STRATEGIES)}, not '{settings.strategy}'."
        )
    lo, hi = MAX_TOKENS_RANGE
    if not lo <= settings.max_tokens <= hi:
        raise UserInputError(f"--max-tokens must be between {lo} and {hi}, not {settings.max_tokens}.")
    if not 0.0 <= settings.temperature <= 5.0:
        raise UserInputError(f"--temperature must be between 0 and 5, not {settings.temperature}.")
    if not 0.0 <= settings.guidance <= 10.0:
        raise UserInputError(f"--guidance must be between 0 and 10, not {settings.guidance}.")
    if not 0.0 < settings.top_p <= 1.0:
        raise UserInputError(f"--top-p must be in (0, 1], not {settings.top_p}.")
    for flag, value in (("--per-prompt", settings.per_prompt), ("--candidates", settings.candidates)):
        if not 1 <= value <= 64:
            raise UserInputError(f"{flag} must be between 1 and 64, not {value}.")
    require_number("--repeat-penalty", settings.repeat_penalty, 1.0, 2.0)
    if not 1 <= settings.batch_size <= 256:
        raise UserInputError(f"The batch size must be between 1 and 256, not {settings.batch_size}.")
    if settings.min_pmi is not None and not settings.score:
        raise UserInputError("--min-pmi needs scoring; drop --no-score.")
    require_number("--min-pmi", settings.min_pmi, -1e6, 1e6)
    require_seed("--seed", settings.seed)


def stored_settings(stored: dict) -> PairSettings:
    """The PairSettings a pair or job recorded, without the keys this version does not know. A record
    without `context_turn` was sampled with the context in the system turn."""
    known = {f.name for f in fields(PairSettings)}
    return PairSettings(**{"context_turn": "system", **{k: v for k, v in stored.items() if k in known}})


def plan_pairs(ws: Workspace, settings: PairSettings, sampler: Sampler | None = None) -> list[PairPlan]:
    """Every pair these settings ask for, in a stable order, with its negative chosen by a keyed seed."""
    contexts = ws.contexts()
    prompts = ws.prompts()
    if not contexts:
        raise UserInputError("There are no contexts yet.", hint='Add one: mipo-local context add "I am ..."')
    if not prompts:
        raise UserInputError(
            "There are no prompts yet.", hint="Add some: mipo-local prompts add ... or prompts synth --n 16"
        )
    if settings.strategy == "random-prompt" and len(prompts) < 2:
        raise UserInputError("The random-prompt strategy needs at least two prompts.")
    recipe = (
        settings.strategy,
        settings.temperature,
        settings.top_p,
        settings.max_tokens,
        settings.candidates,
        settings.seed,
        *([settings.guidance] if settings.guidance else []),  # keys of unguided pairs stay as they were
        *([f"rp{settings.repeat_penalty}"] if settings.repeat_penalty != 1.0 else []),
        *([f"turn-{settings.context_turn}"] if settings.context_turn != "system" else []),
        *(sampler.key_parts() if sampler else ()),  # a later round's pairs are new requests
    )
    plans: list[PairPlan] = []
    seen: set[str] = set()  # two contexts with the same text ask for the same pairs once
    for c in contexts:
        pool = negative_pool(c.text, [o.text for o in contexts if o.id != c.id])
        for p in prompts:
            for k in range(settings.per_prompt):
                key = hashlib.sha256(json.dumps([c.text, p.text, k, *recipe]).encode()).hexdigest()[:24]
                if key in seen:
                    continue
                seen.add(key)
                rng = np.random.default_rng(candidates.stable_int(key, "plan"))
                neg_context = neg_prompt = None
                if settings.strategy == "random-context":
                    neg_context = pool[int(rng.integers(len(pool)))]
                elif settings.strategy == "random-prompt":
                    others = [q.text for q in prompts if q.id != p.id]
                    neg_prompt = others[int(rng.integers(len(others)))]
                plans.append(
                    PairPlan(
                        key,
                        p.id,
                        c.id,
                        p.text,
                        c.text,
                        neg_context,
                        neg_prompt,
                        settings.strategy,
                        candidates.stable_int(key, "seed"),
                    )
                )
    return plans


def _done_keys(ws: Workspace) -> set[str]:
    rows = ws.query("SELECT pair_key FROM pairs UNION SELECT pair_key FROM pair_skips")
    return {r[0] for r in rows}


@dataclass
class PairsOutlook:
    """What `generate_pairs` would do with some settings, known before any model loads."""

    todo: int  # pairs it would sample
    unpaired: int  # (context, prompt) combinations with no pair yet, under any settings

    @property
    def another_batch(self) -> bool:
        """Every prompt has its pairs already, yet these settings would sample more (a second batch)."""
        return self.todo > 0 and self.unpaired == 0


def outlook(ws: Workspace, settings: PairSettings) -> PairsOutlook:
    """Count what `generate_pairs(ws, settings)` would sample. Raises what planning raises."""
    validate(settings)
    plans = plan_pairs(ws, settings)
    done = _done_keys(ws)
    have = {(r["context"], r["prompt"]) for r in ws.query("SELECT context, prompt FROM pairs")}
    return PairsOutlook(
        todo=sum(p.key not in done for p in plans),
        unpaired=len({(p.context, p.prompt) for p in plans} - have),
    )


def _revisit_skips(ws: Workspace, keys: set[str], min_pmi: float | None) -> int:
    """Pairs an earlier --min-pmi dropped that this threshold keeps come back from their stored text (no
    sampling); a drop recorded without its text is forgotten, so the pair is sampled again. Returns how
    many were restored."""
    restored = 0
    with ws.transaction() as conn:
        for row in conn.execute("SELECT pair_key, reason, pair_row FROM pair_skips").fetchall():
            if row["pair_key"] not in keys or not row["reason"].startswith(PMI_DROP):
                continue  # a plan whose positives were all degenerate stays dropped: its seeds are fixed
            pair = json.loads(row["pair_row"]) if row["pair_row"] else None
            if pair is not None and min_pmi is not None and pair["pmi_margin"] < min_pmi:
                continue  # still below the threshold: stays dropped
            if pair is not None:
                conn.execute(_INSERT_PAIR, pair)
                restored += 1
            conn.execute("DELETE FROM pair_skips WHERE pair_key = ?", (row["pair_key"],))
    return restored


def generate_pairs(
    ws: Workspace, settings: PairSettings, from_run: str | None = None
) -> Generator[Progress | Log, None, PairsSummary]:
    """The `mipo-local pairs` job. Yields progress; returns a summary. Resumable and cancellable."""
    from . import gguf_io
    from .engine import Engine  # llama.cpp loads only when a job runs

    validate(settings)
    model = modelsource.base_model(ws)
    sampler = rounds.sampler_for(ws, from_run)
    plans = plan_pairs(ws, settings, sampler)
    with ws.job(
        "pairs", f"mipo-local pairs ({len(plans)} pairs, round {sampler.round}, {settings.strategy})"
    ):
        if sampler.run is not None:
            yield Log("pairs", f"Round {sampler.round}: sampling from {sampler.label}.")
        restored = _revisit_skips(ws, {p.key for p in plans}, settings.min_pmi)
        if restored:
            yield Log("pairs", f"Restored {restored} pairs that a higher --min-pmi had dropped.")
        done = _done_keys(ws)
        todo = [p for p in plans if p.key not in done]
        summary = PairsSummary(len(plans), len(plans) - len(todo), 0, 0, 0)
        if summary.already_done:
            yield Log(
                "pairs",
                f"{summary.already_done} of {len(plans)} pairs already done; continuing with the rest.",
            )
        if not todo:
            return summary
        cf = chat_format(str(model.file))
        n_ctx_train = gguf_io.read_info(model.file).context_length or 4096
        prompt_limit = n_ctx_train - settings.max_tokens - 1
        # Every plan is encoded, done ones too: the engine's shape then depends on the plan alone, so a resumed
        # run decodes exactly what an uninterrupted one would.
        encoded = {plan.key: _encode(cf, plan, settings.context_turn) for plan in plans}
        # The fit is a property of each plan (its context, question and negative), not of the prompt: one
        # long context must not cost every other context its pairs.
        too_long = {p.key for p in plans if max(map(len, encoded[p.key].values())) > prompt_limit}
        reported = set()
        for plan in plans:
            if plan.key in too_long and (plan.context_id, plan.prompt_id) not in reported:
                reported.add((plan.context_id, plan.prompt_id))
                yield Log(
                    "pairs",
                    f"Skipped prompt {plan.prompt_id} ('{plan.prompt[:40]}') with context {plan.context_id} "
                    f"('{plan.context[:40]}'): together they leave no room for a {settings.max_tokens}-token "
                    f"answer in the model's {n_ctx_train}-token window.",
                    level="warning",
                )
        summary.skipped_prompts = len(reported)
        runnable = [p for p in todo if p.key not in too_long]
        if not runnable:
            return summary
        fitting = [e for p in plans if p.key not in too_long for e in encoded[p.key].values()]
        ctx_per_seq = min(max(map(len, fitting)) + settings.max_tokens + 2, n_ctx_train)
        # Chunks are cut from the full plan, not from what is left, for the same reason.
        position = {p.key: i // CHUNK_PAIRS for i, p in enumerate(plans)}
        chunks: dict[int, list[PairPlan]] = {}
        for plan in runnable:
            chunks.setdefault(position[plan.key], []).append(plan)
        meter = PairsMeter(len(runnable), len(chunks))
        yield meter.loading()
        engine = Engine(
            model.file, n_seq=settings.batch_size, ctx_per_seq=ctx_per_seq, lora_path=sampler.adapter
        )
        try:
            for chunk in chunks.values():
                meter.start_chunk(len(chunk))
                counts = dict(kept=summary.generated, dropped=summary.dropped)
                steps = _chunk_steps(engine, chunk, encoded, settings, model.sha256, summary, sampler)
                rows, dropped = yield from _relay(steps, lambda step, c=counts: meter.step(step, **c))
                with ws.transaction() as conn:
                    for row in rows:
                        conn.execute(_INSERT_PAIR, row)
                    for key, reason, row in dropped:
                        conn.execute(
                            "INSERT OR REPLACE INTO pair_skips(pair_key, reason, created_at, min_pmi, pair_row)"
                            " VALUES (?, ?, ?, ?, ?)",
                            (
                                key,
                                reason,
                                time.time(),
                                settings.min_pmi if row else None,
                                json.dumps(row) if row else None,
                            ),
                        )
                summary.generated += len(rows)
                summary.dropped += sum(row is not None for _, _, row in dropped)
                summary.dropped_degenerate += sum(row is None for _, _, row in dropped)
                yield meter.committed(len(chunk), kept=summary.generated, dropped=summary.dropped)
        finally:
            engine.close()
        return summary


def _encode(cf, plan: PairPlan, context_turn: str) -> dict[str, list[int]]:
    """Prompt ids of the positive, the negative, and the negative context used for guidance and scoring,
    with every context in `context_turn` (settings.PairSettings.context_turn)."""

    def ids(context: str | None, prompt: str) -> list[int]:
        return cf.prompt_ids(context, prompt, context_turn=context_turn)

    if plan.strategy == "random-context":
        neg = ids(plan.neg_context, plan.prompt)
    elif plan.strategy == "no-context":
        neg = ids(None, plan.prompt)
    else:
        neg = ids(plan.context, plan.neg_prompt)
    return {
        "pos": ids(plan.context, plan.prompt),
        "neg": neg,
        "score_neg": ids(plan.neg_context, plan.prompt),
    }


_INSERT_PAIR = """
INSERT INTO pairs(pair_key, prompt_id, context_id, prompt, context, neg_context, neg_prompt, strategy, chosen,
                  rejected, seed, settings, scores, pmi_margin, source, round, sampler, created_at)
VALUES (:pair_key, :prompt_id, :context_id, :prompt, :context, :neg_context, :neg_prompt, :strategy, :chosen,
        :rejected, :seed, :settings, :scores, :pmi_margin, 'generated', :round, :sampler, :created_at)
"""


def _relay(steps: Generator, event: Callable):
    """Yield `event(step)` for each step of `steps`; returns what `steps` returns."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        yield event(step)


def _chunk_steps(
    engine,
    chunk: list[PairPlan],
    encoded,
    settings: PairSettings,
    model_sha: str,
    stats=None,
    sampler: Sampler | None = None,
):
    """Sample, score and select the pairs of one chunk (candidates.choose_steps), yielding its steps.

    Returns (rows to insert, [(key, reason, row or None) dropped]); `stats` (a PairsSummary) counts the
    degenerate positives passed over."""
    items = [
        candidates.Item(plan.key, encoded[plan.key]["pos"], encoded[plan.key]["neg"],
                        encoded[plan.key]["score_neg"], plan.context, plan.prompt)
        for plan in chunk
    ]  # fmt: skip
    choices = yield from candidates.choose_steps(engine, items, settings)
    sampler_info = {"sampler_adapter_sha256": sampler.adapter_sha256} if sampler and sampler.run else {}
    rows, dropped = [], []
    for plan in chunk:
        choice = choices[plan.key]
        if stats is not None:
            stats.degenerate += len(choice.degenerate)
            stats.resampled += choice.attempts > 1
        if choice.chosen is None:
            kinds = ", ".join(sorted(set(choice.degenerate)))
            dropped.append((plan.key, f"every positive was degenerate ({kinds})", None))
            continue
        chosen, rejected, scores = choice.chosen, choice.rejected, choice.scores
        margin = None if scores is None else scores["pmi_chosen"] - scores["pmi_rejected"]
        sampling = {k2: v for k2, v in asdict(settings).items() if k2 not in ("batch_size",)}
        row = {
            "pair_key": plan.key,
            "prompt_id": plan.prompt_id,
            "context_id": plan.context_id,
            "prompt": plan.prompt,
            "context": plan.context,
            "neg_context": plan.neg_context,
            "neg_prompt": plan.neg_prompt,
            "strategy": plan.strategy,
            "chosen": chosen.text.strip(),
            "rejected": rejected.text.strip(),
            "seed": plan.seed,
            "settings": json.dumps({**sampling, "model_sha256": model_sha, **sampler_info}),
            "scores": json.dumps(scores) if scores else None,
            "pmi_margin": margin,
            "round": sampler.round if sampler else 1,
            "sampler": sampler.run if sampler else None,
            "created_at": time.time(),
        }
        if settings.min_pmi is not None and margin is not None and margin < settings.min_pmi:
            dropped.append((plan.key, f"{PMI_DROP} {margin:.3f} < {settings.min_pmi}", row))
        else:
            rows.append(row)
    return rows, dropped


def regenerate_pair(
    ws: Workspace, pair_id: int, seed: int | None = None
) -> Generator[Progress | Log, None, int]:
    """Sample one pair again with a fresh seed (or `seed`), keeping its prompt, contexts and settings.

    The row keeps its id and pair_key (so `pairs` never generates it a second time) and records the new
    seed, so the new answers can be reproduced. Returns the new sampling seed. Imported pairs have no
    recipe to rerun and are refused.
    """
    import secrets

    from .pairs_store import get_pair

    old = get_pair(ws, pair_id)
    if old.source != "generated":
        what = "made by you" if old.source == "user" else "imported"
        raise UserInputError(f"Pair {pair_id} was {what}; only generated pairs can be regenerated.")
    sampler = rounds.sampler_for(ws, old.sampler)  # a later round's pair is sampled by its round's model
    settings = stored_settings(old.settings)
    seed = secrets.randbelow(2**31) if seed is None else seed
    # The user asked for this pair: keep it whatever its PMI margin (no min-pmi filter here).
    settings = replace(settings, seed=seed, min_pmi=None)
    validate(settings)
    model = modelsource.base_model(ws)
    plan = PairPlan(
        old.pair_key,
        None,  # prompt_id / context_id stay as they are in the row
        None,
        old.prompt,
        old.context,
        old.neg_context,
        old.neg_prompt,
        old.strategy,
        candidates.stable_int(old.pair_key, "seed", seed),
    )
    with ws.job("pairs", f"mipo-local pairs regenerate {pair_id}"):
        yield Log("pairs", f"Regenerating pair {pair_id} with seed {seed}.")
        meter = PairsMeter(1, 1)
        yield meter.loading()
        with _plan_engine(model, plan, settings, sampler) as (engine, encoded):
            meter.start_chunk(1)
            steps = _chunk_steps(engine, [plan], encoded, settings, model.sha256, sampler=sampler)
            rows, _ = yield from _relay(steps, meter.step)
        if not rows:
            raise UserInputError(
                f"Every answer sampled for pair {pair_id} with seed {seed} was degenerate (a loop or an "
                "echo); try again for another seed."
            )
        row = rows[0]
        with ws.transaction() as conn:
            # A user pair is never overwritten: one reviewed meanwhile (another process) keeps its answers.
            updated = conn.execute(
                "UPDATE pairs SET chosen = :chosen, rejected = :rejected, seed = :seed, settings = :settings,"
                " scores = :scores, pmi_margin = :pmi_margin, created_at = :created_at"
                " WHERE id = :id AND source = 'generated'",
                {**row, "id": pair_id},
            ).rowcount
            if updated:  # new answers: the cached reference log-probs describe the old ones
                conn.execute("DELETE FROM ref_logps WHERE pair_id = ?", (pair_id,))
        if not updated:  # deleted or reviewed by another process meanwhile: nothing to put the answers in
            raise UserInputError(f"Pair {pair_id} was deleted or reviewed while it was being regenerated.")
        yield meter.committed(1)
    return seed


def sample_choice(model, plan: PairPlan, settings: PairSettings) -> candidates.Choice:
    """The two answers of one plan as candidates.choose gives them (a positive of None: all degenerate),
    for a caller that needs one side only."""
    with _plan_engine(model, plan, settings, None) as (engine, encoded):
        key = plan.key
        item = candidates.Item(key, encoded[key]["pos"], encoded[key]["neg"], encoded[key]["score_neg"],
                               plan.context, plan.prompt)  # fmt: skip
        return candidates.choose(engine, [item], settings)[key]


@contextmanager
def _plan_engine(model, plan: PairPlan, settings: PairSettings, sampler: Sampler | None):
    """An engine sized for one plan's candidates, with the plan's prompt ids."""
    from .engine import Engine

    cf = chat_format(str(model.file))
    encoded = {plan.key: _encode(cf, plan, settings.context_turn)}
    longest = max(map(len, encoded[plan.key].values()))
    with Engine(
        model.file,
        n_seq=2 * settings.candidates * (2 if settings.guidance else 1),
        ctx_per_seq=longest + settings.max_tokens + 2,
        lora_path=sampler.adapter if sampler else None,
    ) as engine:
        yield engine, encoded
