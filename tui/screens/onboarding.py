"""OnboardingScreen: first run in three short steps (model, a first context, some prompts)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, ContentSwitcher, Footer, Label, Static, TextArea

from mipo_local import catalog, modelsource
from mipo_local.errors import MipoError
from mipo_local.synth import synthesize_prompts

from ..format import error_sentence
from ..widgets.job_runner import JobRunner
from ..widgets.model_line import model_summary
from .dialogs import error_label, show_field_error
from .model_picker import ModelPickerScreen

SYNTH_N = 8
ONBOARDED_KEY = "tui.onboarded"  # set once the user finished or skipped the first-run steps


class OnboardingScreen(Screen[None]):
    """Dismissed when the user finishes or skips; the app then opens the Profile section."""

    def compose(self) -> ComposeResult:
        yield Static("[b]Welcome to mipo-local[/]: three steps and you are ready.", id="onboarding-title")
        with ContentSwitcher(initial="step-model", id="steps"):
            with Vertical(id="step-model", classes="step"):
                yield Label("1/3  The base model: the small local model you will personalize.")
                yield Static(id="model-state")
                with Horizontal(classes="buttons"):
                    yield Button("Use the default", variant="primary", id="model-keep")
                    yield Button("Choose another...", id="model-pick")
            with Vertical(id="step-context", classes="step"):
                yield Label(
                    "2/3  A first context: a few lines about you (who you are, what you like, "
                    "how you want answers)."
                )
                yield TextArea(id="context-text", soft_wrap=True)
                yield error_label("context-error")
                with Horizontal(classes="buttons"):
                    yield Button("Save and continue", variant="primary", id="context-save")
                    yield Button("Skip", id="context-skip")
            with Vertical(id="step-prompts", classes="step"):
                yield Label("3/3  Questions you tend to ask, one per line (or let the model propose some).")
                yield TextArea(id="prompts-text", soft_wrap=True)
                yield error_label("prompts-error")
                with Horizontal(classes="buttons"):
                    yield Button("Add and finish", variant="primary", id="prompts-add")
                    yield Button(f"Synthesize {SYNTH_N}", id="prompts-synth")
                    yield Button("Finish", id="prompts-finish")
        yield JobRunner(id="onboarding-job")
        yield Footer()

    def on_mount(self) -> None:
        self._show_model()

    def _show_model(self) -> None:
        ws = self.app.ws
        chosen = ws.get_config(modelsource.CONFIG_KEY) is not None
        if chosen:
            text = model_summary(ws)
        else:
            e = catalog.default_entry()
            text = f"None yet. The embedded default is {e.name} ({e.size_mb} MB, shipped with mipo-local)"
            text += (
                f"; it is prepared once as a {e.ready_mb} MB F16 working copy."
                if e.ready_mb != e.size_mb
                else "."
            )
        self.query_one("#model-state", Static).update(text)
        self.query_one("#model-keep", Button).label = "Keep it" if chosen else "Use the default"

    def _go(self, step: str) -> None:
        self.query_one("#steps", ContentSwitcher).current = step
        focus = {"step-context": "#context-text", "step-prompts": "#prompts-text"}.get(step)
        if focus:
            self.query_one(focus).focus()

    # -- step 1: model ------------------------------------------------------------------------------

    @on(Button.Pressed, "#model-keep")
    def keep_model(self) -> None:
        if self.app.ws.get_config(modelsource.CONFIG_KEY) is not None:
            self._go("step-context")
        else:
            self._set_model(modelsource.DEFAULT_SPEC)

    @on(Button.Pressed, "#model-pick")
    def pick_model(self) -> None:
        self.app.push_screen(ModelPickerScreen(), lambda spec: spec and self._set_model(spec))

    def _set_model(self, spec: str) -> None:
        ws = self.app.ws
        self.query_one(JobRunner).start("model", lambda: modelsource.set_base_model(ws, spec))

    @on(JobRunner.Finished)
    def job_finished(self, message: JobRunner.Finished) -> None:
        if message.name == "model":
            self._show_model()
            self._go("step-context")
        elif message.name == "synth":
            self.notify(f"Added {message.result} synthetic prompts.")
            self.finish()

    # -- step 2: context ----------------------------------------------------------------------------------

    @on(Button.Pressed, "#context-save")
    def save_context(self) -> None:
        text = self.query_one("#context-text", TextArea).text
        if self._saved("#context-text", "#context-error", self.app.ws.add_context, text):
            self._go("step-prompts")

    def _saved(self, field: str, error: str, save, *args) -> bool:
        """Save through the library; its error shows under the field, which keeps the focus."""
        try:
            save(*args)
        except MipoError as err:
            show_field_error(self.query_one(error, Label), self.query_one(field), error_sentence(err))
            return False
        return True

    @on(Button.Pressed, "#context-skip")
    def skip_context(self) -> None:
        self._go("step-prompts")

    # -- step 3: prompts ----------------------------------------------------------------------------------

    @on(Button.Pressed, "#prompts-add")
    def add_prompts(self) -> None:
        lines = [ln for ln in self.query_one("#prompts-text", TextArea).text.splitlines() if ln.strip()]
        if lines and not self._saved("#prompts-text", "#prompts-error", self.app.ws.add_prompts, lines):
            return
        self.finish()

    @on(Button.Pressed, "#prompts-synth")
    def synth_prompts(self) -> None:
        ws = self.app.ws
        self.query_one(JobRunner).start("synth", lambda: synthesize_prompts(ws, SYNTH_N))

    @on(Button.Pressed, "#prompts-finish")
    def finish(self) -> None:
        self.app.ws.set_config(ONBOARDED_KEY, True)
        self.dismiss(None)
