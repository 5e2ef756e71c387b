"""EvaluateScreen: `mipo-local eval` before/after numbers, and a blind A/B test of the user's own."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Input, Label, Static

from mipo_local.settings import EvalSettings, with_overrides

from .. import blind_ab
from ..widgets.job_runner import JobRunner
from .blind_ab import BlindABScreen
from .section import SectionScreen


def report_rows(r: dict) -> list[tuple[str, str, str]]:
    """The metrics of an evaluation report as (metric, base, personalized) rows, as `mipo-local eval` prints them."""
    rows = [
        ("held-out pair accuracy", "", f"{r['pair_accuracy']:.2f}"),
        ("mean DPO margin", "", f"{r['mean_margin']:+.4f}"),
        ("context sensitivity (PMI, nats)", f"{r['base']['pmi']:+.3f}", f"{r['personalized']['pmi']:+.3f}"),
        (
            "neutral text log-prob / token",
            f"{r['base']['neutral_logp']:.4f}",
            f"{r['personalized']['neutral_logp']:.4f}",
        ),
        ("drift", "", f"{r['drift'] * 100:+.2f}%"),
    ]
    if r.get("judge"):
        j = r["judge"]
        rows.append(("judge score (1-5)", f"{r['base']['judge']:.2f}", f"{r['personalized']['judge']:.2f}"))
        rows.append(("judge win / tie / loss", "", f"{j['win']} / {j['tie']} / {j['loss']}"))
    return rows


class EvaluateScreen(SectionScreen):
    SECTION = "evaluate"
    AUTO_FOCUS = "#evaluate"
    BINDINGS = [
        Binding("v", "evaluate", "Evaluate"),
        Binding("b", "blind_ab", "Blind A/B"),
        Binding("c", "cancel_job", "Cancel", show=False),
    ]

    def compose_body(self) -> ComposeResult:
        defaults = EvalSettings()
        with Horizontal(classes="form-row"):
            yield Label("held-out prompts")
            yield Input(str(defaults.n), type="integer", id="eval-n", compact=True)
            yield Label("max tokens")
            yield Input(str(defaults.max_tokens), type="integer", id="eval-max-tokens", compact=True)
            yield Button("Evaluate", variant="primary", id="evaluate", compact=True)
            yield Button("Blind A/B", id="blind-ab-open", compact=True)
        yield JobRunner(id="eval-job")
        yield Static(id="eval-title")
        table = DataTable(id="eval-table", cursor_type="none", zebra_stripes=True)
        table.add_column("metric", key="metric", width=32)
        table.add_column("base", key="base", width=12)
        table.add_column("personalized", key="personalized", width=14)
        yield table

    def reload(self) -> None:
        report = blind_ab.latest_report(self.ws)
        table = self.query_one("#eval-table", DataTable)
        table.clear()
        title = self.query_one("#eval-title", Static)
        if report is None:
            title.update(" No evaluation yet: export a run, then press Evaluate (v).")
            return
        for row in report_rows(report):
            table.add_row(*row)
        mine = blind_ab.votes(self.ws, report["export_id"])
        rate = blind_ab.win_rate(mine)
        ab = (
            ""
            if rate is None
            else f"; your blind A/B: personalized wins {100 * rate:.0f}% of {len(mine)} votes"
        )
        title.update(
            f" Export #{report['export_id']} (run {report['run']}) on {report['n_pairs']} held-out pairs{ab}"
        )

    @on(Button.Pressed, "#evaluate")
    def action_evaluate(self) -> None:
        from mipo_local.evaluate import evaluate

        try:
            n = int(self.query_one("#eval-n", Input).value)
            max_tokens = int(self.query_one("#eval-max-tokens", Input).value)
        except ValueError:
            self.notify("held-out prompts and max tokens must be whole numbers.", severity="error")
            return
        settings = with_overrides(EvalSettings(), n=n, max_tokens=max_tokens)
        ws = self.ws
        self.query_one(JobRunner).start("eval", lambda: evaluate(ws, settings))

    def action_cancel_job(self) -> None:
        self.query_one(JobRunner).cancel()

    @on(JobRunner.Finished)
    def evaluated(self) -> None:
        self.reload()
        self.notify("Evaluation saved; try the blind A/B test (b).")

    @on(Button.Pressed, "#blind-ab-open")
    def action_blind_ab(self) -> None:
        report = blind_ab.latest_report(self.ws)
        if report is None or not report.get("samples"):
            self.notify(
                "The blind A/B test uses an evaluation's answers: press Evaluate (v) first.",
                severity="warning",
            )
            return
        self.app.push_screen(BlindABScreen(report), lambda _: self.reload())

    def palette_commands(self):
        yield SystemCommand(
            "Evaluate the latest export", "Before/after numbers through llama.cpp", self.action_evaluate
        )
        yield SystemCommand(
            "Blind A/B test", "Pick the better of two answers, unlabelled", self.action_blind_ab
        )
