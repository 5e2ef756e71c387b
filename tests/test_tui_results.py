"""Export, Evaluate (with the blind A/B test) and Chat sections, on a finished run of the tiny model."""

from __future__ import annotations

import shutil

import pytest
from textual.widgets import Input, Static, TextArea

from mipo_local import modelsource, user_pairs
from mipo_local.export import export, list_exports
from mipo_local.settings import ExportSettings
from mipo_local.workspace import Workspace
from tests.exporthelp import make_finished_run
from tests.test_tui_core import drive, settle
from tui import blind_ab


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

    notes = drive(results_ws.root, scenario)
    (exported,) = list_exports(results_ws)
    assert exported.kind == "adapter" and exported.info["fidelity"]["ok"]
    assert any(n.message.startswith("Exported to ") for n in notes)


def test_evaluate_then_blind_ab_keeps_the_users_win_rate(results_ws):
    _finish(export(results_ws, None, ExportSettings(adapter_only=True, verify=False)))

    async def scenario(app, pilot):
        await pilot.press("6")
        app.screen.query_one("#eval-max-tokens", Input).value = "48"
        await pilot.press("v")
        await settle(app, pilot)
        title = str(app.screen.query_one("#eval-title", Static).render())
        assert "on 4 held-out pairs" in title
        assert app.screen.query_one("#eval-table").row_count == 5
        await pilot.press("b")
        screen = app.screen
        assert type(screen).__name__ == "BlindABScreen"
        trial = screen.trial
        shown_a = str(screen.query_one("#ab-a", Static).render())
        sample = blind_ab.latest_report(results_ws)["samples"][trial.index]
        assert shown_a.strip() == sample[trial.sources[0]].strip()[: len(shown_a.strip())]
        await pilot.press("a")
        second = screen.trial
        await pilot.press("t", "escape")
        await pilot.pause()
        return trial, second

    results = []

    async def run(app, pilot):
        results.append(await scenario(app, pilot))

    drive(results_ws.root, run)
    report = blind_ab.latest_report(results_ws)
    votes = blind_ab.votes(results_ws, report["export_id"])
    assert len(votes) == 2 and votes[1]["pick"] == "tie" and votes[0]["pick"] in ("personalized", "base")
    expected = 0.75 if votes[0]["pick"] == "personalized" else 0.25
    assert blind_ab.win_rate(votes) == expected
    # The pick (not the tie) is one of the user's pairs: chosen = the answer shown as A.
    ((trial, _),) = results
    (pair,) = user_pairs.list_user_pairs(results_ws)
    assert (pair.origin, pair.prompt, pair.context) == ("ab", trial.prompt, trial.context)
    assert (pair.chosen, pair.rejected) == tuple(a.strip() for a in trial.answers)


def test_chat_streams_one_message_then_side_by_side(results_ws):
    _finish(export(results_ws, None, ExportSettings(adapter_only=True, verify=False)))

    async def scenario(app, pilot):
        await pilot.press("7")
        app.screen.query_one("#chat-max-tokens", Input).value = "6"
        app.screen.query_one("#message", Input).focus()
        await pilot.press(*"hello", "enter")
        await settle(app, pilot)
        answers = app.screen.query(".chat-answer")
        assert len(answers) == 1 and str(answers[0].render()).strip()
        session = app.screen.sessions["personalized"]
        assert session.model.lora is not None  # the exported adapter, on the base
        assert [m["role"] for m in session.history] == ["user", "assistant"]
        await pilot.press("ctrl+t", *"hi", "enter")
        await settle(app, pilot)
        assert len(app.screen.query(".chat-answer")) == 3
        assert app.screen.sessions["base"].model.label == "base"

    drive(results_ws.root, scenario)
