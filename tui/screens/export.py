"""ExportScreen: choose quant, adapter, Ollama name; export with progress; the files and how to run them."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Checkbox, Input, Label, Select, TextArea

from mipo_local import modelsource
from mipo_local.errors import MipoError
from mipo_local.settings import QUANT_TYPES, ExportSettings, with_overrides
from mipo_local.train import runs

from ..widgets.export_summary import ExportSummary
from ..widgets.job_runner import JobRunner
from .dialogs import ConfirmScreen
from .section import SectionScreen

OLLAMA_NAME_KEY = "tui.ollama_name"  # workspace config: the Ollama name last typed here


class ExportScreen(SectionScreen):
    SECTION = "export"
    AUTO_FOCUS = "#export"
    BINDINGS = [
        Binding("x", "export", "Export"),
        Binding("y", "copy_commands", "Copy commands"),
    ]

    def compose_body(self) -> ComposeResult:
        defaults = ExportSettings()
        with Horizontal(classes="form-row"):
            yield Label("run")
            yield Select([], prompt="latest finished", id="run", compact=True)
            yield Label("quant")
            yield Select(
                [(q, q) for q in QUANT_TYPES],
                value=defaults.quant,
                allow_blank=False,
                id="quant",
                compact=True,
            )
            yield Checkbox("adapter only", defaults.adapter_only, id="adapter-only", compact=True)
        with Horizontal(classes="form-row"):
            yield Label("Ollama name")
            yield Input(
                self.ws.get_config(OLLAMA_NAME_KEY) or "",
                placeholder="optional: also `ollama create` it",
                id="ollama-name",
                compact=True,
            )
            yield Checkbox("replace", False, id="force", compact=True)
            yield Button("Export", variant="primary", id="export", compact=True)
        # An export writes its folder and record only once it finishes (the fidelity check included).
        yield JobRunner(id="export-job", cancelled_note="The export was stopped and left nothing behind.")
        yield ExportSummary(id="export-summary")

    @on(Input.Changed, "#ollama-name")
    def ollama_name_changed(self, event: Input.Changed) -> None:
        self.ws.set_config(OLLAMA_NAME_KEY, event.value.strip() or None)

    def reload(self) -> None:
        from mipo_local.export import list_exports

        finished = [r.name for r in runs.list_runs(self.ws) if r.status == "finished"]
        select = self.query_one("#run", Select)
        current = select.value
        select.set_options([(name, name) for name in reversed(finished)])
        if current in finished:
            select.value = current
        exports = list_exports(self.ws)
        raw = self.ws.get_config(modelsource.CONFIG_KEY)
        base_path = raw["path"] if raw else "BASE.gguf"
        name = self.query_one("#ollama-name", Input).value.strip() or None
        self.query_one(ExportSummary).show(exports[-1] if exports else None, base_path, name)

    @on(Button.Pressed, "#export")
    def action_export(self) -> None:
        from mipo_local.export import export, occupied_folder

        run_name = self.query_one("#run", Select).selection  # None: the latest finished run
        settings = with_overrides(
            ExportSettings(),
            quant=self.query_one("#quant", Select).value,
            adapter_only=self.query_one("#adapter-only", Checkbox).value,
        )
        name = self.query_one("#ollama-name", Input).value.strip() or None
        ws = self.ws

        def start(force: bool) -> None:
            self.query_one(JobRunner).start(
                "export", lambda: export(ws, run_name, settings, None, name, force)
            )

        if self.query_one("#force", Checkbox).value:
            start(True)
            return
        try:
            folder = occupied_folder(ws, run_name, settings)
        except MipoError:
            folder = None  # the job reports the same error in its own words
        if folder is None:
            start(False)
            return
        self.app.push_screen(
            ConfirmScreen(f"An export of this run with these settings is already in {folder}. Replace it?"),
            lambda yes: yes and start(True),
        )

    @on(JobRunner.Finished)
    def exported(self, message: JobRunner.Finished) -> None:
        self.reload()
        self.notify(f"Exported to {message.result.path}.")

    def action_copy_commands(self) -> None:
        text = self.query_one("#export-commands", TextArea).text
        if text:
            self.app.copy_to_clipboard(text)
            self.notify("Commands copied to the clipboard.")

    def palette_commands(self):
        yield SystemCommand(
            "Export the latest run", "A quantized GGUF and an Ollama Modelfile", self.action_export
        )
        yield SystemCommand(
            "Copy the run commands", "llama.cpp and Ollama commands", self.action_copy_commands
        )
