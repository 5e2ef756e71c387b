"""The Prompts section: add, import files of every format, search and filter, delete."""

from __future__ import annotations

import json

from textual.widgets import DataTable, Input, Select, TextArea

from tests.test_tui_core import drive


def _rows(app):
    table = app.screen.query_one("#prompts", DataTable)
    return [str(table.get_row_at(i)[2]) for i in range(table.row_count)]


def test_import_add_search_filter_delete(tiny_workspace, tmp_path):
    tiny_workspace.add_context("I am Ana.")
    md = tmp_path / "questions.md"
    md.write_text(
        "# My questions\n\n- What should I cook tonight?\n- How do I fix a flat tyre?\n", encoding="utf-8"
    )
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Which tent should I buy?"}) + "\n" + "{oops\n", encoding="utf-8")

    async def scenario(app, pilot):
        await pilot.press("2")
        for path in (md, jsonl):
            await pilot.press("i")
            app.screen.query_one(Input).value = str(path)
            await pilot.press("enter")
        # The broken file's error stays in the open dialog, beside its path.
        error = str(app.screen.query_one("#dialog-error").render())
        assert f"{jsonl}: line 2 is not valid JSON" in error
        await pilot.press("escape")
        await pilot.press("a")
        app.screen.query_one(TextArea).text = "What should I cook tonight?\nWhere can I swim near Lyon?\n"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert _rows(app) == [
            "What should I cook tonight?",
            "How do I fix a flat tyre?",
            "Where can I swim near Lyon?",
        ]
        await pilot.press("slash", *"cook")
        await pilot.pause()
        assert _rows(app) == ["What should I cook tonight?"]
        app.screen.query_one("#search", Input).value = ""
        app.screen.query_one("#source", Select).value = "user"
        await pilot.pause()
        assert _rows(app) == ["Where can I swim near Lyon?"]
        app.screen.query_one("#source", Select).value = ""
        app.screen.query_one("#prompts", DataTable).focus()
        await pilot.press("down", "d", "y")
        await pilot.pause()
        assert len(_rows(app)) == 2

    notes = drive(tiny_workspace.root, scenario)
    assert [p.text for p in tiny_workspace.prompts()] == [
        "What should I cook tonight?",
        "Where can I swim near Lyon?",
    ]
    messages = [n.message for n in notes]
    assert "Added 2 prompts from markdown." in messages
    assert "Added 1 prompt (1 duplicate skipped)." in messages
    assert not [n for n in notes if n.severity == "error"]
