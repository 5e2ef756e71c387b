"""Dialogs and confirmations: an invalid submit keeps the dialog open, deletes and second batches ask,
training waits for pair generation, and the app's small sentences say what is true."""

from __future__ import annotations

from textual.widgets import Input, Label, Markdown, Static, TextArea

from mipo_local import catalog, pairs_store
from mipo_local.pairs import outlook
from mipo_local.settings import PairSettings
from mipo_local.train import runs
from tests.test_tui_core import drive, settle
from tests.test_tui_pairs import _fill, _start_generation, paced  # noqa: F401 (paced is a fixture)
from tests.trainhelp import insert_pairs


def _error(app) -> str:
    label = app.screen.query_one("#dialog-error", Label)
    assert label.display  # shown beside the field, not only in a notification
    return str(label.render())


def test_an_invalid_context_keeps_the_dialog_open_and_keys_go_to_the_field(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")

    async def scenario(app, pilot):
        await pilot.press("a", "ctrl+s")  # an empty context
        assert type(app.screen).__name__ == "EditTextScreen"
        assert _error(app) == "The context is empty: write a few words about yourself."
        await pilot.press(*"I edit; d")  # e, d and i are Profile hotkeys: they must land in the text
        assert type(app.screen).__name__ == "EditTextScreen"
        assert app.screen.query_one(TextArea).text == "I edit; d"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert type(app.screen).__name__ == "ProfileScreen"

    notes = drive(tiny_workspace.root, scenario)
    assert [c.text for c in tiny_workspace.contexts()] == ["I am Ana.", "I edit; d"]
    assert not [n for n in notes if n.severity == "error"]


def test_a_non_number_keeps_the_synthesis_dialog_open(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")

    async def scenario(app, pilot):
        await pilot.press("2", "s")
        app.screen.query_one(Input).value = ""
        await pilot.press(*"lots", "enter")
        assert type(app.screen).__name__ == "AskScreen"
        assert _error(app) == "The number of prompts must be a whole number, not 'lots'."
        app.screen.query_one(Input).value = ""
        await pilot.press(*"5000", "enter")
        assert _error(app) == "The number of prompts must be a whole number from 1 to 1000, not 5000."
        await pilot.press("escape")
        await pilot.pause()
        assert type(app.screen).__name__ == "PromptsScreen"

    drive(tiny_workspace.root, scenario)
    assert tiny_workspace.count("prompts") == 0 and tiny_workspace.running_jobs() == []


def test_a_missing_file_keeps_the_import_dialog_open(tiny_workspace, tmp_path):
    tiny_workspace.add_context("I am Ana.")
    good = tmp_path / "questions.txt"
    good.write_text("Where can I swim?\n", encoding="utf-8")

    async def scenario(app, pilot):
        await pilot.press("2", "i", *str(tmp_path / "nope.txt"), "enter")
        assert type(app.screen).__name__ == "AskScreen"
        assert "nope.txt" in _error(app)
        app.screen.query_one(Input).value = str(good)
        await pilot.press("enter")
        await pilot.pause()
        assert type(app.screen).__name__ == "PromptsScreen"

    notes = drive(tiny_workspace.root, scenario)
    assert [p.text for p in tiny_workspace.prompts()] == ["Where can I swim?"]
    assert "Added 1 prompt from text." in [n.message for n in notes]


def test_pair_delete_asks_first(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")
    insert_pairs(tiny_workspace, [("How do I make tea?", "Ahoy! Tea.", "Tea.")])
    (pair,) = pairs_store.list_pairs(tiny_workspace)

    async def scenario(app, pilot):
        await pilot.press("3", "enter", "d")
        assert type(app.screen).__name__ == "ConfirmScreen"
        assert f"Delete pair {pair.id}?" in str(app.screen.query_one(Label).render())
        await pilot.press("n")
        assert tiny_workspace.count("pairs") == 1
        await pilot.press("d")  # from the list this time
        await pilot.press("y")
        await pilot.pause()

    notes = drive(tiny_workspace.root, scenario)
    assert tiny_workspace.count("pairs") == 0
    assert f"Deleted pair {pair.id}." in [n.message for n in notes]


def test_generate_asks_before_a_second_batch(tiny_workspace):
    _fill(tiny_workspace, n_prompts=2)
    settings = PairSettings()
    assert outlook(tiny_workspace, settings).unpaired == 4  # 2 contexts x 2 prompts, none paired yet
    assert not outlook(tiny_workspace, settings).another_batch
    with tiny_workspace.transaction() as conn:  # one pair of another recipe for each (context, prompt)
        for c in tiny_workspace.contexts():
            for p in tiny_workspace.prompts():
                conn.execute(
                    "INSERT INTO pairs(pair_key, prompt, context, strategy, chosen, rejected, seed, settings,"
                    " created_at) VALUES (?, ?, ?, 'test', 'yes', 'no', 0, '{}', 0)",
                    (f"other-{c.id}-{p.id}", p.text, c.text),
                )
    ahead = outlook(tiny_workspace, settings)
    assert ahead.unpaired == 0 and ahead.todo == 8 and ahead.another_batch  # 2 pairs a prompt by default

    async def scenario(app, pilot):
        await pilot.press("3", "g")
        assert type(app.screen).__name__ == "ConfirmScreen"
        question = str(app.screen.query_one(Label).render())
        assert question.startswith("Every prompt already has its pairs. Sample another batch of 8 pairs")
        await pilot.press("n")
        await settle(app, pilot)

    drive(tiny_workspace.root, scenario)
    assert tiny_workspace.count("pairs") == 4  # nothing sampled


def test_training_waits_for_pair_generation(tiny_workspace, paced):  # noqa: F811
    _fill(tiny_workspace, n_prompts=2)

    async def scenario(app, pilot):
        await _start_generation(app, pilot, paced)
        await pilot.press("4", "s")
        await pilot.pause()
        assert runs.list_runs(tiny_workspace) == []
        await pilot.press("3", "c")
        await settle(app, pilot)

    notes = drive(tiny_workspace.root, scenario)
    refused = [n for n in notes if n.title == "Job already running"]
    assert len(refused) == 1 and refused[0].message.startswith("Pairs are being generated;")
    assert runs.list_runs(tiny_workspace) == []


def test_small_sentences_say_what_is_true(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")

    async def scenario(app, pilot):
        await pilot.press("6", "v")  # evaluate with no export: the library's hint names a CLI command
        await settle(app, pilot)
        await pilot.press("4", "r")  # resume with no run at all
        await pilot.press("ctrl+c")  # Textual's quit hint
        await pilot.press("question_mark")
        help_text = app.screen.query_one(Markdown).source
        assert "`1`..`7`" in help_text and "1`..`9" not in help_text
        await pilot.press("escape", "3")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Import prompts from a file", "Import a context from a file"} <= titles
        command = next(
            c for c in app.get_system_commands(app.screen) if c.title == "Import prompts from a file"
        )
        command.callback()
        await pilot.pause()
        await pilot.pause()
        assert type(app.screen).__name__ == "AskScreen"
        assert "Import prompts" in str(app.screen.query_one(Label).render())

    notes = drive(tiny_workspace.root, scenario)
    messages = [n.message for n in notes]
    assert "There is no run to resume yet; start one (s)." in messages
    assert "Press ctrl+q to quit." in messages
    assert not any("[b]" in m for m in messages)
    assert "There is no export to evaluate yet." in messages
    assert not any("mipo-local " in m or "--" in m for m in messages)  # no CLI instruction in the app


def test_onboarding_names_one_size_per_file(ws_dir):
    default = catalog.default_entry()
    assert (default.size_mb, default.ready_mb) == (98, 270)  # the Q4_1 file and its F16 working copy

    async def scenario(app, pilot):
        state = str(app.screen.query_one("#model-state", Static).render())
        assert f"({default.size_mb} MB, shipped with mipo-local)" in state
        assert f"a {default.ready_mb} MB F16 working copy" in state
        assert str(app.screen.query_one("#model-keep").label) == "Use the default"

    drive(ws_dir, scenario)


def test_onboarding_keeps_an_empty_context_in_its_step_with_the_error(ws_dir, tiny_gguf):
    async def scenario(app, pilot):
        await pilot.click("#model-pick")
        app.screen.query_one("#spec", Input).value = str(tiny_gguf)
        await pilot.press("enter")
        await settle(app, pilot)
        assert str(app.screen.query_one("#model-keep").label) == "Keep it"
        await pilot.click("#context-save")  # nothing typed yet
        error = app.screen.query_one("#context-error", Label)
        assert error.display and str(error.render()).startswith("The context is empty")
        await pilot.press(*"I am Ana.")  # the text area kept the focus
        await pilot.click("#context-save")
        assert app.screen.query_one("#steps").current == "step-prompts"

    drive(ws_dir, scenario)
