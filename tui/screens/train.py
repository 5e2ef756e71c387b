"""TrainScreen: the training form with the defaults filled in; start, cancel, resume; live curves."""

from __future__ import annotations

from rich.markup import escape
from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Button, Input, Label, Static

from mipo_local.progress import format_eta
from mipo_local.settings import TrainSettings, with_overrides
from mipo_local.train import runs
from mipo_local.train.loop import train

from ..widgets.job_runner import JobRunner
from ..widgets.train_plots import TrainPlots
from .dialogs import clear_field_error, error_label, show_field_error
from .section import SectionScreen

# The fields offered in the form, in order; the rest keep their defaults (settings.py).
FORM_FIELDS = [
    ("epochs", "epochs"),
    ("lr", "learning rate"),
    ("beta", "DPO beta"),
    ("sft_weight", "SFT anchor"),
    ("other_context_kl", "KL anchor"),
    ("user_weight", "user weight"),
    ("rank", "LoRA rank"),
    ("grad_accum", "grad accum"),
    ("max_len", "max tokens"),
    ("threads", "CPU threads"),
]
_TYPES = {
    "epochs": int,
    "rank": int,
    "grad_accum": int,
    "max_len": int,
    "threads": int,
    "lr": float,
    "beta": float,
    "sft_weight": float,
    "other_context_kl": float,
    "user_weight": float,
}


class TrainScreen(SectionScreen):
    SECTION = "train"
    AUTO_FOCUS = "#start"
    BINDINGS = [
        Binding("s", "start", "Start"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("r", "resume", "Resume"),
    ]

    def compose_body(self) -> ComposeResult:
        defaults = TrainSettings()
        with Horizontal(id="train-body"):
            with Vertical(id="train-form"):
                with Grid(id="train-fields"):
                    for name, label in FORM_FIELDS:
                        value = getattr(defaults, name)
                        yield Label(label)
                        yield Input(
                            "" if value is None else str(value),
                            placeholder="auto",
                            id=f"f-{name}",
                            compact=True,
                        )
                yield error_label("train-error")
                with Horizontal(id="train-buttons"):
                    yield Button("Start", variant="primary", id="start", compact=True)
                    yield Button("Cancel", id="cancel", compact=True)
                    yield Button("Resume", id="resume", compact=True)
            with Vertical(id="train-view"):
                yield Static(id="run-state")
                yield TrainPlots(id="train-plots")
        yield JobRunner(id="train-job")

    def reload(self) -> None:
        self._show_run(self._run_to_show())

    def _run_to_show(self) -> runs.Run | None:
        """The running run, else the newest run with training steps to plot (a run that stopped before
        its first step has none), else the newest run."""
        every = runs.list_runs(self.ws)
        if every and every[-1].status == "running":
            return every[-1]
        stepped = [r for r in every if runs.read_log(self.ws, r.id, "train")]
        return (stepped or every or [None])[-1]

    def _show_run(self, run: runs.Run | None, eta: float | None = None) -> None:
        state = self.query_one("#run-state", Static)
        if run is None:
            state.update(f"No run yet; {self.ws.count('pairs')} pairs ready to train on.")
            self.query_one(TrainPlots).show([])
            return
        log = runs.read_log(self.ws, run.id)
        steps = [x for x in log if x["kind"] == "train"]
        line = f"[b]{run.name}[/]: {run.status}"
        if run.round > 1:  # a later self-improvement round names the run whose model sampled its pairs
            line += f" · {escape(run.describe_round())}"
        if steps:
            last = steps[-1]
            total = next((x.get("total_steps") for x in reversed(log) if x["kind"] == "info"), None)
            line += (
                f" · step {last['step']}/{total or '?'} · loss {last['loss']:.4f} · margin {last['margin']:+.3f}"
                f" · acc {last['accuracy']:.2f} · {last['tokens_per_s']:.0f} tok/s"
            )
            if run.status == "running":
                line += f" · ETA {format_eta(eta)}"
        state.update(line)
        self.query_one(TrainPlots).show(log)

    # -- the form ----------------------------------------------------------------------------------------

    def settings_from_form(self) -> TrainSettings | None:
        """The form's settings; a field that is not a number shows its error under the form and keeps
        the focus, so the next keys edit it instead of firing the screen's hotkeys."""
        values = {}
        error = self.query_one("#train-error", Label)
        for name, label in FORM_FIELDS:
            field = self.query_one(f"#f-{name}", Input)
            text = field.value.strip()
            if not text:
                continue
            try:
                values[name] = _TYPES[name](text)
            except ValueError:
                kind = "a whole number" if _TYPES[name] is int else "a number"
                show_field_error(error, field, f"The {label} must be {kind}, not '{text}'.")
                return None
        clear_field_error(error)
        return with_overrides(TrainSettings(), **values)

    # -- jobs --------------------------------------------------------------------------------------------

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        settings = self.settings_from_form()
        if settings is None or self._pairs_running():
            return
        name = runs.new_run_name(self.ws)
        self._run(name, lambda ws: train(ws, settings, run_name=name))

    @on(Button.Pressed, "#resume")
    def action_resume(self) -> None:
        every = runs.list_runs(self.ws)
        unfinished = [r for r in every if r.status != "finished"]
        if not unfinished:
            self.notify(
                "Every run has finished; start a new one (s)."
                if every
                else "There is no run to resume yet; start one (s).",
                severity="warning",
            )
            return
        self.resume_job({"run": unfinished[-1].name})

    def _pairs_running(self) -> bool:
        """Refuse to train while pairs are generated (here or by the CLI): the run would miss them."""
        pairs = next((j for j in self.ws.running_jobs() if j["kind"] == "pairs"), None)
        if pairs is not None:
            self.notify(
                "Pairs are being generated; training now would leave them out. "
                "Wait for that job to finish, or cancel it in the Pairs section (c).",
                title="Job already running",
                severity="warning",
                timeout=10,
            )
        return pairs is not None

    def resume_job(self, record: dict) -> None:
        if self._pairs_running():
            return
        name = record["run"]
        self._run(name, lambda ws: train(ws, TrainSettings(), run_name=name, resume=True))

    def _run(self, name: str, job) -> None:
        ws = self.ws
        record = {"mode": "train", "description": f"Training run {name}", "run": name}
        self.query_one(JobRunner).start("train", lambda: job(ws), resume=record)
        self._current = name

    @on(Button.Pressed, "#cancel")
    def action_cancel_job(self) -> None:
        self.query_one(JobRunner).cancel()

    @on(JobRunner.Progressed)
    def step_done(self, message: JobRunner.Progressed) -> None:
        self._show_run(runs.get_run(self.ws, self._current), message.event.eta_s)

    @on(JobRunner.Failed)
    def job_failed(self) -> None:
        self.reload()

    @on(JobRunner.Finished)
    def job_finished(self, message: JobRunner.Finished) -> None:
        self.reload()
        s = message.result
        held = f", held-out accuracy {s.final['accuracy']:.2f}" if s.final else ""
        self.notify(f"Run {s.run} finished: {s.steps} steps on {s.train_pairs} pairs{held}.")

    def palette_commands(self):
        yield SystemCommand(
            "Start training", "LoRA DPO on your pairs with the form's settings", self.action_start
        )
        yield SystemCommand("Resume training", "Continue the latest unfinished run", self.action_resume)
        yield SystemCommand(
            "Cancel training", "Stop after the current step (checkpoints are kept)", self.action_cancel_job
        )
