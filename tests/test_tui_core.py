"""The app's shell: the headless-core rule, navigation, help, palette, errors. Also the pilot helpers."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from textual.notifications import Notify
from textual.worker import WorkerFailed

from tui.app import make_app


def drive(ws_dir, scenario, size=(100, 32), hook=None):
    """Run the real app on `ws_dir` under Textual's pilot; returns the notifications it showed.

    `hook(message)` sees every message the app handles (Textual's message_hook)."""
    notes = []

    def on_message(message):
        if isinstance(message, Notify):
            notes.append(message.notification)
        if hook is not None:
            hook(message)

    async def main():
        app = make_app(ws_dir)
        try:
            async with app.run_test(size=size, message_hook=on_message) as pilot:
                await pilot.pause()
                await scenario(app, pilot)
        finally:
            app.ws.close()

    asyncio.run(main())
    return notes


async def settle(app, pilot):
    """Wait for the running jobs to end and their messages to be handled."""
    try:
        await app.workers.wait_for_complete()
    except WorkerFailed:
        pass  # the app handles it (a notification); the tests assert on that
    await pilot.pause()
    await pilot.pause()


def test_headless_core_never_imports_textual():
    code = (
        "import sys, mipo_local, mipo_local.cli.main, mipo_local.pairs, mipo_local.train.loop;"
        "assert 'textual' not in sys.modules, 'textual was imported';"
        "import tui.app; assert 'textual' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sections_help_and_palette(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")
    seen = []

    async def scenario(app, pilot):
        for key in "1234567":
            await pilot.press(key)
            seen.append(type(app.screen).__name__)
        await pilot.press("f1")  # works while the chat's message box has the focus
        seen.append(type(app.screen).__name__)
        await pilot.press("escape", "escape", "4")  # close help, leave the message box, go to Train
        seen.append(type(app.screen).__name__)
        commands = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Go to Pairs", "Go to Chat", "Help", "Start training"} <= set(commands)

    drive(tiny_workspace.root, scenario)
    assert seen == [
        "ProfileScreen", "PromptsScreen", "PairsScreen", "TrainScreen", "ExportScreen", "EvaluateScreen",
        "ChatScreen", "HelpScreen", "TrainScreen",
    ]  # fmt: skip


def test_library_errors_are_notifications_not_crashes(tiny_workspace):
    tiny_workspace.add_context("I am Ana.")

    async def scenario(app, pilot):
        await pilot.press("3", "g")  # generate pairs without any prompt
        await settle(app, pilot)
        assert app.is_running and type(app.screen).__name__ == "PairsScreen"

    notes = drive(tiny_workspace.root, scenario)
    errors = [n for n in notes if n.severity == "error"]
    assert len(errors) == 1 and "There are no prompts yet." in errors[0].message
    assert errors[0].title == "Invalid input"
