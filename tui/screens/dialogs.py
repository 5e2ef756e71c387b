"""Small modal dialogs: a yes/no question, a line of text, a longer text.

The two text dialogs take an optional `check`: it turns the submitted text into the dialog's result, or
raises a MipoError. The error's sentence then shows under the field and the dialog stays open with the
text as typed, so the keys the user types next go to the field, never to the screen below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, TextArea

from mipo_local.errors import MipoError

from ..format import error_sentence

Check = Callable[[str], Any]


def error_label(id: str) -> Label:
    """The hidden line under a field where its error shows (dialogs and forms alike)."""
    return Label("", id=id, classes="dialog-error", markup=False)


def show_field_error(label: Label, field: Widget, sentence: str) -> None:
    """Show `sentence` in a field's error line and give the field the focus, so the next keys edit it."""
    label.update(sentence)
    label.add_class("-shown")
    field.focus()


def clear_field_error(label: Label) -> None:
    label.update("")
    label.remove_class("-shown")


class ConfirmScreen(ModalScreen[bool]):
    """Ask a yes/no question; dismisses with True for yes."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="primary", id="yes")
                yield Button(self.no, id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class _CheckedDialog(ModalScreen[Any]):
    """A dialog around one text field whose submit goes through `check` (see the module docstring)."""

    FIELD = ""  # the selector of the field

    def __init__(self, check: Check | None) -> None:
        super().__init__()
        self.check = check

    def error_label(self) -> Label:
        return error_label("dialog-error")

    def submit(self, text: str) -> None:
        if self.check is None:
            self.dismiss(text)
            return
        try:
            result = self.check(text)
        except MipoError as err:
            self.show_error(error_sentence(err))
            return
        self.dismiss(result)

    def show_error(self, sentence: str) -> None:
        show_field_error(self.query_one("#dialog-error", Label), self.query_one(self.FIELD), sentence)

    def action_cancel(self) -> None:
        self.dismiss(None)


class AskScreen(_CheckedDialog):
    """Ask for one line (a file path, a number); dismisses with the checked text, or None when cancelled."""

    FIELD = "#answer"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = "", placeholder: str = "", check: Check | None = None):
        super().__init__(check)
        self.question, self.value, self.placeholder = question, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question", markup=False)
            yield Input(self.value, placeholder=self.placeholder, id="answer")
            yield self.error_label()
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self) -> None:
        self.submit(self.query_one("#answer", Input).value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.submit(self.query_one("#answer", Input).value)
        else:
            self.action_cancel()


class EditTextScreen(_CheckedDialog):
    """Write or edit a longer text (a context, several prompts); ctrl+s saves, escape cancels."""

    FIELD = "#text"
    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, text: str = "", check: Check | None = None) -> None:
        super().__init__(check)
        self.title_text, self.text = title, text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog dialog-wide"):
            yield Label(self.title_text, classes="dialog-question", markup=False)
            yield TextArea(self.text, id="text", soft_wrap=True)
            yield self.error_label()
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def action_save(self) -> None:
        self.submit(self.query_one("#text", TextArea).text)
