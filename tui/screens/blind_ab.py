"""BlindABScreen: two answers to a held-out prompt in hidden order; the user picks, the app keeps score."""

from __future__ import annotations

import random

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from .. import blind_ab


class BlindABScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("a", "vote('A')", "A is better"),
        Binding("b", "vote('B')", "B is better"),
        Binding("t", "vote('tie')", "Tie"),
        Binding("escape,q", "dismiss_none", "Close"),
    ]

    def __init__(self, report: dict, samples: list[tuple[int, dict]], left_out: int, seed: int | None = None):
        """`samples`: the report's answers on prompts unseen in training; `left_out`: how many were not."""
        super().__init__()
        self.report = report
        self.samples, self.left_out = samples, left_out
        self.export_id = report["export_id"]
        self.rng = random.Random(seed)
        self.trial: blind_ab.Trial | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="blind-ab", classes="dialog dialog-wide"):
            yield Static(id="ab-score")
            yield Static(self._disjoint_note(), id="ab-disjoint", classes="section-hint", markup=False)
            yield Static(id="ab-prompt")
            with Horizontal(id="ab-sides"):
                with Vertical(classes="pair-side"):
                    yield Static("[b]Answer A[/]")
                    yield Static(id="ab-a", classes="pair-text")
                with Vertical(classes="pair-side"):
                    yield Static("[b]Answer B[/]")
                    yield Static(id="ab-b", classes="pair-text")
            yield Static(id="ab-last")
        yield Footer()

    def _disjoint_note(self) -> str:
        kept = len(self.samples)
        note = f"{kept} held-out prompt{'' if kept == 1 else 's'}, none of them the prompt of a training pair"
        if self.left_out:
            note += f" ({self.left_out} left out: the model trained on the same prompt)"
        return note + "."

    def on_mount(self) -> None:
        self._next()

    def _next(self) -> None:
        mine = blind_ab.votes(self.app.ws, self.export_id)
        rate = blind_ab.win_rate(mine)
        score = (
            "no votes yet"
            if rate is None
            else f"personalized wins {100 * rate:.0f}% of your {len(mine)} votes"
        )
        self.query_one("#ab-score", Static).update(f"[b]Blind A/B[/], export #{self.export_id}: {score}")
        self.trial = blind_ab.next_trial(self.samples, len(mine), self.rng)
        t = self.trial
        self.query_one("#ab-prompt", Static).update(
            f"[dim]Context:[/] {escape(t.context)}\n[b]Prompt:[/] {escape(t.prompt)}"
        )
        self.query_one("#ab-a", Static).update(escape(t.answers[0]) or "[dim](empty answer)[/]")
        self.query_one("#ab-b", Static).update(escape(t.answers[1]) or "[dim](empty answer)[/]")

    def action_vote(self, shown: str) -> None:
        if self.trial is None:
            return
        pick = blind_ab.record_vote(self.app.ws, self.export_id, self.trial, shown)
        a, b = self.trial.sources
        self.query_one("#ab-last", Static).update(
            f"[dim]Last one: A was {a}, B was {b}; your vote went to {pick}.[/]"
        )
        self._next()

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
