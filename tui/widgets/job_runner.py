"""JobRunner: runs one library job at a time in a thread worker and shows its progress.

A job is a callable returning either a generator of `Progress` / `Log` events (the library's long jobs)
or a plain value (short work such as preparing a model). The worker turns events into messages; closing
the generator between events is how a job is cancelled, so the library commits what it finished.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ProgressBar
from textual.worker import Worker, WorkerState, get_current_worker

from mipo_local.errors import Cancelled, MipoError
from mipo_local.progress import Log, Progress, format_eta

from ..format import error_sentence

PENDING_KEY = "tui.interrupted_job"  # workspace config: the job to offer again when the app reopens


POST_EVERY_S = 0.1  # a job yields at every decode step; the screen redraws at most this often


def describe(event: Progress) -> str:
    """One line for a progress event: the phase and what it is doing, counts, rate, ETA, the job's metrics."""
    rate = f"  {event.rate:.2f} {event.unit}/s" if event.rate else ""
    metrics = "".join(
        f"  {k} {v:.4g}" if isinstance(v, float) else f"  {k} {v}" for k, v in event.metrics.items()
    )
    doing = " · ".join(x for x in (event.phase, event.message) if x)
    counts = f"{event.done}/{event.total} {event.unit}{rate}" if event.total > 0 else ""
    return "  ".join(x for x in (doing, counts, f"ETA {format_eta(event.eta_s)}{metrics}") if x)


def stopped_line(name: str, last: Progress | None) -> str:
    """What a stopped job kept, from its last progress event."""
    if last is None:
        return f"{name}: stopped; finished work was saved."
    if "kept" in last.metrics:
        return f"Stopped: {last.metrics['kept']} {last.unit} kept."
    return f"Stopped: {last.done} of {last.total} {last.unit} finished and saved."


class JobRunner(Vertical):
    """A progress bar, a status line, and the worker that runs the job behind them."""

    @dataclass
    class Progressed(Message):
        runner: JobRunner
        event: Progress

        @property
        def control(self) -> JobRunner:
            return self.runner

    @dataclass
    class Emitted(Message):
        """Anything else a job yields (the text pieces of a streamed chat answer)."""

        runner: JobRunner
        item: Any

        @property
        def control(self) -> JobRunner:
            return self.runner

    @dataclass
    class Finished(Message):
        runner: JobRunner
        name: str
        result: Any

        @property
        def control(self) -> JobRunner:
            return self.runner

    @dataclass
    class Failed(Message):
        """The job raised (a MipoError, Cancelled included); the user was already notified."""

        runner: JobRunner
        name: str
        error: BaseException

        @property
        def control(self) -> JobRunner:
            return self.runner

    SAVED = "Finished work was saved; start it again to continue."

    def __init__(
        self, *, id: str | None = None, classes: str | None = None, cancelled_note: str = SAVED
    ) -> None:
        """`cancelled_note`: what the user reads once a job they cancelled has stopped."""
        super().__init__(id=id, classes=classes)
        self.cancelled_note = cancelled_note
        self._stop = threading.Event()
        self._user_cancelled = False
        self._worker: Worker | None = None
        self._name = ""
        self._resume: dict | None = None
        self._last: Progress | None = None  # the latest event shown
        self._posted = (0.0, None)  # (when, (done, phase)) of the latest event posted

    def compose(self) -> ComposeResult:
        yield ProgressBar(total=None, show_eta=False, id="job-bar")
        yield Label("", id="job-status")

    @property
    def busy(self) -> bool:
        """True while the worker's thread runs (also while a cancelled job is closing)."""
        return self._worker is not None and self._worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    def start(self, name: str, job: Callable[[], Any], *, resume: dict | None = None) -> bool:
        """Run `job` in a thread. `resume`: what to offer again if the app closes before it ends."""
        if self.busy:
            self.app.notify(
                f"A {self._name} job is still running; wait for it or cancel it.", severity="warning"
            )
            return False
        self._stop.clear()
        self._user_cancelled = False
        self._name = name
        self._resume = resume
        self._last = None
        self._posted = (0.0, None)
        jobs = getattr(self.app, "jobs", None)
        if jobs is not None:
            jobs.add(self)  # the app waits for it before quitting
        if resume is not None:
            self.app.ws.set_config(PENDING_KEY, resume)
        self.add_class("-running")
        self.query_one("#job-bar", ProgressBar).update(total=None, progress=0)
        self.set_status(f"{name}: starting...")
        self._worker = self._run(name, job)
        return True

    @property
    def job_name(self) -> str:
        return self._name

    def cancel(self) -> None:
        """Ask the job to stop after its current unit of work; what it finished is kept."""
        if self.busy:
            self._user_cancelled = True
            self._stop.set()
            self.set_status(f"{self._name}: stopping after the current step...")

    def stop_for_quit(self) -> None:
        """Stop the job for the app to close; the resume record stays, so reopening offers it again."""
        if self.busy:
            self._stop.set()
            self.set_status(f"{self._name}: stopping after the current step, then quitting...")

    def on_unmount(self) -> None:
        # Closing the app: stop at the next event and keep the resume record, so reopening offers it.
        self._stop.set()

    def set_status(self, text: str) -> None:
        self.query_one("#job-status", Label).update(text)

    @work(thread=True, exit_on_error=False, group="job")
    def _run(self, name: str, job: Callable[[], Any]) -> Any:
        worker = get_current_worker()
        produced = job()
        if not hasattr(produced, "__next__"):
            return produced
        while True:
            if self._stop.is_set() or worker.is_cancelled:
                produced.close()  # runs the job's cleanup in this thread: commit, release the lock
                raise Cancelled(f"The {name} job was cancelled; finished work was saved.")
            try:
                event = next(produced)
            except StopIteration as stop:
                return stop.value
            if isinstance(event, Progress):
                if self._due(event):
                    self.post_message(self.Progressed(self, event))
            else:
                self.post_message(self.Emitted(self, event))

    def _due(self, event: Progress) -> bool:
        """Post an event when units were finished, the phase changed, or POST_EVERY_S has passed."""
        now, milestone = time.monotonic(), (event.done, event.phase)
        when, last = self._posted
        if milestone == last and now - when < POST_EVERY_S:
            return False
        self._posted = (now, milestone)
        return True

    def on_job_runner_progressed(self, message: Progressed) -> None:
        event = message.event
        self._last = event
        if self._stop.is_set():
            return  # the line says it is stopping until the job has stopped
        bar = self.query_one("#job-bar", ProgressBar)
        bar.update(total=1000, progress=round(1000 * event.fraction))
        self.set_status(f"{self._name}: {describe(event)}")

    def on_job_runner_emitted(self, message: Emitted) -> None:
        if isinstance(message.item, Log):
            self.set_status(f"{self._name}: {message.item.message}")
            if message.item.level == "warning":
                self.app.notify(message.item.message, severity="warning")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place a job's end is handled: result, MipoError, cancellation or a bug."""
        if event.worker is not self._worker or event.state not in (
            WorkerState.SUCCESS,
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            return
        self.remove_class("-running")
        interrupted = event.state == WorkerState.CANCELLED or (
            self._stop.is_set() and not self._user_cancelled
        )
        if self._resume is not None and not interrupted and self.is_attached:
            self.app.ws.set_config(PENDING_KEY, None)
        quitting = getattr(self.app, "quitting", False)
        if quitting:
            self.app.job_stopped()
        if event.state == WorkerState.SUCCESS:
            # Cleared, so that no line of this job is on screen when the next one starts; the screen
            # says what the job produced.
            self.set_status("")
            self.query_one("#job-bar", ProgressBar).update(total=None, progress=0)
            self.post_message(self.Finished(self, self._name, event.worker.result))
            return
        error = event.worker.error
        if isinstance(error, Cancelled) or event.state == WorkerState.CANCELLED:
            # A job with its own words for a stop (a chat answer) says them; the others say what they kept.
            own = self.cancelled_note != self.SAVED
            self.set_status(
                f"{self._name}: {self.cancelled_note}" if own else stopped_line(self._name, self._last)
            )
            if not quitting:
                self.app.notify(self.cancelled_note, title="Cancelled")
            error = error if isinstance(error, Cancelled) else Cancelled("cancelled")
        elif isinstance(error, MipoError):
            self.set_status(f"{self._name}: stopped.")
            self.app.notify(error_sentence(error), title=error.title, severity="error", timeout=10)
        else:  # a bug: a readable line on screen, the traceback in the Textual log
            self.set_status(f"{self._name}: failed.")
            self.app.notify(
                f"{type(error).__name__}: {error}", title="Unexpected error", severity="error", timeout=15
            )
            self.log.error(repr(error))
        self.post_message(self.Failed(self, self._name, error))
