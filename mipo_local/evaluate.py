"""Measure what personalization changed, always on the exported GGUF through llama.cpp.

Against the base model, on the run's held-out pairs and prompts:
  - pair accuracy and mean DPO margin: beta * [(log pi - log ref)(y+) - (log pi - log ref)(y-)], pi = export;
  - context sensitivity: the mean pointwise MI under the base, log p(y|c,x) - log p(y|c',x), of answers
    sampled from the personalized model and from the base (c' an unrelated persona): what MIPO maximizes;
  - drift: mean per-token log-prob of a fixed neutral text set under both models (damage detector);
  - judge (optional): a judge GGUF scores each answer 1-5 for how well it addresses the user's context;
    personalized vs base is a win, tie or loss per prompt. The judge prompt is JUDGE_PROMPT below.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from . import gguf_io, modelsource
from .chat import chat_format
from .engine import DecodeStep, GenRequest, Penalties
from .errors import ModelError, UserInputError, WorkspaceError
from .fsutil import atomic_write_text
from .personas import negative_pool
from .progress import Log, PhaseMeter, Progress, drain
from .settings import EvalSettings
from .train import runs
from .validation import require_int, require_seed
from .workspace import Workspace

JUDGE_PROMPT = (
    "You are judging how well an assistant's answer fits one specific user.\n\n"
    "The user describes themselves like this:\n{context}\n\n"
    "The user asked:\n{prompt}\n\n"
    "The assistant answered:\n{answer}\n\n"
    "On a scale from 1 (ignores who the user is) to 5 (perfectly tailored to this user and their wishes), "
    "how well does the answer address this user? Reply with one digit."
)


@dataclass
class ModelScores:
    pmi: float  # mean log p(y|c,x) - log p(y|c',x) under the base, of this model's own answers
    neutral_logp: float  # mean per-token log-prob of the neutral set
    judge: float | None = None


@dataclass
class EvalReport:
    export_id: int
    run: str
    n_pairs: int
    n_prompts: int
    pair_accuracy: float
    mean_margin: float
    base: ModelScores
    personalized: ModelScores
    drift: float  # relative change of the neutral set's mean log-prob (positive = worse)
    judge: dict | None = None  # {"win": n, "tie": n, "loss": n, "model": path}
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def neutral_set() -> list[tuple[str, str]]:
    text = resources.files("mipo_local").joinpath("data", "neutral.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(r["prompt"], r["response"]) for r in rows]


def latest_export(ws: Workspace, export_id: int | None = None) -> dict:
    """An export row (newest if no id), with a clear error when there is none."""
    if export_id is None:
        rows = ws.query("SELECT * FROM exports ORDER BY id DESC LIMIT 1")
        if not rows:
            raise WorkspaceError("There is no export to evaluate yet.", hint="Run `mipo-local export` first.")
    else:
        rows = ws.query("SELECT * FROM exports WHERE id = ?", (export_id,))
        if not rows:
            raise UserInputError(f"There is no export with id {export_id}.")
    row = dict(rows[0])
    row["info"] = json.loads(row["info"]) if row.get("info") else {}
    if not Path(row["path"]).is_file():
        raise WorkspaceError(
            f"The exported file {row['path']} is missing.", hint="Export again with `mipo-local export`."
        )
    return row


def export_engine_args(ws: Workspace, export: dict) -> tuple[Path, Path | None]:
    """(model file, adapter file or None) that llama.cpp loads for an export."""
    if export["kind"] == "adapter":
        return modelsource.base_model(ws).file, Path(export["path"])
    return Path(export["path"]), None


def check_judge_file(path: Path) -> None:
    """Say before loading when a judge file is not a GGUF or would not fit in memory."""
    gguf_io.read_info(path, check_arch=False)
    size = path.stat().st_size
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if size * 1.2 > available:
        raise ModelError(
            f"The judge model {path} needs about {size * 1.2 / 1e9:.1f} GB of memory; {available / 1e9:.1f} GB are free."
        )


def validate(settings: EvalSettings) -> None:
    """Raise UserInputError naming the first bad setting."""
    if settings.n < 1:
        raise UserInputError(f"--n must be at least 1, not {settings.n}.")
    require_int("--n", settings.n, 1, 1000)
    require_seed("--seed", settings.seed)
    if not 1 <= settings.max_tokens <= 4096:
        raise UserInputError(f"--max-tokens must be between 1 and 4096, not {settings.max_tokens}.")
    if not 0.0 <= settings.temperature <= 5.0:
        raise UserInputError(f"The temperature must be between 0 and 5, not {settings.temperature}.")
    if not 0.0 < settings.top_p <= 1.0:
        raise UserInputError(f"top_p must be in (0, 1], not {settings.top_p}.")


def _answers_steps(engine, cf, items, settings: EvalSettings) -> Generator[DecodeStep, None, list[str]]:
    """Sample one answer per (context, prompt), yielding the engine's DecodeSteps; returns the answers."""
    reqs = [
        GenRequest(cf.prompt_ids(c, x), max_tokens=settings.max_tokens, temperature=settings.temperature,
                   top_p=settings.top_p, seed=settings.seed + i, id=i, top_k=settings.top_k,
                   penalties=Penalties(settings.repeat_penalty, settings.repeat_last_n))
        for i, (c, x) in enumerate(items)
    ]  # fmt: skip
    out = {}
    for item in engine.generate_steps(reqs):
        if isinstance(item, DecodeStep):
            yield item
        else:
            out[item.id] = item.text.strip()
    return [out[i] for i in range(len(items))]


def judge_answers_steps(
    path: Path, items, answers_a, answers_b
) -> Generator[DecodeStep, None, tuple[list[int], list[int]]]:
    """The judge's 1-5 score of each answer of both lists, yielding a step after each answer judged."""
    from .engine import Engine

    cf = chat_format(str(path))
    digits = [cf.tokenizer.encode_text(str(d)) for d in range(1, 6)]
    total, judged = 2 * len(items), 0
    with Engine(path, n_seq=8, ctx_per_seq=2048) as judge:
        scores = []
        for answers in (answers_a, answers_b):
            col = []
            for (c, x), a in zip(items, answers, strict=True):
                prompt = cf.prompt_ids(None, JUDGE_PROMPT.format(context=c, prompt=x, answer=a[:1500]))
                lps = yield from judge.score_many_steps([(prompt, d) for d in digits])
                col.append(1 + int(np.argmax(lps)))
                judged += 1
                yield DecodeStep("scoring", judged, total, 0, judged, total)
            scores.append(col)
    return scores[0], scores[1]


def judge_answers(path: Path, items, answers_a, answers_b) -> tuple[list[int], list[int]]:
    return drain(judge_answers_steps(path, items, answers_a, answers_b))


# Reading a token in a wide scoring batch costs a fraction of sampling one (one token per decode step):
# a sampled token counts this many read tokens in the share of the job done (see candidates.SCORING_SHARE).
SAMPLING_COST = 8
JUDGE_PROMPT_TOKENS = 300  # about the judge prompt's length around an answer, for the job's share


def evaluate(
    ws: Workspace, settings: EvalSettings, *, export_id: int | None = None, judge: Path | None = None
) -> Generator[Progress | Log, None, EvalReport]:
    """The `mipo-local eval` job. Returns the report, also stored in the workspace.

    It yields a Progress event after every decode step (loading a model is one step), so it reports its
    phase and stops between two decode steps when closed; nothing is stored before the report."""
    from .engine import Engine

    started = time.monotonic()
    validate(settings)
    if judge is not None:
        check_judge_file(Path(judge))
    export = latest_export(ws, export_id)
    run = (
        runs.require_run(ws, None)
        if export["run_id"] is None
        else runs.Run.from_row(ws.query("SELECT * FROM runs WHERE id = ?", (export["run_id"],))[0])
    )
    held_path = runs.final_dir(ws, run.name) / "heldout.json"
    held = json.loads(held_path.read_text()) if held_path.is_file() else []
    pair_rows = {r["id"]: r for r in ws.query("SELECT id, prompt, context, chosen, rejected FROM pairs")}
    held = [h for h in held if h["pair_id"] in pair_rows][: settings.n]
    if not held:
        raise WorkspaceError(
            "The run has no held-out pairs to evaluate on.",
            hint="Generate more pairs (10% of them are held out; at least 4 pairs are needed) and train again.",
        )
    base = modelsource.base_model(ws)
    cf = chat_format(str(base.file))
    beta = float(run.settings.get("beta", 0.1))
    with ws.job("eval", f"mipo-local eval (export {export['id']})"):
        yield Log(
            "eval", f"Evaluating export #{export['id']} of run '{run.name}' on {len(held)} held-out pairs..."
        )
        items = [(pair_rows[h["pair_id"]]["context"], pair_rows[h["pair_id"]]["prompt"]) for h in held]
        encoded = [
            cf.encode_pair(
                c or None, x, pair_rows[h["pair_id"]]["chosen"], pair_rows[h["pair_id"]]["rejected"]
            )
            for h, (c, x) in zip(held, items, strict=True)
        ]
        neutral = [(cf.prompt_ids(None, q), cf.response_ids(None, q, a)) for q, a in neutral_set()]
        rng = np.random.default_rng(settings.seed)
        negs = [(pool := negative_pool(c, []))[int(rng.integers(len(pool)))] for c, _ in items]
        longest = max(len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in encoded)
        ctx = (
            max(longest, max(len(cf.prompt_ids(n, x)) for n, (_, x) in zip(negs, items, strict=True)))
            + settings.max_tokens
            + 8
        )
        ctx = max(ctx, max(len(p) + len(r) for p, r in neutral) + 4)
        pair_items = [(e.prompt, r) for e in encoded for r in (e.chosen, e.rejected)]
        pmi_tokens = sum(
            len(cf.prompt_ids(c, x)) + len(cf.prompt_ids(n, x)) + 2 * settings.max_tokens
            for (c, x), n in zip(items, negs, strict=True)
        )
        per_model = [
            ("pairs", sum(len(p) + len(r) for p, r in pair_items)),
            ("sampling", len(items) * settings.max_tokens * SAMPLING_COST),
            ("neutral", sum(len(p) + len(r) for p, r in neutral)),
        ]
        plan = [(f"{who} {key}", w) for who in ("personalized", "base") for key, w in per_model]
        plan.append(("pmi", 2 * pmi_tokens))
        if judge is not None:
            plan.append(("judge", 2 * len(items) * (JUDGE_PROMPT_TOKENS + settings.max_tokens)))
        meter = PhaseMeter("eval", plan)
        model_path, lora = export_engine_args(ws, export)
        results = {}
        for who, path, adapter in (("personalized", model_path, lora), ("base", base.file, None)):
            yield meter.loading(f"the {who} model")
            model = f"{who} model"
            with Engine(path, n_seq=8, ctx_per_seq=ctx, lora_path=adapter) as eng:
                lp = yield from meter.relay(
                    eng.score_many_steps(pair_items), f"{who} pairs", "scoring pairs", model, "answers"
                )
                answers = yield from meter.relay(
                    _answers_steps(eng, cf, items, settings), f"{who} sampling", "sampling answers", model,
                    "answers",
                )  # fmt: skip
                nl = yield from meter.relay(
                    eng.token_logprobs_steps(neutral),
                    f"{who} neutral",
                    "scoring neutral text",
                    model,
                    "texts",
                )
            results[who] = {"pair_lp": lp, "answers": answers, "neutral": float(np.mean(np.concatenate(nl)))}
        # Context sensitivity of both models' answers, measured under the base.
        scored = {}
        for label in ("personalized", "base"):
            ans = [
                cf.response_ids(c, x, a) for (c, x), a in zip(items, results[label]["answers"], strict=True)
            ]
            scored[label] = (
                [(cf.prompt_ids(c, x), a) for (c, x), a in zip(items, ans, strict=True)],
                [(cf.prompt_ids(n, x), a) for n, (_, x), a in zip(negs, items, ans, strict=True)],
            )
        ctx2 = max(len(p) + len(a) for w, wo in scored.values() for p, a in w + wo) + 4
        pmi_whole = sum(len(p) + len(a) for w, wo in scored.values() for p, a in w + wo)
        yield meter.loading("the base model")
        with Engine(base.file, n_seq=8, ctx_per_seq=ctx2) as eng:
            read = 0
            for label, calls in scored.items():
                sums = []
                for call in calls:  # answers under the user's context, then under a stranger's
                    sums.append((yield from meter.relay(
                        eng.score_many_steps(call), "pmi", "context sensitivity",
                        f"{label} model's answers, under the base model", "answers",
                        before=read, whole=pmi_whole,
                    )))  # fmt: skip
                    read += sum(len(p) + len(a) for p, a in call)
                results[label]["pmi"] = float(np.mean(np.array(sums[0]) - np.array(sums[1])))
        pol, ref = np.array(results["personalized"]["pair_lp"]), np.array(results["base"]["pair_lp"])
        margins = beta * ((pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2]))
        judge_summary, judge_scores = None, (None, None)
        if judge is not None:
            yield Log("eval", f"Judging {len(items)} answer pairs with {Path(judge).name}...")
            steps = judge_answers_steps(
                Path(judge), items, results["personalized"]["answers"], results["base"]["answers"]
            )
            p_scores, b_scores = yield from meter.relay(
                steps, "judge", "judging", Path(judge).name, "answers"
            )
            judge_scores = (float(np.mean(p_scores)), float(np.mean(b_scores)))
            judge_summary = {
                "win": int(sum(p > b for p, b in zip(p_scores, b_scores, strict=True))),
                "tie": int(sum(p == b for p, b in zip(p_scores, b_scores, strict=True))),
                "loss": int(sum(p < b for p, b in zip(p_scores, b_scores, strict=True))),
                "model": str(judge),
            }
        base_neutral, pers_neutral = results["base"]["neutral"], results["personalized"]["neutral"]
        report = EvalReport(
            export_id=export["id"],
            run=run.name,
            n_pairs=len(held),
            n_prompts=len(items),
            pair_accuracy=float((margins > 0).mean()),
            mean_margin=float(margins.mean()),
            base=ModelScores(results["base"]["pmi"], base_neutral, judge_scores[1]),
            personalized=ModelScores(results["personalized"]["pmi"], pers_neutral, judge_scores[0]),
            drift=float((base_neutral - pers_neutral) / abs(base_neutral)),
            judge=judge_summary,
            samples=[
                {"context": c, "prompt": x, "personalized": a, "base": b}
                for (c, x), a, b in zip(
                    items, results["personalized"]["answers"], results["base"]["answers"], strict=True
                )
            ],
            seconds=time.monotonic() - started,
        )
        save_report(ws, report, run)
        yield meter.step("pmi" if judge is None else "judge", 1.0, "saving", "report saved", 1, 1, "reports")
        return report


def training_prompts(ws: Workspace, run_name: str) -> set[str]:
    """The prompt texts of the pairs a run trained on (its split; without one, every pair not held out)."""
    from .train.loop import SPLIT_FILE

    split = runs.run_dir(ws, run_name) / SPLIT_FILE
    if split.is_file():
        ids = set(json.loads(split.read_text())["train"])
    else:
        held_path = runs.final_dir(ws, run_name) / "heldout.json"
        held = {h["pair_id"] for h in json.loads(held_path.read_text())} if held_path.is_file() else set()
        ids = {r["id"] for r in ws.query("SELECT id FROM pairs")} - held
    return {r["prompt"].strip() for r in ws.query("SELECT id, prompt FROM pairs") if r["id"] in ids}


def unseen_samples(ws: Workspace, report: dict) -> tuple[list[tuple[int, dict]], int]:
    """The report's sample answers on prompts that no training pair of its run has, word for word, as
    (position in report["samples"], sample), and how many samples were left out. A held-out pair can share
    its prompt with a training pair (another context); judging those would reward memory, not fit."""
    seen = training_prompts(ws, report["run"])
    samples = report.get("samples") or []
    kept = [(i, s) for i, s in enumerate(samples) if s["prompt"].strip() not in seen]
    return kept, len(samples) - len(kept)


def save_report(ws: Workspace, report: EvalReport, run) -> Path:
    """Store the report: its row and its files land together (a kill in between leaves neither row nor
    dangling reference; files of an uncommitted id are overwritten by the next report, which gets that id)."""
    from .plots import training_plot_png

    log = runs.read_log(ws, run.id)
    with ws.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO evals(export_id, run_id, report, created_at) VALUES (?, ?, ?, ?)",
            (report.export_id, run.id, json.dumps(asdict(report)), time.time()),
        )
        eval_id = cur.lastrowid
        path = ws.root / "evals" / f"eval-{eval_id}.json"
        atomic_write_text(path, json.dumps(asdict(report), indent=2))
        training_plot_png(log, report, ws.root / "evals" / f"eval-{eval_id}.png")
    return path
