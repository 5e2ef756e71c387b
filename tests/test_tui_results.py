"""Export, Evaluate (with the blind A/B test) and Chat sections, on a finished run of the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
from textual.widgets import DataTable, Input, Label, Static, TextArea
from textual_plotext import PlotextPlot

from mipo_local import modelsource, user_pairs
from mipo_local.export import export, list_exports
from mipo_local.pairs_store import list_pairs
from mipo_local.progress import Log
from mipo_local.settings import ExportSettings
from mipo_local.train import runs
from mipo_local.workspace import Workspace
from tests.exporthelp import make_finished_run
from tests.test_tui_core import drive, settle
from tests.trainhelp import insert_pairs
from tests.tuihelp import chat_hello
from tui import blind_ab
from tui.widgets.job_runner import JobRunner, describe


def _finish(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@pytest.fixture(scope="module")
def finished_ws(tmp_path_factory, tiny_gguf):
    """A workspace with a context, pairs (all held out) and a finished run; copied by each test."""
    root = tmp_path_factory.mktemp("tui-results") / "ws"
    ws = Workspace.open(root, create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    ws.add_context("I am Ana, a vegan chef in Lisbon. I like short answers.")
    make_finished_run(ws, n_pairs=4)
    ws.close()
    return root


@pytest.fixture
def results_ws(finished_ws, tmp_path):
    target = tmp_path / "ws"
    shutil.copytree(finished_ws, target)
    ws = Workspace.open(target)
    yield ws
    ws.close()


def test_export_shows_files_fidelity_and_commands(results_ws):
    async def scenario(app, pilot):
        await pilot.press("5")
        app.screen.query_one("#adapter-only").value = True
        await pilot.press("x")
        await settle(app, pilot)
        facts = str(app.screen.query_one("#export-facts", Static).render())
        assert "GGUF LoRA adapter" in facts and "Fidelity: 100.0% same preference sign on" in facts
        commands = app.screen.query_one("#export-commands", TextArea).text
        exported = list_exports(results_ws)[-1]
        assert f"--lora {exported.path}" in commands
        assert f"ollama create mipo-run-1 -f {exported.info['modelfile']}" in commands
        assert "ollama run mipo-run-1" in commands
        await pilot.press("x")  # the same export again: its folder is taken
        assert type(app.screen).__name__ == "ConfirmScreen"
        question = str(app.screen.query_one("Label").render())
        assert question.startswith("An export of this run with these settings is already in ")
        assert question.endswith("run-1-adapter. Replace it?")
        await pilot.press("y")
        await settle(app, pilot)

    notes = drive(results_ws.root, scenario)
    (exported,) = list_exports(results_ws)  # replaced, not added
    assert exported.kind == "adapter" and exported.info["fidelity"]["ok"]
    assert len([n for n in notes if n.message.startswith("Exported to ")]) == 2
    assert not any("--force" in n.message for n in notes)


def test_export_remembers_the_ollama_name(results_ws):
    async def type_name(app, pilot):
        await pilot.press("5")
        app.screen.query_one("#ollama-name", Input).focus()
        await pilot.press(*"ana-chef")

    async def reopen(app, pilot):
        await pilot.press("5")
        assert app.screen.query_one("#ollama-name", Input).value == "ana-chef"

    drive(results_ws.root, type_name)
    drive(results_ws.root, reopen)


def _phases_of(events) -> list[str]:
    out = []
    for e in events:
        if not out or out[-1] != e.phase:
            out.append(e.phase)
    return out


def _train_on_a_held_out_prompt(ws) -> str:
    """A training pair (another context) with the prompt of a held-out pair, as the run's split says."""
    prompt = ws.query("SELECT prompt FROM pairs ORDER BY id LIMIT 1")[0]["prompt"]
    held = [p.id for p in list_pairs(ws)]
    insert_pairs(ws, [(prompt, "Ahoy! Rice.", "Rice.")], context="I am Bo, a pilot.")
    trained = [p.id for p in list_pairs(ws) if p.id not in held]
    split = runs.run_dir(ws, "run-1") / "split.json"
    split.write_text(json.dumps({"train": trained, "heldout": held}))
    return prompt


def test_evaluate_explains_plots_shows_answers_then_blind_ab_on_unseen_prompts(results_ws):
    _finish(export(results_ws, None, ExportSettings(adapter_only=True, verify=False)))
    trained_prompt = _train_on_a_held_out_prompt(results_ws)
    judged, picked, shown, posts = [], [], [], {}

    def label_at_each_event(message):
        # A Progressed message is posted to the runner, then, once the runner has handled it, bubbles on
        # to its parent: at that second post the label shows what this event made of it.
        if isinstance(message, JobRunner.Progressed):
            posts[id(message)] = posts.get(id(message), 0) + 1
            if posts[id(message)] == 2:
                shown.append((str(message.runner.query_one("#job-status", Label).render()), message.event))

    async def scenario(app, pilot):
        await pilot.press("6")
        app.screen.query_one("#eval-max-tokens", Input).value = "48"
        await pilot.press("v")
        await settle(app, pilot)
        runner = app.screen.query_one("#eval-job", JobRunner)
        assert str(runner.query_one("#job-status", Label).render()) == ""  # nothing left for the next run
        assert not runner.display
        title = str(app.screen.query_one("#eval-title", Static).render())
        assert "on 4 held-out pairs" in title
        table = app.screen.query_one("#eval-table", DataTable)
        assert table.row_count == 5
        base_cells = [str(table.get_row_at(i)[1]) for i in range(table.row_count)]
        assert all(cell.strip() for cell in base_cells) and base_cells.count("- (reference)") == 3
        explained = str(app.screen.query_one("#eval-explain", Static).render())
        for term in ("Held-out pair accuracy:", "Context sensitivity (PMI):", "Drift:", "- (reference):"):
            assert term in explained
        bars = app.screen.query_one("#eval-bars", PlotextPlot)
        assert "personalized" in str(bars.render()) and "context sensitivity" in str(bars.render())
        samples = app.screen.query(".sample-prompt")
        assert len(samples) == 3 and all(trained_prompt not in str(s.render()) for s in samples)
        note = str(app.screen.query_one("#eval-samples-title", Static).render())
        assert "3 such prompts, 1 left out that share a training prompt" in note
        await pilot.press("b")
        screen = app.screen
        assert type(screen).__name__ == "BlindABScreen"
        disjoint = str(screen.query_one("#ab-disjoint", Static).render())
        assert disjoint == (
            "3 held-out prompts, none of them the prompt of a training pair "
            "(1 left out: the model trained on the same prompt)."
        )
        trial = screen.trial
        shown_a = str(screen.query_one("#ab-a", Static).render())
        sample = blind_ab.latest_report(results_ws)["samples"][trial.index]
        assert shown_a.strip() == sample[trial.sources[0]].strip()[: len(shown_a.strip())]
        judged.append(trial.prompt)
        for key in "atat":  # more votes than unseen prompts: the draw cycles through them only
            if key == "a":
                picked.append(screen.trial)
            await pilot.press(key)
            judged.append(screen.trial.prompt)
        await pilot.press("escape")
        await pilot.pause()

    drive(results_ws.root, scenario, hook=label_at_each_event)
    # Each event's line replaces the label whole: nothing of an earlier phase is left on it.
    assert shown and all(line == f"eval: {describe(event)}" for line, event in shown)
    assert _phases_of(e for _, e in shown)[:2] == ["loading model", "scoring pairs"]
    sampling = [line for line, _ in shown if "sampling answers" in line]
    assert any("personalized model" in x for x in sampling) and any("base model" in x for x in sampling)
    assert trained_prompt not in judged and len(set(judged)) == 3
    report = blind_ab.latest_report(results_ws)
    votes = blind_ab.votes(results_ws, report["export_id"])
    assert len(votes) == 4 and votes[1]["pick"] == "tie" and votes[0]["pick"] in ("personalized", "base")
    assert all(v["prompt"] != trained_prompt for v in votes)
    score = {"personalized": 1.0, "tie": 0.5, "base": 0.0}
    assert blind_ab.win_rate(votes) == sum(score[v["pick"]] for v in votes) / 4
    # Each pick (not a tie) of two different answers is one of the user's pairs: chosen = the answer shown as A.
    shown = [(t, tuple(a.strip() for a in t.answers)) for t in picked]
    expected = [("ab", t.prompt, t.context, *a) for t, a in shown if all(a) and a[0] != a[1]]
    assert expected  # the tiny model's two answers differ on at least one prompt
    stored = [
        (p.origin, p.prompt, p.context, p.chosen, p.rejected) for p in user_pairs.list_user_pairs(results_ws)
    ]
    assert stored == expected


def test_stopping_a_chat_answer_says_so_and_keeps_its_text(results_ws):
    _finish(export(results_ws, None, ExportSettings(adapter_only=True, verify=False)))

    def stop_after_the_first_piece(message):
        if isinstance(message, JobRunner.Emitted) and isinstance(message.item, tuple):
            message.runner.cancel()  # what escape does while an answer streams

    async def scenario(app, pilot):
        await chat_hello(app, pilot, max_tokens=64)
        (answer,) = app.screen.query(".chat-answer")
        assert str(answer.render()).strip()  # what it wrote before the stop stays on screen
        status = str(app.screen.query_one("#job-status").render())
        assert status == "chat: The answer was stopped; what it wrote so far stays."

    notes = drive(results_ws.root, scenario, hook=stop_after_the_first_piece)
    cancelled = [n for n in notes if n.title == "Cancelled"]
    assert [n.message for n in cancelled] == ["The answer was stopped; what it wrote so far stays."]


def test_chat_streams_one_message_then_side_by_side(results_ws):
    _finish(export(results_ws, None, ExportSettings(adapter_only=True, verify=False)))
    said = []

    def status_lines(message):
        if isinstance(message, JobRunner.Emitted) and isinstance(message.item, Log):
            said.append(message.item.message)

    async def scenario(app, pilot):
        await chat_hello(app, pilot, max_tokens=6)
        answers = app.screen.query(".chat-answer")
        assert len(answers) == 1 and str(answers[0].render()).strip()
        session = app.screen.sessions["personalized"]
        assert session.model.lora is not None  # the exported adapter, on the base
        assert [m["role"] for m in session.history] == ["user", "assistant"]
        await pilot.press("ctrl+t", *"hi", "enter")
        await settle(app, pilot)
        assert len(app.screen.query(".chat-answer")) == 3
        assert app.screen.sessions["base"].model.label == "base"

    drive(results_ws.root, scenario, hook=status_lines)
    # The hook sees a message at each node it bubbles through: one line per model, in order.
    assert list(dict.fromkeys(said)) == ["export #1 loaded for the personalized side.", "base model loaded."]
