"""PairsScreen: generate MIPO pairs with live progress, browse them by PMI, inspect, regenerate, delete, and
review them (keep, drop, swap, edit the chosen answer): a reviewed pair is the user's (user_pairs.py)."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Input, Label, Select

from mipo_local import pairs_store, user_pairs
from mipo_local.errors import MipoError
from mipo_local.pairs import generate_pairs, outlook, regenerate_pair, stored_settings
from mipo_local.settings import NEGATIVE_STRATEGIES, PairSettings, with_overrides

from ..format import one_line, plural
from ..widgets.job_runner import JobRunner
from .dialogs import ConfirmScreen, EditTextScreen
from .pair_detail import PairDetailScreen
from .section import SectionScreen


class PairsScreen(SectionScreen):
    SECTION = "pairs"
    AUTO_FOCUS = "#pairs"
    _regenerated: int | None = None  # the pair the running "regenerate" job samples again
    _shown_done = 0  # pairs the running job had committed when the table was last loaded
    BINDINGS = [
        Binding("g", "generate", "Generate"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("enter", "show_pair", "Details", show=False),
        Binding("r", "regenerate", "Regenerate"),
        Binding("d", "delete", "Delete"),
        # Listed in the table's title: the footer has no room left for them.
        Binding("k", "review('keep')", "Keep", show=False),
        Binding("x", "review('drop')", "Drop", show=False),
        Binding("s", "review('swap')", "Swap", show=False),
        Binding("e", "edit_chosen", "Edit chosen", show=False),
    ]

    def compose_body(self) -> ComposeResult:
        defaults = PairSettings()
        with Horizontal(id="pairs-form", classes="form-row"):
            yield Label("negatives")
            yield Select(
                [(s, s) for s in NEGATIVE_STRATEGIES],
                value=defaults.strategy,
                allow_blank=False,
                id="strategy",
                compact=True,
            )
            yield Label("tokens")
            yield Input(str(defaults.max_tokens), type="integer", id="max-tokens", compact=True)
            yield Label("candidates")
            yield Input(str(defaults.candidates), type="integer", id="candidates", compact=True)
            yield Button("Generate", variant="primary", id="generate", compact=True)
        yield JobRunner(id="pairs-job")
        table = DataTable(id="pairs", cursor_type="row", zebra_stripes=True)
        table.add_column("id", key="id", width=4)
        table.add_column("by", key="by", width=3)
        table.add_column("PMI", key="pmi", width=7)
        table.add_column("prompt", key="prompt", width=28)
        table.add_column("chosen", key="chosen")
        yield table

    def reload(self) -> None:
        table = self.query_one("#pairs", DataTable)
        row = table.cursor_row
        table.clear()
        for p in pairs_store.list_pairs(self.ws):
            pmi = "" if p.pmi_margin is None else f"{p.pmi_margin:+.2f}"
            by = "you" if p.source == user_pairs.USER else ""
            table.add_row(str(p.id), by, pmi, one_line(p.prompt, 60), one_line(p.chosen), key=str(p.id))
        table.border_title = f"{table.row_count} pairs (Enter: details; k keep, x drop, s swap, e edit)"
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    # -- generation -----------------------------------------------------------------------------------

    def settings_from_form(self) -> PairSettings | None:
        try:
            max_tokens = int(self.query_one("#max-tokens", Input).value)
            candidates = int(self.query_one("#candidates", Input).value)
        except ValueError:
            self.notify("max tokens and candidates must be whole numbers.", severity="error")
            return None
        strategy = self.query_one("#strategy", Select).value
        return with_overrides(PairSettings(), strategy=strategy, max_tokens=max_tokens, candidates=candidates)

    @on(Button.Pressed, "#generate")
    def action_generate(self) -> None:
        settings = self.settings_from_form()
        if settings is None:
            return
        try:
            another = outlook(self.ws, settings)
        except MipoError:
            another = None  # the job reports the same error when it plans
        if another is None or not another.another_batch:
            self._start(settings)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._start(settings)

        self.app.push_screen(
            ConfirmScreen(
                f"Every prompt already has its pairs. Sample another batch of {plural(another.todo, 'pair')} "
                "with these settings?"
            ),
            answered,
        )

    def _start(self, settings: PairSettings) -> None:
        ws = self.ws
        record = {"mode": "pairs", "description": "Pair generation", "settings": asdict(settings)}
        self._shown_done = 0
        self.query_one(JobRunner).start("pairs", lambda: generate_pairs(ws, settings), resume=record)

    def resume_job(self, record: dict) -> None:
        self._start(stored_settings(record["settings"]))

    def action_cancel_job(self) -> None:
        self.query_one(JobRunner).cancel()

    @on(JobRunner.Progressed)
    def job_moved(self, message: JobRunner.Progressed) -> None:
        if message.event.done != self._shown_done:  # a chunk of pairs was committed
            self._shown_done = message.event.done
            self.reload()

    @on(JobRunner.Failed)
    def job_stopped(self) -> None:
        self.reload()

    @on(JobRunner.Finished)
    def job_finished(self, message: JobRunner.Finished) -> None:
        self.reload()
        if message.name == "regenerate":
            pair = self.app.attempt(pairs_store.get_pair, self.ws, self._regenerated)
            if pair is not None:
                self.notify(f"Pair {pair.id} regenerated with seed {message.result}.")
                self._show(pair)
            return
        s = message.result
        self.notify(
            f"{s.generated} new pairs ({s.already_done} already done, {s.dropped} dropped, "
            f"{s.skipped_prompts} prompts skipped)."
        )

    # -- browsing ---------------------------------------------------------------------------------------

    def _selected_id(self) -> int | None:
        table = self.query_one("#pairs", DataTable)
        if not table.row_count:
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    @on(DataTable.RowSelected, "#pairs")
    def action_show_pair(self) -> None:
        pair_id = self._selected_id()
        pair = None if pair_id is None else self.app.attempt(pairs_store.get_pair, self.ws, pair_id)
        if pair is not None:
            self._show(pair)

    def _show(self, pair) -> None:
        def closed(choice: str | None) -> None:
            if choice == "delete":
                self._delete(pair.id)
            elif choice == "regenerate":
                self._regenerate(pair.id)

        self.app.push_screen(PairDetailScreen(pair), closed)

    def action_regenerate(self) -> None:
        pair_id = self._selected_id()
        if pair_id is not None:
            self._regenerate(pair_id)

    def _regenerate(self, pair_id: int) -> None:
        """Sample the pair again with a fresh seed, in the job runner (it loads the model)."""
        ws = self.ws
        self._regenerated = pair_id
        self.query_one(JobRunner).start("regenerate", lambda: regenerate_pair(ws, pair_id))

    def action_delete(self) -> None:
        pair_id = self._selected_id()
        if pair_id is not None:
            self._delete(pair_id)

    def _delete(self, pair_id: int) -> None:
        def answered(yes: bool | None) -> None:
            if yes and self.app.succeeded(pairs_store.remove_pair, self.ws, pair_id):
                self.reload()
                self.notify(f"Deleted pair {pair_id}.")

        self.app.push_screen(ConfirmScreen(f"Delete pair {pair_id}?"), answered)

    # -- review: the user's own choices ---------------------------------------------------------------

    def action_review(self, action: str) -> None:
        pair_id = self._selected_id()
        if pair_id is not None:
            self._review(pair_id, action)

    def _review(self, pair_id: int, action: str, chosen: str | None = None) -> None:
        if self.app.succeeded(user_pairs.review_pair, self.ws, pair_id, action, chosen):
            self.reload()
            done = {
                "keep": "Kept",
                "drop": "Dropped",
                "swap": "Swapped",
                "edit": "Rewrote the chosen answer of",
            }
            self.notify(f"{done[action]} pair {pair_id}." + ("" if action == "drop" else " It is yours now."))

    def action_edit_chosen(self) -> None:
        pair_id = self._selected_id()
        pair = None if pair_id is None else self.app.attempt(pairs_store.get_pair, self.ws, pair_id)
        if pair is None:
            return

        def saved(text: str | None) -> None:
            if text is not None:
                self._review(pair.id, "edit", text)

        title = f"The answer you want for: {one_line(pair.prompt, 80)} (ctrl+s saves, escape cancels)"
        self.app.push_screen(EditTextScreen(title, pair.chosen), saved)

    def palette_commands(self):
        yield SystemCommand(
            "Generate pairs", "Sample chosen/rejected answers for every prompt", self.action_generate
        )
        yield SystemCommand(
            "Regenerate the selected pair", "Sample it again with a fresh seed", self.action_regenerate
        )
        yield SystemCommand("Cancel pair generation", "Stop after the current chunk", self.action_cancel_job)
        for action, what in (("keep", "Keep it as one of yours"), ("swap", "Exchange chosen and rejected"),
                             ("drop", "Delete it; pair generation never samples it again")):  # fmt: skip
            yield SystemCommand(
                f"{action.capitalize()} the selected pair", what, partial(self.action_review, action)
            )
        yield SystemCommand(
            "Edit the selected pair's chosen answer", "Write the answer you want", self.action_edit_chosen
        )
