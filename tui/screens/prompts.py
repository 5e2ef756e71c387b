"""PromptsScreen: the user's questions; add, import a file, synthesize with the base model, search, filter."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Select

from mipo_local.errors import UserInputError
from mipo_local.prompts_import import parse_prompts
from mipo_local.synth import N_RANGE, synthesize_prompts
from mipo_local.validation import require_int

from ..format import one_line, plural
from ..widgets.job_runner import JobRunner
from .dialogs import AskScreen, ConfirmScreen, EditTextScreen
from .section import SectionScreen

SOURCES = [("all sources", ""), ("typed", "user"), ("imported", "import"), ("synthetic", "synthetic")]


class PromptsScreen(SectionScreen):
    SECTION = "prompts"
    AUTO_FOCUS = "#prompts"
    _shown_done = 0  # prompts the running synthesis had added when the table was last loaded
    BINDINGS = [
        Binding("a", "add", "Add"),
        Binding("i", "import_file", "Import"),
        Binding("s", "synthesize", "Synthesize"),
        Binding("d", "delete", "Delete"),
        Binding("slash", "search", "Search"),
        Binding("c", "cancel_job", "Cancel job", show=False),
    ]

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="prompt-filters"):
            yield Input(placeholder="search (/)", id="search", compact=True)
            yield Select(SOURCES, value="", allow_blank=False, id="source", compact=True)
        table = DataTable(id="prompts", cursor_type="row", zebra_stripes=True)
        table.add_column("id", key="id", width=4)
        table.add_column("source", key="source", width=9)
        table.add_column("prompt", key="text")
        yield table
        yield JobRunner(id="prompts-job")

    def reload(self) -> None:
        query = self.query_one("#search", Input).value.strip().casefold()
        source = self.query_one("#source", Select).value or None
        table = self.query_one("#prompts", DataTable)
        table.clear()
        shown = [p for p in self.ws.prompts(source) if query in p.text.casefold()]
        for p in shown:
            table.add_row(str(p.id), p.source, one_line(p.text), key=str(p.id))
        total = self.ws.count("prompts")
        table.border_title = f"{len(shown)} of {total} prompts"

    @on(Input.Changed, "#search")
    @on(Select.Changed, "#source")
    def filters_changed(self) -> None:
        self.reload()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_add(self) -> None:
        def add(text: str):
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if not lines:
                raise UserInputError("Type at least one prompt, one per line.")
            return self.ws.add_prompts(lines)

        self.app.push_screen(EditTextScreen("New prompts, one per line:", check=add), self._added)

    def action_import_file(self) -> None:
        def read(path: str):
            if not path.strip():
                raise UserInputError("Type the path of a file of prompts.")
            texts, fmt = parse_prompts(Path(path.strip()).expanduser())
            return self.ws.add_prompts(texts, source="import"), fmt

        def imported(outcome) -> None:
            if outcome is not None:
                self._added(outcome[0], f" from {outcome[1]}")

        self.app.push_screen(
            AskScreen(
                "Import prompts: a text file (one per line), a Markdown list, JSONL with a `prompt` field, "
                "or a ChatGPT conversations.json:",
                placeholder="~/questions.md",
                check=read,
            ),
            imported,
        )

    def _added(self, outcome, where: str = "") -> None:
        if outcome is None:
            return
        added, duplicates = outcome
        dup = f" ({plural(len(duplicates), 'duplicate')} skipped)" if duplicates else ""
        self.notify(f"Added {plural(len(added), 'prompt')}{where}{dup}.")
        self.reload()

    def action_synthesize(self) -> None:
        def how_many(answer: str) -> int:
            try:
                n = int(answer.strip())
            except ValueError:
                raise UserInputError(
                    f"The number of prompts must be a whole number, not '{answer.strip()}'."
                ) from None
            require_int("The number of prompts", n, *N_RANGE)
            return n

        def chosen(n: int | None) -> None:
            if n is not None:
                ws = self.ws
                self._shown_done = 0
                self.query_one(JobRunner).start("synth", lambda: synthesize_prompts(ws, n))

        self.app.push_screen(
            AskScreen("How many prompts should the base model propose?", "16", check=how_many), chosen
        )

    def action_cancel_job(self) -> None:
        self.query_one(JobRunner).cancel()

    @on(JobRunner.Progressed)
    def job_moved(self, message: JobRunner.Progressed) -> None:
        if message.event.done != self._shown_done:  # synthesized prompts are committed as they come
            self._shown_done = message.event.done
            self.reload()

    @on(JobRunner.Failed)
    def job_stopped(self) -> None:
        self.reload()

    @on(JobRunner.Finished)
    def job_finished(self, message: JobRunner.Finished) -> None:
        self.notify(f"Added {plural(message.result, 'synthetic prompt')}.")
        self.reload()

    def action_delete(self) -> None:
        table = self.query_one("#prompts", DataTable)
        if not table.row_count:
            return
        prompt_id = int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

        def answered(yes: bool | None) -> None:
            if yes:
                self.app.succeeded(self.ws.remove_prompt, prompt_id)
                self.reload()

        self.app.push_screen(ConfirmScreen(f"Delete prompt {prompt_id}?"), answered)

    def palette_commands(self):
        yield SystemCommand("Add prompts", "Type prompts, one per line", self.action_add)
        yield SystemCommand(
            "Import prompts from a file", "Text, Markdown, JSONL or ChatGPT export", self.action_import_file
        )
        yield SystemCommand(
            "Synthesize prompts", "Let the base model propose questions", self.action_synthesize
        )
