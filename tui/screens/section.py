"""SectionScreen: the frame every section shares (navigation bar, body, footer with its keys)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer

from mipo_local.workspace import Workspace

from ..widgets.nav_bar import NavBar


class SectionScreen(Screen):
    SECTION = ""

    def compose(self) -> ComposeResult:
        yield NavBar(self.SECTION)
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    @property
    def ws(self) -> Workspace:
        return self.app.ws

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Re-read what this section shows from the workspace (other sections or the CLI may change it)."""
