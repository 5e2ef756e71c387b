"""The MIPO recipe: preference pairs whose positive uses the user's context and whose negative does not.

For a prompt x and the user's context c:
    y+ ~ base(. | c, x)                       the answer with the user's context in the system turn
    y- ~ base(. | c', x)   random-context     c' an unrelated persona (or another of the user's contexts)
    y- ~ base(. | x)       no-context
    y- ~ base(. | c, x')   random-prompt      generic MIPO: the answer to a different prompt
DPO then trains on (prompt=(c, x), chosen=y+, rejected=y-).

With `candidates` K > 1, K answers are sampled per side and the positive with the highest pointwise mutual
information log p(y|c,x) - log p(y|c',x) under the base is kept, and the negative with the lowest.

Every pair has a `pair_key` naming its request; each finished chunk is committed in one transaction, so a
rerun after Ctrl-C or kill -9 skips what is done and regenerates nothing. Seeds derive from the key, so the
same settings give the same pairs whatever ran before.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass

import numpy as np

from . import modelsource
from .chat import chat_format
from .errors import UserInputError
from .personas import negative_pool
from .progress import EtaClock, Log, Progress
from .settings import NEGATIVE_STRATEGIES, PairSettings
from .workspace import Workspace

MAX_TOKENS_RANGE = (1, 4096)
CHUNK_PAIRS = 16  # pairs generated and committed together (kill -9 loses at most one chunk)


@dataclass
class PairPlan:
    key: str
    prompt_id: int
    context_id: int
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
    dropped: int
    skipped_prompts: int


def validate(settings: PairSettings) -> None:
    if settings.strategy not in NEGATIVE_STRATEGIES:
        raise UserInputError(
            f"--strategy must be one of {', '.join(NEGATIVE_STRATEGIES)}, not '{settings.strategy}'."
        )
    lo, hi = MAX_TOKENS_RANGE
    if not lo <= settings.max_tokens <= hi:
        raise UserInputError(f"--max-tokens must be between {lo} and {hi}, not {settings.max_tokens}.")
    if not 0.0 <= settings.temperature <= 5.0:
        raise UserInputError(f"--temperature must be between 0 and 5, not {settings.temperature}.")
    if not 0.0 < settings.top_p <= 1.0:
        raise UserInputError(f"--top-p must be in (0, 1], not {settings.top_p}.")
    if settings.per_prompt < 1 or settings.candidates < 1:
        raise UserInputError("--per-prompt and --candidates must be at least 1.")
    if settings.min_pmi is not None and not settings.score:
        raise UserInputError("--min-pmi needs scoring; drop --no-score.")


def _stable_int(*parts: object) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def plan_pairs(ws: Workspace, settings: PairSettings) -> list[PairPlan]:
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
    )
    plans = []
    for c in contexts:
        pool = negative_pool(c.text, [o.text for o in contexts if o.id != c.id])
        for p in prompts:
            for k in range(settings.per_prompt):
                key = hashlib.sha256(json.dumps([c.text, p.text, k, *recipe]).encode()).hexdigest()[:24]
                rng = np.random.default_rng(_stable_int(key, "plan"))
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
                        _stable_int(key, "seed"),
                    )
                )
    return plans


def _done_keys(ws: Workspace) -> set[str]:
    rows = ws.query("SELECT pair_key FROM pairs UNION SELECT pair_key FROM pair_skips")
    return {r[0] for r in rows}


def generate_pairs(ws: Workspace, settings: PairSettings) -> Generator[Progress | Log, None, PairsSummary]:
    """The `mipo-local pairs` job. Yields progress; returns a summary. Resumable and cancellable."""
    from .engine import Engine, GenRequest  # llama.cpp loads only when a job runs

    validate(settings)
    model = modelsource.base_model(ws)
    plans = plan_pairs(ws, settings)
    with ws.job("pairs", f"mipo-local pairs ({len(plans)} pairs, {settings.strategy})"):
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
        from . import gguf_io

        n_ctx_train = gguf_io.read_info(model.file).context_length or 4096
        prompt_limit = n_ctx_train - settings.max_tokens - 1
        encoded: dict[str, dict[str, list[int]]] = {}
        runnable = []
        for plan in todo:
            ids = {
                "pos": cf.prompt_ids(plan.context, plan.prompt),
                "neg": _negative_prompt_ids(cf, plan),
                "score_neg": cf.prompt_ids(plan.neg_context, plan.prompt),
            }
            longest = max(len(v) for v in ids.values())
            if longest > prompt_limit:
                summary.skipped_prompts += 1
                yield Log(
                    "pairs",
                    f"Skipped prompt {plan.prompt_id} ('{plan.prompt[:40]}...'): {longest} tokens with its context "
                    f"leave no room for a {settings.max_tokens}-token answer in the model's {n_ctx_train}-token window.",
                    level="warning",
                )
                continue
            encoded[plan.key] = ids
            runnable.append(plan)
        if not runnable:
            return summary
        ctx_per_seq = max(len(v) for e in encoded.values() for v in e.values()) + settings.max_tokens + 2
        engine = Engine(model.file, n_seq=settings.batch_size, ctx_per_seq=min(ctx_per_seq, n_ctx_train))
        clock = EtaClock(len(runnable))
        yield clock.event("pairs", 0, unit="pairs")
        # Chunks are cut from the full plan, not from what is left: a resumed run decodes exactly the batches
        # an uninterrupted run would, so its pairs are identical token for token.
        position = {p.key: i // CHUNK_PAIRS for i, p in enumerate(plans)}
        chunks: dict[int, list[PairPlan]] = {}
        for plan in runnable:
            chunks.setdefault(position[plan.key], []).append(plan)
        finished = 0
        try:
            for chunk in chunks.values():
                rows, dropped = _run_chunk(engine, chunk, encoded, settings, model.sha256, GenRequest)
                with ws.transaction() as conn:
                    for row in rows:
                        conn.execute(_INSERT_PAIR, row)
                    for key, reason in dropped:
                        conn.execute(
                            "INSERT OR REPLACE INTO pair_skips(pair_key, reason, created_at) VALUES (?, ?, ?)",
                            (key, reason, time.time()),
                        )
                summary.generated += len(rows)
                summary.dropped += len(dropped)
                finished += len(chunk)
                yield clock.event(
                    "pairs", finished, unit="pairs", kept=summary.generated, dropped=summary.dropped
                )
        finally:
            engine.close()
        return summary


def _negative_prompt_ids(cf, plan: PairPlan) -> list[int]:
    if plan.strategy == "random-context":
        return cf.prompt_ids(plan.neg_context, plan.prompt)
    if plan.strategy == "no-context":
        return cf.prompt_ids(None, plan.prompt)
    return cf.prompt_ids(plan.context, plan.neg_prompt)


_INSERT_PAIR = """
INSERT INTO pairs(pair_key, prompt_id, context_id, prompt, context, neg_context, neg_prompt, strategy, chosen,
                  rejected, seed, settings, scores, pmi_margin, source, created_at)
VALUES (:pair_key, :prompt_id, :context_id, :prompt, :context, :neg_context, :neg_prompt, :strategy, :chosen,
        :rejected, :seed, :settings, :scores, :pmi_margin, 'generated', :created_at)
"""


def _run_chunk(engine, chunk: list[PairPlan], encoded, settings: PairSettings, model_sha: str, GenRequest):
    """Sample, score and select the pairs of one chunk. Returns (rows to insert, [(key, reason) dropped])."""
    k = settings.candidates
    requests = []
    for plan in chunk:
        for side in ("pos", "neg"):
            for j in range(k):
                requests.append(
                    GenRequest(
                        encoded[plan.key][side],
                        max_tokens=settings.max_tokens,
                        temperature=settings.temperature,
                        top_p=settings.top_p,
                        seed=_stable_int(plan.key, side, j, settings.seed),
                        id=(plan.key, side, j),
                    )
                )
    answers = {r.id: r for r in engine.generate(requests)}
    cf_tokens = engine  # scoring uses the same engine (the base model)
    rows, dropped = [], []
    for plan in chunk:
        ids = encoded[plan.key]
        pos = [answers[(plan.key, "pos", j)] for j in range(k)]
        neg = [answers[(plan.key, "neg", j)] for j in range(k)]
        scores = None
        if settings.score or k > 1:
            cands = pos + neg
            # The response tokens scored under both prompts: (c, x) and (c', x) (c' = none for other strategies).
            lp_c = cf_tokens.score_many([(ids["pos"], a.tokens) for a in cands])
            lp_n = cf_tokens.score_many([(ids["score_neg"], a.tokens) for a in cands])
            pmi = [a - b for a, b in zip(lp_c, lp_n, strict=True)]
            best = int(np.argmax(pmi[:k]))
            worst = k + int(np.argmin(pmi[k:]))
            chosen, rejected = cands[best], cands[worst]
            scores = {
                "logp_chosen_c": lp_c[best],
                "logp_chosen_cneg": lp_n[best],
                "logp_rejected_c": lp_c[worst],
                "logp_rejected_cneg": lp_n[worst],
                "pmi_chosen": pmi[best],
                "pmi_rejected": pmi[worst],
                "chosen_tokens": len(chosen.tokens),
                "rejected_tokens": len(rejected.tokens),
            }
        else:
            chosen, rejected = pos[0], neg[0]
        margin = None if scores is None else scores["pmi_chosen"] - scores["pmi_rejected"]
        if settings.min_pmi is not None and margin is not None and margin < settings.min_pmi:
            dropped.append((plan.key, f"pmi margin {margin:.3f} < {settings.min_pmi}"))
            continue
        sampling = {k2: v for k2, v in asdict(settings).items() if k2 not in ("batch_size",)}
        rows.append(
            {
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
                "settings": json.dumps({**sampling, "model_sha256": model_sha}),
                "scores": json.dumps(scores) if scores else None,
                "pmi_margin": margin,
                "created_at": time.time(),
            }
        )
    return rows, dropped
