"""Display helpers shared by the screens."""

from __future__ import annotations

from rich.text import Text


def one_line(text: str, width: int = 200) -> Text:
    """User text as one plain line for a table cell (never read as markup), cut at `width`."""
    flat = " ".join(text.split())
    return Text(flat if len(flat) <= width else flat[: width - 1] + "…", no_wrap=True, end="")


def plural(n: int, word: str) -> str:
    """'1 prompt', '2 prompts'."""
    return f"{n} {word}{'' if n == 1 else 's'}"
