"""`mipo-local run`: the whole journey in one resumable command.

    synthesize prompts (if fewer than N) -> pairs -> train -> export -> eval

Every stage is itself resumable and skips what is already done, so rerunning after Ctrl-C, kill -9 or a
closed app continues where it stopped: pairs keep their keys, an unfinished run resumes from its last
checkpoint, a finished run is not trained again, an existing export or evaluation is reused.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field

from . import modelsource
from .errors import UserInputError
from .pairs_store import list_pairs
from .progress import Log, Progress
from .settings import EvalSettings, ExportSettings, PairSettings, TrainSettings
from .validation import require_int
from .workspace import Workspace

STAGES = ("synth", "pairs", "train", "export", "eval")
DEFAULT_ROUNDS = 1  # self-improvement rounds of pairs + training (rounds.py)


@dataclass
class PipelineResult:
    run: str | None = None
    export_id: int | None = None
    eval_report: object | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def run_pipeline(
    ws: Workspace,
    *,
    n_prompts: int = 32,
    pairs: PairSettings | None = None,
    train: TrainSettings | None = None,
    export: ExportSettings | None = None,
    evaluation: EvalSettings | None = None,
    rounds: int = DEFAULT_ROUNDS,
) -> Generator[Progress | Log, None, PipelineResult]:
    from . import pairs as pairs_mod
    from .evaluate import evaluate
    from .synth import synthesize_prompts
    from .train import runs

    # Checked before anything is written or printed, so a bad start leaves one error line and no trace.
    if n_prompts < 0:
        raise UserInputError(f"--prompts must be 0 or more, not {n_prompts}.")
    require_int("--prompts", n_prompts, 0, 1000)
    require_int("--rounds", rounds, 1, 5)
    if not ws.contexts():
        raise UserInputError(
            "There are no contexts yet: the pipeline needs to know who you are.",
            hint='Run: mipo-local context add "I am ..."',
        )
    modelsource.base_model(ws)  # a missing or unset base model is said now, not after synthesis
    from . import pairs as pairs_check
    from .evaluate import validate as validate_eval

    pairs_check.validate(pairs or PairSettings())
    validate_eval(evaluation or EvalSettings())
    result = PipelineResult()
    with ws.job("run", f"mipo-local run --prompts {n_prompts} --rounds {rounds}"):
        t = time.monotonic()
        missing = n_prompts - ws.count("prompts")
        if missing > 0:
            yield Log("run", f"[1/5] {ws.count('prompts')} prompts; synthesizing {missing} more.")
            yield from synthesize_prompts(ws, missing)
        else:
            yield Log("run", f"[1/5] {ws.count('prompts')} prompts: enough, nothing to synthesize.")
        result.seconds["synth"] = time.monotonic() - t

        t_pairs = t_train = 0.0
        previous = None
        for k in range(1, rounds + 1):
            what = f" (round {k} of {rounds})" if rounds > 1 else ""
            t = time.monotonic()
            yield Log("run", f"[2/5] Generating MIPO pairs{what}.")
            yield from pairs_mod.generate_pairs(ws, pairs or PairSettings(), from_run=previous)
            t_pairs += time.monotonic() - t
            t = time.monotonic()
            previous = yield from _train_round(ws, train or TrainSettings(), previous, k, what)
            t_train += time.monotonic() - t
        result.run = previous
        result.seconds["pairs"], result.seconds["train"] = t_pairs, t_train

        t = time.monotonic()
        run = runs.get_run(ws, result.run)
        done = ws.query("SELECT id FROM exports WHERE run_id = ? ORDER BY id DESC LIMIT 1", (run.id,))
        if done:
            result.export_id = done[0]["id"]
            yield Log("run", f"[4/5] Export #{result.export_id} of this run already exists.")
        else:
            from .export import export as export_job

            yield Log("run", "[4/5] Exporting the personalized GGUF.")
            # No export row for this run: a folder already at the output path is what an export killed
            # between its final rename and its record left behind, so it is replaced.
            yield from export_job(ws, run_name=run.name, settings=export or ExportSettings(), force=True)
            result.export_id = ws.query(
                "SELECT id FROM exports WHERE run_id = ? ORDER BY id DESC LIMIT 1", (run.id,)
            )[0]["id"]
        result.seconds["export"] = time.monotonic() - t

        t = time.monotonic()
        done = ws.query("SELECT id FROM evals WHERE export_id = ?", (result.export_id,))
        if done:
            yield Log("run", "[5/5] This export is already evaluated (see `mipo-local eval` to rerun).")
        else:
            yield Log("run", "[5/5] Evaluating against the base model.")
            result.eval_report = yield from evaluate(
                ws, evaluation or EvalSettings(), export_id=result.export_id
            )
        result.seconds["eval"] = time.monotonic() - t
    return result


def _train_round(ws: Workspace, settings: TrainSettings, previous: str | None, k: int, what: str):
    """Train round `k` (on the pairs `previous`'s model sampled; the base model's for round 1), or resume or
    reuse the run that already did; returns its name. Round k's run is named after round 1's: NAME-r{k}."""
    from dataclasses import replace

    from .train import runs
    from .train.loop import train as train_job

    if k == 1:
        latest = ws.query(
            "SELECT name, status FROM runs WHERE json_extract(settings, '$.from_run') IS NULL "
            "ORDER BY id DESC LIMIT 1"
        )
        n_pairs = len(list_pairs(ws, sampler=None))
        if latest and latest[0]["status"] in ("running", "cancelled", "created"):
            yield Log("run", f"[3/5] Resuming the unfinished run '{latest[0]['name']}'{what}.")
            summary = yield from train_job(ws, settings, run_name=latest[0]["name"], resume=True)
            return summary.run
        if latest and latest[0]["status"] == "finished" and _trained_on(ws, latest[0]["name"]) == n_pairs:
            yield Log(
                "run", f"[3/5] Run '{latest[0]['name']}' already trained on these {n_pairs} pairs{what}."
            )
            return latest[0]["name"]
        yield Log("run", f"[3/5] Training on {n_pairs} pairs{what}.")
        summary = yield from train_job(ws, replace(settings, from_run=None))
        return summary.run
    name = f"{_round_root(previous)}-r{k}"
    run = runs.get_run(ws, name)
    if run is not None and run.status == "finished":
        yield Log("run", f"[3/5] Run '{name}' already trained round {k}.")
        return name
    if run is not None:
        yield Log("run", f"[3/5] Resuming the unfinished run '{name}'{what}.")
        summary = yield from train_job(ws, settings, run_name=name, resume=True)
        return summary.run
    yield Log("run", f"[3/5] Training round {k} on the pairs run '{previous}' sampled{what}.")
    summary = yield from train_job(ws, replace(settings, from_run=previous), run_name=name)
    return summary.run


def _round_root(name: str) -> str:
    base, sep, tail = name.rpartition("-r")
    return base if sep and tail.isdigit() else name


def _trained_on(ws: Workspace, run_name: str) -> int:
    from .train import runs

    summary = runs.get_run(ws, run_name).summary or {}
    return int(summary.get("train_pairs", 0)) + int(summary.get("heldout_pairs", 0))
