"""Helpers shared by the CLI command modules: the workspace, progress drawing, tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

import click

from ..progress import Log, Progress, format_eta
from ..validation import ID_MAX
from ..workspace import Workspace


def open_workspace(ctx: click.Context, *, create: bool = False) -> Workspace:
    """The workspace named by --workspace / MIPO_LOCAL_HOME / the XDG default."""
    root = (ctx.find_root().obj or {}).get("workspace")
    return Workspace.open(root, create=create)


pass_ctx = click.pass_context

# Row ids: SQLite's integers are 64-bit, so a larger number is refused by click rather than by sqlite3.
ID = click.IntRange(1, ID_MAX)


def _bar(fraction: float, width: int = 28) -> str:
    filled = int(round(fraction * width))
    return "#" * filled + "-" * (width - filled)


PIPED_EVERY_S = 10.0  # when piped, a line at least this often while a job moves


class ProgressPrinter:
    """Draws Progress events as one updating line on a terminal; when piped, a line per ~10% of the job,
    per new phase, and at least every PIPED_EVERY_S seconds."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_line: dict[str, tuple[int, str, float]] = {}  # stage -> (tenth, phase, when)
        self._last_draw = 0.0
        self._open_line = False

    def __call__(self, event: Progress | Log) -> None:
        if isinstance(event, Log):
            self._end_line()
            prefix = "warning: " if event.level == "warning" else ""
            click.echo(f"{prefix}{event.message}", err=True)
            return
        rate = f" {event.rate:.2f} {event.unit}/s" if event.rate else ""
        metrics = "".join(f" {k}={_fmt(v)}" for k, v in event.metrics.items())
        phase = f" {event.phase}:" if event.phase else ""
        counts = f" {event.done}/{event.total} {event.unit}" if event.total > 0 else ""
        line = (
            f"{event.stage:>7} [{_bar(event.fraction)}]{phase}{counts}"
            f"{rate} ETA {format_eta(event.eta_s)}{metrics} {event.message}"
        ).rstrip()
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw < 0.1 and event.done < event.total:
                return
            self._last_draw = now
            width = click.get_terminal_size()[0] if hasattr(click, "get_terminal_size") else 100
            self.stream.write("\r" + line[: max(20, width - 1)].ljust(min(width - 1, 120)))
            self.stream.flush()
            self._open_line = True
            if event.done >= event.total:
                self._end_line()
        else:
            tenth = int(event.fraction * 10)
            last = self._last_line.get(event.stage)
            if last is None or last[:2] != (tenth, event.phase) or now - last[2] >= PIPED_EVERY_S:
                self._last_line[event.stage] = (tenth, event.phase, now)
                click.echo(line, err=True)

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

    def close(self) -> None:
        self._end_line()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def drive(events: Iterable[Progress | Log]):
    """Consume a job's events, drawing progress; returns the job generator's return value."""
    printer = ProgressPrinter()
    gen = iter(events)
    try:
        while True:
            try:
                printer(next(gen))
            except StopIteration as stop:
                return stop.value
    finally:
        printer.close()
        close = getattr(gen, "close", None)
        if close:
            close()  # on Ctrl-C this runs the job's cleanup (commit finished work, release the lock)


def table(rows: list[list[str]], headers: list[str], empty: str | None = None) -> None:
    """Print a plain aligned table on stdout; with no rows and an `empty` hint, the hint alone."""
    if not rows and empty is not None:
        click.echo(empty)
        return
    cols = list(zip(headers, *rows, strict=False)) if rows else [(h,) for h in headers]
    widths = [min(60, max(len(str(c)) for c in col)) for col in cols]

    def fmt(row):
        cells = []
        for value, w in zip(row, widths, strict=False):
            text = str(value).replace("\n", " ")
            cells.append((text[: w - 1] + "…") if len(text) > w else text.ljust(w))
        return "  ".join(cells).rstrip()

    click.echo(fmt(headers))
    for row in rows:
        click.echo(fmt(row))
