"""Steps that several app tests take the same way under Textual's pilot."""

from textual.widgets import Input

from tests.test_tui_core import settle


async def chat_hello(app, pilot, max_tokens: int) -> None:
    """Open the Chat section, send "hello" with an answer of at most `max_tokens`, wait for the answer."""
    await pilot.press("7")
    app.screen.query_one("#chat-max-tokens", Input).value = str(max_tokens)
    app.screen.query_one("#message", Input).focus()
    await pilot.press(*"hello", "enter")
    await settle(app, pilot)
