"""Jobs that answer at once: progress at every decode step and micro-batch, phases named in order, and a
cancel or a quit that stops within one step and keeps what was finished. Steps are counted, not timed."""

from __future__ import annotations

import dataclasses
import threading
import time

import llama_cpp
import numpy as np
import pytest
from textual.widgets import Input, Label

from mipo_local import adapter_io
from mipo_local.pairs import generate_pairs
from mipo_local.progress import Progress, run_to_end
from mipo_local.settings import PairSettings
from mipo_local.train import runs
from mipo_local.train.checkpoints import checkpoint_dirs
from mipo_local.train.loop import train
from mipo_local.workspace import Workspace
from tests.test_train_loop import FAST as TRAIN_FAST
from tests.test_tui_core import drive, settle
from tests.trainhelp import insert_pairs, signal_pairs
from tui.widgets.job_runner import PENDING_KEY, JobRunner

PAIRS = PairSettings(max_tokens=8, temperature=0.8, batch_size=8, per_prompt=1)


def _fill(ws, n_prompts=10):
    """2 contexts x n_prompts: 20 pairs by default, two chunks of 16 and 4."""
    ws.add_context("I am Ana, a vegan chef in Lisbon.")
    ws.add_context("I am Bo, a pilot who loves jazz.")
    ws.add_prompts([f"What should I do about thing {i}?" for i in range(n_prompts)])


@pytest.fixture
def decodes(monkeypatch):
    """Counts llama.cpp's decode calls (the real ones run); `pace` seconds are spent in each, so that a
    job on the tiny model lasts long enough for keys to reach it mid-job, and while `hold` is set a decode
    waits, as a slow one would, so that the screen can be read while a job is stopping; `held` says that
    one is waiting."""
    state = {"calls": 0, "pace": 0.0, "after_stop": 0, "stop": None, "hold": threading.Event(),
             "held": threading.Event()}  # fmt: skip
    real = llama_cpp.llama_decode

    def counting(ctx, batch):
        state["calls"] += 1
        if state["stop"] is not None and state["stop"].is_set():
            state["after_stop"] += 1
        if state["pace"]:
            time.sleep(state["pace"])
        deadline = time.monotonic() + 30
        while state["hold"].is_set() and time.monotonic() < deadline:
            state["held"].set()  # a decode step is waiting: the job is inside it, not between two
            time.sleep(0.005)
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", counting)
    return state


def _done(ws) -> int:
    """Pairs finished: kept, or recorded as dropped."""
    return ws.query("SELECT (SELECT COUNT(*) FROM pairs) + (SELECT COUNT(*) FROM pair_skips)")[0][0]


def _phases(events) -> list[str]:
    """The phases of the Progress events, each run of the same phase once."""
    out = []
    for e in events:
        if isinstance(e, Progress) and e.phase and (not out or out[-1] != e.phase):
            out.append(e.phase)
    return out


def test_pairs_report_every_decode_step_and_stop_at_the_next(tiny_workspace, decodes):
    _fill(tiny_workspace)
    job = generate_pairs(tiny_workspace, PAIRS)
    events, in_second_chunk = [], 0
    for event in job:
        events.append(event)
        if isinstance(event, Progress) and event.done == 16 and event.phase == "sampling":
            in_second_chunk += 1
            if in_second_chunk == 3:  # a few decode steps into the second chunk
                at_close = decodes["calls"]
                job.close()
                break
    assert decodes["calls"] == at_close  # not one decode step after the close
    assert _done(tiny_workspace) == 16  # the first chunk, kept
    assert tiny_workspace.running_jobs() == []

    first_chunk = [e for e in events if isinstance(e, Progress) and e.done == 0]
    assert _phases(first_chunk) == ["loading model", "sampling", "scoring"]
    sampling = [e for e in first_chunk if e.phase == "sampling"]
    assert len(sampling) >= 4 and "tokens" in sampling[-1].message  # progress before any pair is done
    shares = [e.fraction for e in events if isinstance(e, Progress)]
    assert shares == sorted(shares) and 0 < shares[-1] < 1  # it moves during a chunk, never back
    assert any(e.eta_s is not None for e in first_chunk)  # an ETA during the first chunk

    summary = run_to_end(generate_pairs(tiny_workspace, PAIRS))  # the rest, from where it stopped
    assert summary.already_done == 16
    assert _done(tiny_workspace) == 20


def test_training_names_its_phases_and_stops_between_micro_batches(tiny_workspace, tmp_path, tiny_gguf):
    from mipo_local import modelsource

    settings = dataclasses.replace(TRAIN_FAST, grad_accum=4, checkpoint_every=100, eval_every=100)
    insert_pairs(tiny_workspace, signal_pairs(12))  # 11 trained, 1 held out: 3 steps of 4 micro-batches
    job = train(tiny_workspace, settings, run_name="m")
    events = []
    for event in job:
        events.append(event)
        if isinstance(event, Progress) and "step 2/3, micro-batch 2/4" in event.message:
            job.close()  # in the middle of step 2
            break
    assert _phases(events) == ["loading model", "reference pass", "training"]
    first_step = [e for e in events if isinstance(e, Progress) and e.phase == "training" and e.done == 0]
    assert [e.message for e in first_step][1:] == [f"step 1/3, micro-batch {i}/4 done" for i in (1, 2, 3)]
    run = runs.get_run(tiny_workspace, "m")
    assert run.status == "cancelled"
    # The whole step before the stop is kept; the two micro-batches of step 2 are dropped, not applied.
    assert [p.name for p in checkpoint_dirs(runs.run_dir(tiny_workspace, "m"))] == ["step-000001"]
    assert [x["step"] for x in runs.read_log(tiny_workspace, run.id) if x["kind"] == "train"] == [1]

    resumed_events = []
    for event in train(tiny_workspace, settings, run_name="m", resume=True):
        resumed_events.append(event)
    assert _phases(resumed_events) == ["loading model", "training", "held-out scoring"]  # references cached
    resumed = adapter_io.load_adapter(runs.final_dir(tiny_workspace, "m") / adapter_io.ADAPTER_FILE).tensors

    ref = Workspace.open(tmp_path / "ref", create=True)
    modelsource.set_base_model(ref, str(tiny_gguf))
    insert_pairs(ref, signal_pairs(12))
    straight_events = list(train(ref, settings, run_name="m"))
    assert _phases(straight_events) == ["loading model", "reference pass", "training", "held-out scoring"]
    shares = [e.fraction for e in straight_events if isinstance(e, Progress)]
    assert shares == sorted(shares)  # one bar over the whole job, never back to 0 between phases
    straight = adapter_io.load_adapter(runs.final_dir(ref, "m") / adapter_io.ADAPTER_FILE).tensors
    for name in straight:
        np.testing.assert_allclose(resumed[name].a, straight[name].a, atol=1e-6)
        np.testing.assert_allclose(resumed[name].b, straight[name].b, atol=1e-6)
    ref.close()


async def _start_job(app, pilot, decodes, seen, *, screen: str, key: str, phase: str, max_tokens=None):
    """Open a screen, start its job with `key` and wait until the job reports `phase`."""
    await pilot.press(screen)
    if max_tokens is not None:
        app.screen.query_one("#max-tokens", Input).value = max_tokens
    runner = app.screen.query_one(JobRunner)
    decodes["stop"] = runner._stop
    await pilot.press(key)
    deadline = time.monotonic() + 60
    while not any(e.phase == phase for e in seen) and time.monotonic() < deadline:
        await pilot.pause(0.02)
    return runner


async def _generate(app, pilot, decodes, seen):
    """Start the pairs job from its screen and wait until its first decode steps are on screen."""
    return await _start_job(app, pilot, decodes, seen, screen="3", key="g", phase="sampling", max_tokens="24")


async def _until_held(pilot, decodes):
    """Wait until the job is inside a held decode step, so that a key lands while a step is under way
    (on one core the job's thread may otherwise be between two steps and stop at once)."""
    deadline = time.monotonic() + 30
    while not decodes["held"].is_set() and time.monotonic() < deadline:
        await pilot.pause(0.01)


def _progress_hook(seen):
    def hook(message):
        if isinstance(message, JobRunner.Progressed):
            seen.append(message.event)

    return hook


def test_cancel_in_the_app_stops_within_a_decode_step_and_says_what_it_kept(tiny_workspace, decodes):
    _fill(tiny_workspace)
    decodes["pace"] = 0.02
    seen, status = [], {}

    async def scenario(app, pilot):
        runner = await _generate(app, pilot, decodes, seen)
        decodes["hold"].set()  # the next decode step is a slow one
        await _until_held(pilot, decodes)
        await pilot.press("c")
        status["stopping"] = str(runner.query_one("#job-status", Label).render())
        decodes["hold"].clear()
        await settle(app, pilot)
        status["stopped"] = str(runner.query_one("#job-status", Label).render())

    notes = drive(tiny_workspace.root, scenario, hook=_progress_hook(seen))
    assert decodes["after_stop"] <= 1  # at most the decode step under way when the key came
    assert status["stopping"] == "pairs: stopping after the current step..."  # said while it stops
    kept = tiny_workspace.count("pairs")
    assert status["stopped"] == f"Stopped: {kept} pairs kept."
    assert any(n.title == "Cancelled" for n in notes)
    assert tiny_workspace.get_config(PENDING_KEY) is None and tiny_workspace.running_jobs() == []


def test_quit_during_a_job_says_so_and_closes_once_it_stopped(tiny_workspace, decodes):
    _fill(tiny_workspace)
    decodes["pace"] = 0.02
    seen, state = [], {}

    async def scenario(app, pilot):
        runner = await _generate(app, pilot, decodes, seen)
        decodes["hold"].set()
        await _until_held(pilot, decodes)
        await pilot.press("ctrl+q")
        state["open_while_stopping"] = app.return_code is None  # still open, saying what it does
        state["status"] = str(runner.query_one("#job-status", Label).render())
        decodes["hold"].clear()
        deadline = time.monotonic() + 60
        while app.return_code is None and time.monotonic() < deadline:
            await pilot.pause(0.02)
        state["return_code"] = app.return_code

    notes = drive(tiny_workspace.root, scenario, hook=_progress_hook(seen))
    assert state == {
        "open_while_stopping": True,
        "status": "pairs: stopping after the current step, then quitting...",
        "return_code": 0,
    }
    assert decodes["after_stop"] <= 1
    assert any(n.title == "Quitting" and "Stopping the pairs job" in n.message for n in notes)
    assert not any(n.title == "Cancelled" for n in notes)
    assert tiny_workspace.get_config(PENDING_KEY)["mode"] == "pairs"  # offered again on reopening
    assert tiny_workspace.running_jobs() == []


def test_quit_with_no_job_closes_at_once(tiny_workspace):
    state = {}

    async def scenario(app, pilot):
        await pilot.press("ctrl+q")
        await pilot.pause()
        state["return_code"] = app.return_code

    drive(tiny_workspace.root, scenario)
    assert state["return_code"] == 0


def test_the_status_line_names_the_phase(tiny_workspace, decodes):
    _fill(tiny_workspace, n_prompts=2)
    seen = []

    async def scenario(app, pilot):
        await pilot.press("3")
        await pilot.press("g")
        await settle(app, pilot)

    drive(tiny_workspace.root, scenario, hook=_progress_hook(seen))
    assert _phases(seen)[:2] == ["loading model", "sampling"]
    from tui.widgets.job_runner import describe

    line = describe(next(e for e in seen if e.phase == "sampling"))
    assert line.startswith("sampling · chunk 1/1, ") and "tokens" in line and "ETA" in line


EVAL_PHASES = ["loading model", "scoring pairs", "sampling answers", "scoring neutral text"]


def test_evaluate_names_its_phases_and_stops_at_the_next_decode_step(tiny_workspace, decodes):
    from mipo_local.evaluate import evaluate
    from mipo_local.export import export
    from mipo_local.settings import EvalSettings, ExportSettings
    from tests.exporthelp import make_finished_run

    tiny_workspace.add_context("I am Ana, a vegan chef in Lisbon.")
    make_finished_run(tiny_workspace, n_pairs=4)
    run_to_end(export(tiny_workspace, None, ExportSettings(adapter_only=True, verify=False)))
    settings = EvalSettings(n=4, max_tokens=16)

    events = [e for e in evaluate(tiny_workspace, settings) if isinstance(e, Progress)]
    assert _phases(events) == [*EVAL_PHASES, *EVAL_PHASES, "loading model", "context sensitivity", "saving"]
    assert [e.message for e in events if e.phase == "loading model"] == [
        "the personalized model",
        "the base model",
        "the base model",
    ]
    sampling = [e for e in events if e.phase == "sampling answers"]
    assert len(sampling) >= 2 * 8 and "tokens" in sampling[0].message  # a step per decode, not per phase
    shares = [e.fraction for e in events]
    assert shares == sorted(shares) and shares[-1] == 1.0  # one share over every phase, never back

    job, seen = evaluate(tiny_workspace, settings), []
    for event in job:
        seen.append(event)
        if isinstance(event, Progress) and event.phase == "sampling answers" and "base" in event.message:
            at_close = decodes["calls"]
            job.close()  # a few tokens into the base model's answers
            break
    assert decodes["calls"] == at_close  # not one decode step after the close
    assert tiny_workspace.count("evals") == 1 and tiny_workspace.running_jobs() == []


def test_cancelling_evaluate_in_the_app_stops_within_a_decode_step_and_says_nothing_is_stored(
    tiny_workspace, decodes
):
    from mipo_local.export import export
    from mipo_local.settings import ExportSettings
    from tests.exporthelp import make_finished_run
    from tui.screens.evaluate import STOPPED_NOTE

    tiny_workspace.add_context("I am Ana, a vegan chef in Lisbon.")
    make_finished_run(tiny_workspace, n_pairs=4)
    run_to_end(export(tiny_workspace, None, ExportSettings(adapter_only=True, verify=False)))
    decodes["pace"] = 0.02
    seen, status = [], {}

    async def scenario(app, pilot):
        runner = await _start_job(app, pilot, decodes, seen, screen="6", key="v", phase="sampling answers")
        await pilot.press("c")
        await settle(app, pilot)
        status["stopped"] = str(runner.query_one("#job-status", Label).render())

    notes = drive(tiny_workspace.root, scenario, hook=_progress_hook(seen))
    assert decodes["after_stop"] <= 1  # at most the decode step under way when the key came
    assert status["stopped"] == f"eval: {STOPPED_NOTE}"
    assert [n.message for n in notes if n.title == "Cancelled"] == [STOPPED_NOTE]
    assert tiny_workspace.count("evals") == 0 and tiny_workspace.running_jobs() == []
