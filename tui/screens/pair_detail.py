"""PairDetailScreen: one pair, chosen and rejected side by side, with the contexts that produced them."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from mipo_local.pairs_store import Pair


def _score_line(pair: Pair) -> str:
    if not pair.scores:
        return "not scored"
    s = pair.scores
    return f"PMI margin {pair.pmi_margin:+.3f} = PMI(chosen) {s['pmi_chosen']:+.3f} - PMI(rejected) {s['pmi_rejected']:+.3f}"


class PairDetailScreen(ModalScreen[str | None]):
    """Dismisses with "delete" or "regenerate" when the user asks for that, else None."""

    BINDINGS = [
        Binding("escape,q", "dismiss_none", "Close"),
        Binding("r", "regenerate", "Regenerate"),
        Binding("d", "delete", "Delete pair"),
    ]

    def __init__(self, pair: Pair) -> None:
        super().__init__()
        self.pair = pair

    def compose(self) -> ComposeResult:
        p = self.pair
        negative = (
            f"[b]Negative context[/] (c'): {escape(p.neg_context)}"
            if p.neg_context
            else f"[b]Negative prompt[/] (x'): {escape(p.neg_prompt)}"
            if p.neg_prompt
            else "[b]Negative[/]: the same prompt with no context"
        )
        with VerticalScroll(id="pair-detail", classes="dialog dialog-wide"):
            yield Static(f"[b]Pair {p.id}[/]  {p.strategy} · seed {p.seed} · {_score_line(p)}")
            yield Static(f"[b]Context[/] (c): {escape(p.context)}")
            yield Static(negative)
            yield Static(f"[b]Prompt[/] (x): {escape(p.prompt)}")
            with Horizontal(id="pair-sides"):
                with Vertical(classes="pair-side"):
                    yield Static("[b green]chosen[/] (y+, with your context)")
                    yield Static(escape(p.chosen), classes="pair-text")
                with Vertical(classes="pair-side"):
                    yield Static("[b red]rejected[/] (y-)")
                    yield Static(escape(p.rejected), classes="pair-text")
        yield Footer()

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def action_delete(self) -> None:
        self.dismiss("delete")

    def action_regenerate(self) -> None:
        self.dismiss("regenerate")
