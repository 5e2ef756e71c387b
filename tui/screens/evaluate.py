"""EvaluateScreen: `mipo-local eval` before/after numbers explained, plotted and shown as sample answers,
and a blind A/B test of the user's own."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, DataTable, Input, Label, Static

from mipo_local.evaluate import unseen_samples
from mipo_local.settings import EvalSettings, with_overrides
from mipo_local.train import runs

from .. import blind_ab
from ..widgets.eval_plot import EvalPlot
from ..widgets.job_runner import JobRunner
from ..widgets.sample_answers import SampleAnswers
from .blind_ab import BlindABScreen
from .dialogs import clear_field_error, error_label, show_field_error
from .section import SectionScreen

SAMPLES_SHOWN = 3
STOPPED_NOTE = "The evaluation was stopped; it stores its report only once it finishes."
REFERENCE = "- (reference)"  # the base is what accuracy, margin and drift are measured against

# One plain sentence per number of the table, in its order.
EXPLANATIONS = [
    (
        "Held-out pair accuracy",
        "the share of pairs kept out of training where the personalized model prefers the answer written "
        "for you; 0.50 is a coin toss.",
    ),
    ("Mean DPO margin", "how strongly it prefers those answers; above 0 is the right way round."),
    (
        "Context sensitivity (PMI)",
        "how much more likely a model's own answers are with your context than with a stranger's; "
        "higher means answers that are more about you.",
    ),
    (
        "Neutral text log-prob",
        "how well each model still predicts ordinary text that has nothing to do with you; closer to 0 is "
        "better.",
    ),
    (
        "Drift",
        "how much worse the personalized model predicts that ordinary text than the base; near 0% means "
        "nothing else is damaged.",
    ),
]
JUDGE_EXPLANATION = (
    "Judge",
    "a second model scores each answer from 1 (ignores who you are) to 5 (made for you).",
)


def report_rows(r: dict) -> list[tuple[str, str, str]]:
    """The metrics of an evaluation report as (metric, base, personalized) rows, as `mipo-local eval` prints them."""
    rows = [
        ("held-out pair accuracy", REFERENCE, f"{r['pair_accuracy']:.2f}"),
        ("mean DPO margin", REFERENCE, f"{r['mean_margin']:+.4f}"),
        ("context sensitivity (PMI, nats)", f"{r['base']['pmi']:+.3f}", f"{r['personalized']['pmi']:+.3f}"),
        (
            "neutral text log-prob / token",
            f"{r['base']['neutral_logp']:.4f}",
            f"{r['personalized']['neutral_logp']:.4f}",
        ),
        ("drift", REFERENCE, f"{r['drift'] * 100:+.2f}%"),
    ]
    if r.get("judge"):
        j = r["judge"]
        rows.append(("judge score (1-5)", f"{r['base']['judge']:.2f}", f"{r['personalized']['judge']:.2f}"))
        rows.append(("judge win / tie / loss", REFERENCE, f"{j['win']} / {j['tie']} / {j['loss']}"))
    return rows


def explanations(r: dict) -> str:
    lines = [f"{name}: {sentence}" for name, sentence in EXPLANATIONS]
    if r.get("judge"):
        lines.append(f"{JUDGE_EXPLANATION[0]}: {JUDGE_EXPLANATION[1]}")
    lines.append(f"{REFERENCE}: the base is what these numbers are measured against.")
    return "\n".join(lines)


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
        yield error_label("eval-error")
        yield JobRunner(id="eval-job", cancelled_note=STOPPED_NOTE)
        with VerticalScroll(id="eval-body"):
            yield Static(id="eval-title")
            table = DataTable(id="eval-table", cursor_type="none", zebra_stripes=True)
            table.add_column("metric", key="metric", width=32)
            table.add_column("base", key="base", width=13)
            table.add_column("personalized", key="personalized", width=14)
            yield table
            yield Static(id="eval-explain", classes="section-hint", markup=False)
            yield EvalPlot(id="eval-plot")
            yield Static(id="eval-samples-title")
            yield SampleAnswers(id="eval-samples")

    def reload(self) -> None:
        report = blind_ab.latest_report(self.ws)
        table = self.query_one("#eval-table", DataTable)
        table.clear()
        title = self.query_one("#eval-title", Static)
        shown = report is not None
        for part in ("#eval-table", "#eval-explain", "#eval-plot", "#eval-samples-title", "#eval-samples"):
            self.query_one(part).display = shown
        if report is None:
            title.update(" No evaluation yet: export a run, then press Evaluate (v).")
            return
        for row in report_rows(report):
            table.add_row(*row)
        table.styles.height = table.row_count + 3  # rows, header and border: all of it, no inner scroll
        self.query_one("#eval-explain", Static).update(explanations(report))
        run = runs.get_run(self.ws, report["run"])
        self.query_one(EvalPlot).show(runs.read_log(self.ws, run.id) if run else [], report)
        unseen, left_out = unseen_samples(self.ws, report)
        self.query_one(SampleAnswers).show([s for _, s in unseen[:SAMPLES_SHOWN]])
        self.query_one("#eval-samples-title", Static).update(
            f"[b]Sample answers[/] on held-out prompts the model never trained on ({len(unseen)} such prompts"
            f"{f', {left_out} left out that share a training prompt' if left_out else ''}); "
            "the blind A/B (b) draws from the same prompts."
        )
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

        error = self.query_one("#eval-error", Label)
        numbers = {}
        for key, label in (("n", "held-out prompts"), ("max-tokens", "max tokens")):
            field = self.query_one(f"#eval-{key}", Input)
            try:
                numbers[key] = int(field.value)
            except ValueError:
                show_field_error(error, field, f"The {label} must be a whole number, not '{field.value}'.")
                return
        clear_field_error(error)
        n, max_tokens = numbers["n"], numbers["max-tokens"]
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
        unseen, left_out = unseen_samples(self.ws, report)
        if not unseen:
            self.notify(
                f"All {left_out} held-out prompts are also prompts of training pairs, so a blind test would "
                "measure memory: add new prompts, generate their pairs and train again.",
                severity="warning",
            )
            return
        self.app.push_screen(BlindABScreen(report, unseen, left_out), lambda _: self.reload())

    def palette_commands(self):
        yield SystemCommand(
            "Evaluate the latest export", "Before/after numbers through llama.cpp", self.action_evaluate
        )
        yield SystemCommand(
            "Blind A/B test", "Pick the better of two answers, unlabelled", self.action_blind_ab
        )
