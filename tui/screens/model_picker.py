"""ModelPickerScreen: choose the base model from the catalog, or give a GGUF path / Ollama / HF spec."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList
from textual.widgets.option_list import Option

from mipo_local import catalog


def _size(e: catalog.CatalogEntry) -> str:
    ready = f" ({e.ready_mb} MB as F16)" if e.ready_mb != e.size_mb else ""
    return f"{e.size_mb} MB{ready}"


class ModelPickerScreen(ModalScreen[str | None]):
    """Dismisses with a model spec (as `mipo-local init --model` takes it), or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        entries = self.app.attempt(catalog.load_catalog) or []
        with Vertical(classes="dialog dialog-wide", id="model-picker"):
            yield Label("Choose a base model (Enter), or type a spec below.", classes="dialog-question")
            yield OptionList(
                *(
                    Option(
                        f"{e.name}  [dim]{e.architecture} · {e.params} · {_size(e)} · {e.license}"
                        f"{' · default' if e.default else ''}[/]",
                        id=e.id,
                    )
                    for e in entries
                ),
                id="catalog",
            )
            yield Input(
                placeholder="/path/to/model.gguf, ollama:NAME[:TAG] or hf:OWNER/REPO/FILE.gguf", id="spec"
            )
            with Horizontal(classes="dialog-buttons"):
                yield Button("Use this spec", variant="primary", id="use-spec")
                yield Button("Cancel", id="cancel")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._use_spec()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "use-spec":
            self._use_spec()
        else:
            self.dismiss(None)

    def _use_spec(self) -> None:
        spec = self.query_one("#spec", Input).value.strip()
        if not spec:
            self.notify("Type a model spec first, or pick one from the list.", severity="warning")
            return
        self.dismiss(spec)

    def action_cancel(self) -> None:
        self.dismiss(None)
