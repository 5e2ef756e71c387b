"""ProfileScreen: the user's contexts (add, edit, delete, import from a file) and the base model."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Label

from mipo_local import modelsource
from mipo_local.errors import UserInputError
from mipo_local.prompts_import import read_text_file

from ..format import one_line
from ..widgets.job_runner import JobRunner
from ..widgets.model_line import ModelLine
from .dialogs import AskScreen, ConfirmScreen, EditTextScreen
from .model_picker import ModelPickerScreen
from .section import SectionScreen


class ProfileScreen(SectionScreen):
    SECTION = "profile"
    AUTO_FOCUS = "#contexts"
    BINDINGS = [
        Binding("a", "add", "Add"),
        Binding("e", "edit", "Edit"),
        Binding("d", "delete", "Delete"),
        Binding("i", "import_file", "Import"),
        Binding("m", "change_model", "Model"),
    ]

    def compose_body(self) -> ComposeResult:
        yield ModelLine(id="model-line")
        yield Label("Your contexts: what the model should know about you.", classes="section-hint")
        table = DataTable(id="contexts", cursor_type="row", zebra_stripes=True)
        table.add_column("id", key="id", width=4)
        table.add_column("label", key="label", width=10)
        table.add_column("context", key="text")
        yield table
        yield JobRunner(id="profile-job")

    def reload(self) -> None:
        self.query_one(ModelLine).show(self.ws)
        table = self.query_one("#contexts", DataTable)
        row = table.cursor_row
        table.clear()
        for c in self.ws.contexts():
            table.add_row(str(c.id), one_line(c.label or ""), one_line(c.text), key=str(c.id))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    def _selected_id(self) -> int | None:
        table = self.query_one("#contexts", DataTable)
        if not table.row_count:
            self.notify("There are no contexts yet; press a to add one.", severity="warning")
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def action_add(self) -> None:
        def added(context) -> None:
            if context is not None:
                self.reload()
                self.notify("Context added.")

        self.app.push_screen(
            EditTextScreen(
                "A new context: who you are, what you like, how you want answers.", check=self.ws.add_context
            ),
            added,
        )

    def action_edit(self) -> None:
        context_id = self._selected_id()
        if context_id is None:
            return
        current = next(c.text for c in self.ws.contexts() if c.id == context_id)

        def save(text: str) -> bool:
            self.ws.update_context(context_id, text)
            return True

        def saved(done: bool | None) -> None:
            if done:
                self.reload()

        self.app.push_screen(EditTextScreen(f"Edit context {context_id}", current, check=save), saved)

    def action_delete(self) -> None:
        context_id = self._selected_id()
        if context_id is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.app.succeeded(self.ws.remove_context, context_id)
                self.reload()

        self.app.push_screen(
            ConfirmScreen(f"Delete context {context_id}? Pairs made from it keep their copy."), answered
        )

    def action_import_file(self) -> None:
        def read(path: str):
            if not path.strip():
                raise UserInputError("Type the path of a UTF-8 text file.")
            return path, self.ws.add_context(read_text_file(Path(path.strip()).expanduser()))

        def imported(outcome) -> None:
            if outcome is not None:
                self.reload()
                self.notify(f"Context imported from {outcome[0].strip()}.")

        self.app.push_screen(
            AskScreen("Import a context from a UTF-8 text file:", placeholder="~/me.txt", check=read),
            imported,
        )

    def action_change_model(self) -> None:
        def chosen(spec: str | None) -> None:
            if spec:
                ws = self.ws
                self.query_one(JobRunner).start("model", lambda: modelsource.set_base_model(ws, spec))

        self.app.push_screen(ModelPickerScreen(), chosen)

    @on(JobRunner.Finished)
    def model_set(self, message: JobRunner.Finished) -> None:
        self.reload()
        self.notify(f"Base model: {message.result.name}.")

    def palette_commands(self):
        from textual.app import SystemCommand

        yield SystemCommand("Add a context", "Write a new context", self.action_add)
        yield SystemCommand("Import a context from a file", "Read a UTF-8 text file", self.action_import_file)
        yield SystemCommand(
            "Change the base model", "Catalog, GGUF path or Ollama name", self.action_change_model
        )
