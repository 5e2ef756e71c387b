"""kill -9 in the middle of export, eval and `run`, at seeded random points, then a rerun: the database stays
sound, no dead process blocks the rerun, nothing half-written survives, and the end result equals an
uninterrupted run with the same seed. (pairs and train have their own kill -9 tests in test_pairs.py and
test_train_loop.py.)

Each job is killed five times in a row on one workspace; each kill lands a seeded random fraction of the
job's (or pipeline stage's) uninterrupted duration after the progress line that starts it, where the duration
ends at the job's last progress line (its results are committed right after it).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import gguf
import numpy as np
import pytest

from mipo_local import adapter_io, modelsource
from mipo_local.engine import Engine
from mipo_local.train import runs
from mipo_local.workspace import Workspace
from tests import exporthelp
from tests.faulthelp import CliRun, integrity, live_job_locks, run_to_end

KILLS = 5
EXPORT_ARGS = ["export", "--quant", "q8_0", "--threads", "1"]
EVAL_ARGS = ["eval", "--n", "4", "--max-tokens", "8", "--no-plot"]
RUN_ARGS = ["run", "--prompts", "4", "--max-tokens", "8"]


def _env(root) -> dict:
    return {**os.environ, "MIPO_LOCAL_HOME": str(root)}


def _copy_ws(src, dst):
    """A copy of a workspace whose recorded absolute paths (exports) point into the copy."""
    shutil.copytree(src, dst)
    con = sqlite3.connect(dst / "mipo.db")
    with con:
        con.execute("UPDATE exports SET path = replace(path, ?, ?), info = replace(info, ?, ?)",
                    (str(src), str(dst), str(src), str(dst)))  # fmt: skip
    con.close()
    return dst


def _after_kill_checks(root) -> None:
    assert integrity(root) == "ok"
    assert live_job_locks(root) == []  # the killed holder's lock does not block anyone


def _kill_repeatedly(root, args, marker, duration, seed, kills=KILLS, done=None) -> list[float]:
    """Start `args` and SIGKILL it `kills` times, each at a seeded fraction of `duration` after `marker`.

    Should a job still commit its result before its kill lands (`done(root)`), the killing stops there.
    Returns the fractions of the kills that found the job unfinished."""
    rng = np.random.default_rng(seed)
    fractions = []
    for _ in range(kills):
        u = float(rng.uniform(0.05, 0.95))
        run = CliRun(args, _env(root)).start()
        t0 = run.wait_for(marker)
        assert t0 is not None, run.stderr[-2000:]
        assert run.kill_at(t0 + u * duration), f"finished before the kill at {u:.2f}:\n{run.stderr[-1500:]}"
        _after_kill_checks(root)
        if done is not None and done(root):
            break
        fractions.append(u)
    return fractions


def _exported(root) -> bool:
    return bool(Workspace.open(root).query("SELECT id FROM exports"))


def _tensors(path) -> dict[str, bytes]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in reader.tensors}


def _loads_in_llama_cpp(path) -> None:
    with Engine(path, n_seq=1, ctx_per_seq=64, n_threads=1) as engine:
        (lp,) = engine.score_many([([1, 2, 3], [4, 5])])
    assert np.isfinite(lp)


def _no_temp_files(root) -> None:
    left = [p for p in root.rglob("*") if p.name.endswith((".part", ".old")) or ".part." in p.name]
    assert left == [], left


def _numbers(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("seconds",)}


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory, tiny_gguf):
    """The tiny model, a context, held-out pairs and a finished run (a seeded random LoRA)."""
    root = tmp_path_factory.mktemp("fault") / "trained"
    ws = Workspace.open(root, create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    ws.add_context(exporthelp.CONTEXT)
    exporthelp.make_finished_run(ws, "run-1", n_pairs=8)
    ws.close()
    return root


@pytest.fixture(scope="module")
def exported_ws(trained_ws):
    """`trained_ws` after one uninterrupted export; returns (workspace, seconds the export job took)."""
    root = _copy_ws(trained_ws, trained_ws.parent / "exported")
    run = run_to_end(EXPORT_ARGS, _env(root))
    return root, run.lines[-1][0] - run.wait_for("Exporting run")


def test_export_killed_5_times_then_rerun_equals_uninterrupted(trained_ws, exported_ws, tmp_path):
    ref, duration = exported_ws
    # The first export of the session can be slow (CI: 1.47 s, where a rerun took about 0.6 s and a kill
    # at 0.59 of it found the export committed), so the kills are timed by the faster of two runs.
    again = run_to_end([*EXPORT_ARGS, "--force"], _env(_copy_ws(ref, tmp_path / "again")))
    duration = min(duration, again.lines[-1][0] - again.wait_for("Exporting run"))
    root = _copy_ws(trained_ws, tmp_path / "ws")
    kills = _kill_repeatedly(root, EXPORT_ARGS, "Exporting run", duration, seed=11, done=_exported)
    assert len(kills) >= KILLS - 2, kills
    if not _exported(root):
        run_to_end(EXPORT_ARGS, _env(root))  # not refused: no lock held, no half-made folder in the way
    assert integrity(root) == "ok"
    _no_temp_files(root)
    assert [p.name for p in (root / "exports").iterdir()] == ["run-1-q8_0"]
    rows = Workspace.open(root).query("SELECT path FROM exports")
    assert len(rows) == 1
    path = rows[0]["path"]
    assert sorted(p.name for p in (root / "exports" / "run-1-q8_0").iterdir()) == sorted(
        p.name for p in (ref / "exports" / "run-1-q8_0").iterdir()
    )
    ref_path = Workspace.open(ref).query("SELECT path FROM exports")[0]["path"]
    assert _tensors(path) == _tensors(ref_path)
    _loads_in_llama_cpp(path)


def test_eval_killed_5_times_then_rerun_equals_uninterrupted(exported_ws, tmp_path):
    src, _ = exported_ws
    ref = _copy_ws(src, tmp_path / "ref")
    straight = run_to_end(EVAL_ARGS, _env(ref))
    # Kills land within 80% of this first, cold run's time: a later run can be faster, and a kill after the
    # report's commit would leave a finished evaluation behind (measured: a kill at 0.9 did).
    duration = straight.lines[-1][0] - straight.wait_for("Evaluating export")
    root = _copy_ws(src, tmp_path / "ws")
    _kill_repeatedly(root, EVAL_ARGS, "Evaluating export", 0.8 * duration, seed=12)
    run_to_end(EVAL_ARGS, _env(root))
    assert integrity(root) == "ok"
    _no_temp_files(root)
    ws = Workspace.open(root)
    rows = ws.query("SELECT id, report FROM evals ORDER BY id")
    assert len(rows) == 1  # a killed evaluation leaves no row behind
    files = sorted(p.name for p in (root / "evals").iterdir())
    assert files == [f"eval-{rows[0]['id']}.json", f"eval-{rows[0]['id']}.png"]  # and no file without a row
    got = json.loads((root / "evals" / files[0]).read_text())
    want = json.loads((ref / "evals" / "eval-1.json").read_text())
    assert _numbers(got) == _numbers(want)
    assert got == json.loads(rows[0]["report"])


def _stage_durations(run: CliRun) -> dict[str, float]:
    marks = {
        s: run.wait_for(f"[{i}/5]") for i, s in enumerate(("synth", "pairs", "train", "export", "eval"), 1)
    }
    order = [*marks.values(), run.lines[-1][0]]
    return {s: order[i + 1] - order[i] for i, s in enumerate(marks)}


def _run_state(root):
    ws = Workspace.open(root)
    pairs = {r["pair_key"]: (r["chosen"], r["rejected"]) for r in ws.query("SELECT * FROM pairs")}
    (run,) = runs.list_runs(ws)
    adapter = adapter_io.load_adapter(runs.final_dir(ws, run.name) / adapter_io.ADAPTER_FILE).tensors
    (export,) = ws.query("SELECT path FROM exports")
    (report,) = ws.query("SELECT report FROM evals")
    return pairs, run, adapter, export["path"], json.loads(report["report"])


def test_run_killed_in_every_stage_then_rerun_equals_uninterrupted(tiny_gguf, tmp_path):
    start = tmp_path / "start"
    ws = Workspace.open(start, create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    ws.add_context("I am Ana, a pirate fan. Greet me with Ahoy.")
    ws.add_prompts([f"How do I make dish number {i}?" for i in range(4)])
    ws.close()
    ref = _copy_ws(start, tmp_path / "ref")
    durations = _stage_durations(run_to_end(RUN_ARGS, _env(ref)))

    root = _copy_ws(start, tmp_path / "ws")
    rng = np.random.default_rng(13)
    stages = ["pairs", "train", "export", "eval"]
    plan = sorted([*stages, str(rng.choice(stages))], key=stages.index)  # every stage, one of them twice
    killed = []
    for stage in plan:
        u = float(rng.uniform(0.05, 0.9))
        run = CliRun(RUN_ARGS, _env(root)).start()
        number = stages.index(stage) + 2
        t0 = run.wait_for(f"[{number}/5]")
        assert t0 is not None, run.stderr[-2000:]
        # The reference run's stage time is only a guide (a rerun's stage can be much faster: CI measured a
        # rerun finishing the whole pipeline inside 74% of the reference's training), so a kill aimed at a
        # stage lands at the latest when the next stage starts.
        if run.kill_at(t0 + u * durations[stage], or_on=f"[{number + 1}/5]" if number < 5 else None):
            reached = [line[:5] for _, line in run.lines if line.startswith("[") and "/5]" in line[:5]]
            killed.append((stage, round(u, 2), reached[-1]))  # the stage aimed at and the one reached
        else:  # only an evaluation can end before its kill: the pipeline is done, no later kill is possible
            assert stage == "eval", (stage, run.stderr[-2000:])
            assert run.proc.returncode == 0, run.stderr[-2000:]
            break
        _after_kill_checks(root)
    print("kills:", killed)
    assert len(killed) >= KILLS - 1, killed  # timing may let the last stage finish before its kill
    final = run_to_end(RUN_ARGS, _env(root))
    assert "[5/5]" in final.stderr
    assert integrity(root) == "ok"
    _no_temp_files(root)

    pairs, run, adapter, export, report = _run_state(root)
    ref_pairs, ref_run, ref_adapter, ref_export, ref_report = _run_state(ref)
    assert pairs == ref_pairs and len(pairs) == 8  # 4 prompts x 2 pairs: nothing lost, nothing sampled twice
    assert run.status == "finished" and run.summary["steps"] == ref_run.summary["steps"]
    assert set(adapter) == set(ref_adapter)
    for name, t in ref_adapter.items():
        np.testing.assert_allclose(adapter[name].a, t.a, atol=1e-5)
        np.testing.assert_allclose(adapter[name].b, t.b, atol=1e-5)
    _loads_in_llama_cpp(export)
    mine, theirs = _tensors(export), _tensors(ref_export)
    assert set(mine) == set(theirs)
    for key in ("pair_accuracy", "mean_margin", "drift"):
        assert report[key] == pytest.approx(ref_report[key], abs=1e-3), key


def test_run_killed_inside_round_two_then_rerun_equals_uninterrupted(tiny_gguf, tmp_path):
    """`run --rounds 2`, killed while round 2 samples its pairs (from base + round 1's LoRA) and again
    while it trains, then rerun: the same pairs of both rounds, the same round-2 adapter and report."""
    args = [*RUN_ARGS, "--rounds", "2"]
    start = tmp_path / "start"
    ws = Workspace.open(start, create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    ws.add_context("I am Ana, a pirate fan. Greet me with Ahoy.")
    ws.add_prompts([f"How do I make dish number {i}?" for i in range(4)])
    ws.close()
    ref = _copy_ws(start, tmp_path / "ref")
    reference = run_to_end(args, _env(ref))
    pairs2, train2 = "Generating MIPO pairs (round 2 of 2)", "Training round 2"
    marks = [reference.wait_for(m) for m in (pairs2, train2, "[4/5]")]
    assert None not in marks, reference.stderr[-2000:]
    root = _copy_ws(start, tmp_path / "ws")
    rng = np.random.default_rng(7)
    for (marker, until), duration in zip(((pairs2, train2), (train2, "[4/5]")), np.diff(marks), strict=True):
        run = CliRun(args, _env(root)).start()
        t0 = run.wait_for(marker)
        assert t0 is not None, run.stderr[-2000:]
        assert run.kill_at(t0 + float(rng.uniform(0.1, 0.9)) * duration, or_on=until), run.stderr[-1500:]
        _after_kill_checks(root)
    final = run_to_end(args, _env(root))
    assert "[5/5]" in final.stderr
    _no_temp_files(root)

    def state(where):
        w = Workspace.open(where)
        pairs = {
            r["pair_key"]: (r["round"], r["sampler"], r["chosen"], r["rejected"])
            for r in w.query("SELECT * FROM pairs")
        }
        names = sorted(r.name for r in runs.list_runs(w))
        adapter = adapter_io.load_adapter(runs.final_dir(w, "run-1-r2") / adapter_io.ADAPTER_FILE).tensors
        (report,) = w.query("SELECT report FROM evals")
        return pairs, names, adapter, json.loads(report["report"])

    pairs, names, adapter, report = state(root)
    ref_pairs, ref_names, ref_adapter, ref_report = state(ref)
    assert names == ref_names == ["run-1", "run-1-r2"]
    assert (
        pairs == ref_pairs and sorted(p[:2] for p in pairs.values()) == [(1, None)] * 8 + [(2, "run-1")] * 8
    )
    for name, t in ref_adapter.items():
        np.testing.assert_allclose(adapter[name].a, t.a, atol=1e-5)
        np.testing.assert_allclose(adapter[name].b, t.b, atol=1e-5)
    for key in ("pair_accuracy", "mean_margin", "drift"):
        assert report[key] == pytest.approx(ref_report[key], abs=1e-3), key
