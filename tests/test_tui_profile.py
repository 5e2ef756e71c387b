"""Onboarding and the Profile section, driven through the real app."""

from __future__ import annotations

from textual.widgets import DataTable, Input, TextArea

from mipo_local import modelsource
from mipo_local.workspace import Workspace
from tests.test_tui_core import drive, settle


def test_onboarding_picks_a_gguf_writes_a_context_and_prompts(ws_dir, tiny_gguf):
    async def scenario(app, pilot):
        assert type(app.screen).__name__ == "OnboardingScreen"
        await pilot.click("#model-pick")
        await pilot.click("#spec")
        app.screen.query_one("#spec", Input).value = str(tiny_gguf)
        await pilot.press("enter")
        await settle(app, pilot)
        await pilot.press(*"I am Ana, a vegan chef.")
        await pilot.click("#context-save")
        await pilot.press(*"What should I cook?", "enter", *"How do I relax?")
        await pilot.click("#prompts-add")
        await pilot.pause()
        assert type(app.screen).__name__ == "ProfileScreen"
        table = app.screen.query_one("#contexts", DataTable)
        assert table.row_count == 1

    drive(ws_dir, scenario)
    ws = Workspace.open(ws_dir)
    assert modelsource.base_model(ws).path == str(tiny_gguf)
    assert [c.text for c in ws.contexts()] == ["I am Ana, a vegan chef."]
    assert [p.text for p in ws.prompts()] == ["What should I cook?", "How do I relax?"]
    ws.close()


def test_add_edit_import_delete_contexts(tiny_workspace, tmp_path):
    tiny_workspace.add_context("I am Ana.")
    good = tmp_path / "me.txt"
    good.write_text("I live in Lyon and cycle to work.\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken")

    async def scenario(app, pilot):
        await pilot.press("a")
        await pilot.press(*"I answer in French.")
        await pilot.press("ctrl+s")
        await pilot.press("e")  # edits the selected (first) context
        app.screen.query_one(TextArea).text = "I am Ana, a nurse."
        await pilot.press("ctrl+s")
        for path in (good, bad):
            await pilot.press("i")
            app.screen.query_one(Input).value = str(path)
            await pilot.press("enter")
        # The bad file's error stays beside the path, in the open dialog.
        assert "line 2 is not valid UTF-8" in str(app.screen.query_one("#dialog-error").render())
        await pilot.press("escape")
        await pilot.press("down", "d", "y")  # delete the second context
        await pilot.pause()
        assert app.screen.query_one("#contexts", DataTable).row_count == 2

    notes = drive(tiny_workspace.root, scenario)
    texts = [c.text for c in tiny_workspace.contexts()]
    assert texts == ["I am Ana, a nurse.", "I live in Lyon and cycle to work."]
    assert "Context imported from " + str(good) + "." in [n.message for n in notes]
