"""Display helpers shared by the screens."""

from __future__ import annotations

import re

from rich.text import Text

from mipo_local.errors import MipoError

# A hint that tells the user to type a command or a flag: true at the CLI, meaningless inside the app.
_CLI_HINT = re.compile(r"mipo-local |(^|[\s(])--[a-z]")


def one_line(text: str, width: int = 200) -> Text:
    """User text as one plain line for a table cell (never read as markup), cut at `width`."""
    flat = " ".join(text.split())
    return Text(flat if len(flat) <= width else flat[: width - 1] + "…", no_wrap=True, end="")


def error_sentence(err: MipoError) -> str:
    """A library error as the app shows it: its sentence, and its hint unless that is a CLI instruction."""
    if err.hint and not _CLI_HINT.search(err.hint):
        return f"{err.message} {err.hint}"
    return err.message


def plural(n: int, word: str) -> str:
    """'1 prompt', '2 prompts'."""
    return f"{n} {word}{'' if n == 1 else 's'}"
