"""The Textual app: `mipo-local` with no arguments opens it. It calls the library and holds no ML logic.

`make_app(workspace_dir)` builds the app (the tests use it too); `run_app` runs it in the terminal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from mipo_local import modelsource
from mipo_local.errors import MipoError
from mipo_local.workspace import Workspace

from .format import error_sentence
from .screens.chat import ChatScreen
from .screens.dialogs import ConfirmScreen
from .screens.evaluate import EvaluateScreen
from .screens.export import ExportScreen
from .screens.help import HelpScreen
from .screens.onboarding import ONBOARDED_KEY, OnboardingScreen
from .screens.pairs import PairsScreen
from .screens.profile import ProfileScreen
from .screens.prompts import PromptsScreen
from .screens.train import TrainScreen
from .sections import SECTIONS
from .widgets.job_runner import PENDING_KEY

T = TypeVar("T")

# Palette commands found from every section: (title, help, section, action of that section's screen).
EVERYWHERE = [
    ("Import a context from a file", "Profile: read a UTF-8 text file", "profile", "import_file"),
    (
        "Import prompts from a file",
        "Prompts: text, Markdown, JSONL or ChatGPT export",
        "prompts",
        "import_file",
    ),
]

SCREENS_BY_MODE: dict[str, type[Screen]] = {
    "profile": ProfileScreen,
    "prompts": PromptsScreen,
    "pairs": PairsScreen,
    "train": TrainScreen,
    "export": ExportScreen,
    "evaluate": EvaluateScreen,
    "chat": ChatScreen,
}


class MipoApp(App):
    """mipo-local's terminal app: one workspace, one section per step of the journey."""

    TITLE = "mipo-local"
    CSS_PATH = "app.tcss"
    MODES = {mode: SCREENS_BY_MODE[mode] for _, mode, _ in SECTIONS}
    DEFAULT_MODE = "profile"
    BINDINGS = [
        *(Binding(key, f"go('{mode}')", title, show=False) for key, mode, title in SECTIONS),
        Binding("question_mark,f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, ws: Workspace) -> None:
        super().__init__()
        self.ws = ws
        self.jobs: set = set()  # every JobRunner that started a job: quitting waits for theirs to stop
        self.quitting = False

    def on_mount(self) -> None:
        if self.needs_onboarding():
            self.push_screen(OnboardingScreen(), callback=lambda _: self.offer_interrupted_job())
        else:
            self.offer_interrupted_job()

    def needs_onboarding(self) -> bool:
        if self.ws.get_config(modelsource.CONFIG_KEY) is None:
            return True
        return self.ws.count("contexts") == 0 and not self.ws.get_config(ONBOARDED_KEY)

    def offer_interrupted_job(self) -> None:
        """A job cut short by closing the app: offer to continue it (the library resumes where it stopped)."""
        record = self.ws.get_config(PENDING_KEY)
        if not record:
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                self.ws.set_config(PENDING_KEY, None)
                return
            self.switch_mode(record["mode"])
            self.call_after_refresh(lambda: self.screen.resume_job(record))

        self.push_screen(
            ConfirmScreen(f"{record['description']} was interrupted when the app closed. Continue it?"),
            answered,
        )

    # -- actions -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Section keys work on section screens, not inside dialogs or the onboarding.
        if action == "go":
            return isinstance(self.screen, tuple(SCREENS_BY_MODE.values()))
        return True

    def action_go(self, mode: str) -> None:
        if mode in self.MODES:
            self.switch_mode(mode)

    async def action_quit(self) -> None:
        """Quit at once when no job runs; otherwise stop the jobs, say so, and quit once they stopped."""
        running = [job for job in self.jobs if job.busy]
        if not running:
            self.exit()
            return
        names = " and ".join(sorted({job.job_name for job in running}))
        if not self.quitting:
            self.quitting = True
            for job in running:
                job.stop_for_quit()
        self.notify(
            f"Stopping the {names} job after the current step; the app closes as soon as it has stopped. "
            "Finished work is kept.",
            title="Quitting",
            timeout=60,
        )

    def job_stopped(self) -> None:
        """A job ended while quitting: close the app when it was the last one."""
        if self.quitting and not any(job.busy for job in self.jobs):
            self.exit()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_help_quit(self) -> None:
        # ctrl+c: Textual's own hint is markup, and this app's notifications are plain text.
        self.notify("Press ctrl+q to quit.", title="Do you want to quit?")

    def run_in_section(self, mode: str, action: str) -> None:
        """Open a section and run one of its screen's actions there (a palette command from elsewhere)."""
        self.switch_mode(mode)
        self.call_after_refresh(lambda: getattr(self.screen, f"action_{action}")())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for key, mode, title in SECTIONS:
            yield SystemCommand(
                f"Go to {title}", f"Open the {title} section (key {key})", partial(self.action_go, mode)
            )
        yield SystemCommand("Help", "The journey and the keys", self.action_help)
        for title, help_text, mode, action in EVERYWHERE:
            if not isinstance(screen, SCREENS_BY_MODE[mode]):  # there, the screen offers it itself
                yield SystemCommand(title, help_text, partial(self.run_in_section, mode, action))
        commands = getattr(screen, "palette_commands", None)
        if commands:
            yield from commands()

    # -- errors and notifications --------------------------------------------------------------------------

    def notify(
        self, message: str, *, title: str = "", severity="information", timeout=None, markup=False
    ) -> None:
        # Always plain text: library sentences hold paths and specs such as ollama:NAME[:TAG].
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def attempt(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Call library code from the UI thread; a MipoError becomes a notification, None is returned."""
        try:
            return fn(*args, **kwargs)
        except MipoError as err:
            self.notify(error_sentence(err), title=err.title, severity="error", timeout=10)
            return None

    def succeeded(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Like `attempt`, for calls made for their effect: True when no MipoError was raised."""
        try:
            fn(*args, **kwargs)
        except MipoError as err:
            self.notify(error_sentence(err), title=err.title, severity="error", timeout=10)
            return False
        return True


def make_app(workspace_dir: str | os.PathLike | None = None) -> MipoApp:
    """The app on the workspace at `workspace_dir` (resolved like the CLI's --workspace), created if new."""
    return MipoApp(Workspace.open(workspace_dir, create=True))


def run_app(workspace_dir: str | os.PathLike | None = None) -> None:
    """Run the app in this terminal (what `mipo-local` does with no command)."""
    app = make_app(workspace_dir)
    try:
        app.run()
    finally:
        app.ws.close()
