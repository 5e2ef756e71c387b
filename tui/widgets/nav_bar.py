"""NavBar: the sections of the journey on one line, the current one highlighted; click or press its key."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static

from ..sections import SECTIONS


class NavBar(Static):
    def __init__(self, current: str) -> None:
        super().__init__(id="nav-bar")
        self.current = current

    def on_mount(self) -> None:
        parts = []
        for key, mode, title in SECTIONS:
            text = f" {key} {escape(title)} "
            style = "reverse bold" if mode == self.current else "dim"
            parts.append(f"[@click=app.go('{mode}')][{style}]{text}[/][/]")
        self.update(" ".join(parts))
