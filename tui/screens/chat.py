"""ChatScreen: streaming chat with the exported model, alone or side by side with the base.

ctrl+g marks the last personalized answer good, ctrl+b bad (a fresh answer sampled under the user's
context opens in an editor: saved as it is or as edited, it is the better answer); either makes one of the
user's pairs (user_pairs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, Label, Static

from mipo_local import user_pairs
from mipo_local.conversation import ChatSession, resolve_chat_model, system_from_contexts
from mipo_local.errors import MipoError
from mipo_local.modelsource import base_model
from mipo_local.progress import Log

from ..widgets.job_runner import JobRunner
from .dialogs import EditTextScreen
from .section import SectionScreen

DEFAULT_MAX_TOKENS = ChatSession.__dataclass_fields__["max_tokens"].default


def _loaded(side: str, model: str) -> str:
    """The status line once a side's model is open."""
    if side == "base":
        return "base model loaded."
    if model == "base":
        return "no export yet: the personalized side answers with the base model."
    return f"{model} loaded for the personalized side."


class ChatScreen(SectionScreen):
    SECTION = "chat"
    AUTO_FOCUS = "#message"
    BINDINGS = [
        Binding("ctrl+t", "toggle_compare", "Side by side"),
        Binding("ctrl+r", "reset", "New chat"),
        Binding("ctrl+g", "thumb('good')", "Good"),
        Binding("ctrl+b", "thumb('bad')", "Bad"),
        Binding("escape", "stop", "Stop"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.compare = False
        self.sessions: dict[str, ChatSession] = {}
        self._bubbles: dict[str, Static] = {}
        self._texts: dict[str, str] = {}
        # The (message, answer) marked bad, while a better answer is being sampled.
        self._judged: tuple[str, str] | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label("", id="chat-mode")
            yield Label("max tokens")
            yield Input(str(DEFAULT_MAX_TOKENS), type="integer", id="chat-max-tokens", compact=True)
        yield VerticalScroll(id="transcript")
        yield JobRunner(id="chat-job", cancelled_note="The answer was stopped; what it wrote so far stays.")
        yield Input(placeholder="Message (Enter to send)", id="message")

    def on_mount(self) -> None:
        self.runner = self.query_one(JobRunner)
        self._show_mode()

    def _show_mode(self) -> None:
        side = "personalized | base" if self.compare else "the personalized model"
        self.query_one("#chat-mode", Label).update(f"Chat with {side} (ctrl+t: side by side)")

    def action_toggle_compare(self) -> None:
        self.compare = not self.compare
        self._show_mode()

    def action_reset(self) -> None:
        for session in self.sessions.values():
            session.history.clear()
        self.query_one("#transcript").remove_children()

    def action_stop(self) -> None:
        """Stop the answer being streamed; otherwise leave the message box so section keys work."""
        if self.runner.busy:
            self.runner.cancel()
        else:
            self.query_one("#transcript").focus()

    @on(Input.Submitted, "#message")
    def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        runner = self.query_one(JobRunner)
        if not text or runner.busy:
            return
        try:
            max_tokens = int(self.query_one("#chat-max-tokens", Input).value)
        except ValueError:
            self.notify("max tokens must be a whole number.", severity="error")
            return
        event.input.value = ""
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(Static(text, classes="chat-user", markup=False))
        labels = ["personalized", "base"] if self.compare else ["personalized"]
        row = Horizontal(classes="chat-answers")
        transcript.mount(row)
        self._bubbles = {label: Static("", classes="chat-answer", markup=False) for label in labels}
        self._texts = dict.fromkeys(labels, "")
        row.mount_all(self._bubbles.values())
        transcript.scroll_end(animate=False)
        ws = self.ws
        runner.start("chat", lambda: self._converse(ws, text, labels, max_tokens))

    def _converse(self, ws, text: str, labels: list[str], max_tokens: int) -> Iterator:
        """Runs in the job's thread: open the models once, then stream each one's answer."""
        for label in labels:
            session = self.sessions.get(label)
            if session is None:
                session = self._open(ws, label)
                self.sessions[label] = session
                yield Log("chat", _loaded(label, session.model.label))
            session.max_tokens = max_tokens
            for piece in session.reply(text):
                yield (label, piece)

    def _open(self, ws, label: str) -> ChatSession:
        base = base_model(ws)
        try:
            model = resolve_chat_model(ws, "latest" if label == "personalized" else "base")
        except MipoError:
            model = resolve_chat_model(ws, "base")
            self.app.call_from_thread(
                self.notify, "No export yet: the personalized side is the base model.", severity="warning"
            )
        return ChatSession(model, base.file, system_from_contexts(ws))

    # -- thumbs: the user's own choices ------------------------------------------------------------------

    def _last_turn(self) -> tuple[str, str] | None:
        session = self.sessions.get("personalized")
        if session is None or len(session.history) < 2 or self.runner.busy:
            self.notify("There is no finished answer to mark yet.", severity="warning")
            return None
        return session.history[-2]["content"], session.history[-1]["content"]

    def action_thumb(self, kind: str) -> None:
        turn = self._last_turn()
        if turn is None:
            return
        prompt, answer = turn
        ws = self.ws
        if kind == "good":
            self.runner.start("good", lambda: user_pairs.save_chat_good(ws, prompt, answer))
        else:
            self._judged = turn
            self.runner.start("bad", lambda: user_pairs.sample_better(ws, prompt, answer))

    @on(JobRunner.Finished)
    def thumb_done(self, message: JobRunner.Finished) -> None:
        if message.name == "good":
            self.notify(f"Saved pair {message.result.id}: this answer is a chosen one.")
        elif message.name == "bad":
            prompt, answer = self._judged

            def saved(better: str | None) -> None:
                if better is not None:
                    pair = self.app.attempt(user_pairs.save_chat_better, self.ws, prompt, answer, better)
                    if pair is not None:
                        self.notify(f"Saved pair {pair.id}: your answer over the one you marked bad.")

            title = "A better answer? Sampled under your context: edit it or keep it (ctrl+s saves, escape discards)"
            self.app.push_screen(EditTextScreen(title, message.result), saved)

    @on(JobRunner.Emitted)
    def streamed(self, message: JobRunner.Emitted) -> None:
        if isinstance(message.item, tuple):
            label, piece = message.item
            self._texts[label] += piece
            self._bubbles[label].update(self._texts[label])
            self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    def on_unmount(self) -> None:
        if not self.runner.busy:  # a streaming answer closes its engine use first; then GC frees it
            for session in self.sessions.values():
                session.close()

    def palette_commands(self):
        yield SystemCommand(
            "Chat side by side with the base", "Toggle the comparison", self.action_toggle_compare
        )
        yield SystemCommand("New chat", "Clear the conversation", self.action_reset)
        yield SystemCommand(
            "Mark the last answer good", "It becomes a chosen answer", partial(self.action_thumb, "good")
        )
        yield SystemCommand(
            "Mark the last answer bad", "Write or accept a better one", partial(self.action_thumb, "bad")
        )
