"""The Pairs section: generation with live progress, cancel, resume after the app was closed, details."""

from __future__ import annotations

import time

import pytest
from textual.widgets import DataTable, Input, Static

import tui.screens.pairs as pairs_screen
from mipo_local.pairs import generate_pairs
from tests.test_tui_core import drive, settle
from tui.widgets.job_runner import PENDING_KEY, JobRunner


@pytest.fixture
def paced(monkeypatch):
    """Holds the real pairs job after its first event until the app asks it to stop.

    On a fast machine 18 tiny pairs finish before the pilot's next key press; holding the job makes
    "cancel / close while it runs" deterministic. The job itself is the library's, untouched."""
    state = {"runner": None, "active": True}

    def paced_generate(ws, settings):
        real = generate_pairs(ws, settings)
        try:
            yield next(real)
            deadline = time.monotonic() + 60
            while state["active"] and time.monotonic() < deadline:
                runner = state["runner"]
                if runner is not None and runner._stop.is_set():
                    break
                time.sleep(0.01)
            return (yield from real)
        finally:
            real.close()

    monkeypatch.setattr(pairs_screen, "generate_pairs", paced_generate)
    return state


def _fill(ws, n_prompts=9):
    ws.add_context("I am Ana, a vegan chef in Lisbon.")
    ws.add_context("I am Bo, a pilot who loves jazz.")
    ws.add_prompts([f"What should I do about thing {i}?" for i in range(n_prompts)])


async def _start_generation(app, pilot, paced):
    await pilot.press("3")
    app.screen.query_one("#max-tokens", Input).value = "4"
    paced["runner"] = app.screen.query_one(JobRunner)
    await pilot.press("g")


def test_cancel_keeps_the_app_usable_and_forgets_the_job(tiny_workspace, paced):
    _fill(tiny_workspace)

    async def scenario(app, pilot):
        await _start_generation(app, pilot, paced)
        await pilot.press("c")
        await settle(app, pilot)

    notes = drive(tiny_workspace.root, scenario)
    assert any(n.title == "Cancelled" for n in notes)
    assert tiny_workspace.get_config(PENDING_KEY) is None
    assert tiny_workspace.running_jobs() == []


def test_closing_mid_job_offers_to_continue_then_shows_and_deletes_pairs(tiny_workspace, paced):
    _fill(tiny_workspace, n_prompts=5)  # 2 contexts x 5 prompts x 2 pairs: more than one 16-pair chunk

    async def close_while_running(app, pilot):
        await _start_generation(app, pilot, paced)  # leaving the scenario closes the app mid-job

    drive(tiny_workspace.root, close_while_running)
    assert tiny_workspace.get_config(PENDING_KEY)["mode"] == "pairs"
    assert tiny_workspace.running_jobs() == []  # the job closed cleanly and released its lock
    paced["active"] = False  # the resumed job runs at full speed

    async def reopen(app, pilot):
        assert type(app.screen).__name__ == "ConfirmScreen"
        await pilot.press("y")
        await pilot.pause()
        await settle(app, pilot)
        assert type(app.screen).__name__ == "PairsScreen"
        table = app.screen.query_one("#pairs", DataTable)
        assert table.row_count == 20
        await pilot.press("enter")
        assert type(app.screen).__name__ == "PairDetailScreen"
        shown = " ".join(str(w.render()) for w in app.screen.query(Static))
        first = tiny_workspace.query("SELECT * FROM pairs ORDER BY id LIMIT 1")[0]
        assert first["context"] in shown and first["neg_context"] in shown and "PMI margin" in shown
        await pilot.press("d")
        assert type(app.screen).__name__ == "ConfirmScreen"
        await pilot.press("y")
        await pilot.pause()
        assert table.row_count == 19

    notes = drive(tiny_workspace.root, reopen)
    assert tiny_workspace.count("pairs") == 19
    assert tiny_workspace.get_config(PENDING_KEY) is None
    assert any("new pairs" in n.message for n in notes)


def test_regenerate_a_pair_from_its_detail_view(tiny_workspace):
    from mipo_local import pairs_store
    from mipo_local.settings import PairSettings
    from tests.test_pairs import _run

    _fill(tiny_workspace, n_prompts=2)
    _run(tiny_workspace, PairSettings(max_tokens=8, temperature=0.8, batch_size=8, per_prompt=1))
    before = pairs_store.list_pairs(tiny_workspace)[0]

    async def scenario(app, pilot):
        await pilot.press("3")
        await pilot.press("enter")
        assert type(app.screen).__name__ == "PairDetailScreen"
        await pilot.press("r")
        await settle(app, pilot)
        # The detail view opens again on the regenerated pair.
        assert type(app.screen).__name__ == "PairDetailScreen"
        assert app.screen.pair.id == before.id and app.screen.pair.seed != before.seed
        shown = " ".join(str(w.render()) for w in app.screen.query(Static))
        after = pairs_store.get_pair(tiny_workspace, before.id)
        assert after.chosen[:20] in shown

    notes = drive(tiny_workspace.root, scenario)
    after = pairs_store.get_pair(tiny_workspace, before.id)
    assert after.settings["seed"] != before.settings["seed"]
    assert (after.chosen, after.rejected) != (before.chosen, before.rejected)
    assert tiny_workspace.count("pairs") == 4  # two contexts x two prompts, none added or lost
    assert any(f"Pair {before.id} regenerated with seed {after.settings['seed']}" in n.message for n in notes)
