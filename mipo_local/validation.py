"""Checks on what a user types, each failing with one sentence that names the flag, field or item.

Numbers: every flag finite and inside a range stated here once. Names (runs): letters, digits, `.`, `_`,
`-`, short enough for any file system. Texts (contexts, prompts, answers, chat messages): no NUL or other
control characters, something visible, and a length limit in characters checked before any tokenizing,
so a 50 MB "prompt" is refused in milliseconds.
"""

from __future__ import annotations

import math
import re
import unicodedata

from .errors import UserInputError

SEED_MAX = 2**32 - 1  # numpy's seeds, and well inside SQLite's integer range
ID_MAX = 2**63 - 1  # SQLite's largest integer
THREADS_MAX = 1024
# Characters, checked before tokenizing; the token limits (usertext_tokens) come after.
CONTEXT_CHARS_MAX = 8_000
PROMPT_CHARS_MAX = 8_000
ANSWER_CHARS_MAX = 32_000
LABEL_CHARS_MAX = 80
# Tokens of the base model: room for a context and a question together with an answer in any supported
# model's window, and far beyond what a person writes as a note or a question.
CONTEXT_TOKENS_MAX = 1024
PROMPT_TOKENS_MAX = 1024
NAME_CHARS_MAX = 64

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Allowed control characters in user text: tab and newline (CR is turned into LF on the way in).
_ALLOWED_CONTROLS = {"\t", "\n"}


def require_number(flag: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    """`value` is a finite number in [low, high] (or (low, high] with low_open); None passes (not given)."""
    if value is None:
        return
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (low < value if low_open else low <= value)
        and value <= high
    )
    if not ok:
        bracket = "(" if low_open else "["
        raise UserInputError(
            f"{flag} must be a number in {bracket}{_fmt(low)}, {_fmt(high)}], not {value!r}."
        )


def require_int(flag: str, value, low: int, high: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UserInputError(
            f"{flag} must be a whole number from {_fmt(low)} to {_fmt(high)}, not {value!r}."
        )


def require_seed(flag: str, value) -> None:
    require_int(flag, value, 0, SEED_MAX)


def _fmt(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) and abs(x) >= 10_000 else f"{x:g}"


def check_name(flag: str, name: str) -> str:
    """A run name: safe as a folder name on every file system, and as a word in a command line."""
    shown = name if len(name) <= 40 else name[:37] + "..."
    if not name:
        raise UserInputError(f"{flag} is empty; give a name such as run-2.")
    if len(name) > NAME_CHARS_MAX:
        raise UserInputError(f"{flag} {shown!r} is too long: {NAME_CHARS_MAX} characters at most.")
    if not _NAME.fullmatch(name):
        raise UserInputError(
            f"{flag} {shown!r} is not a valid run name: use letters, digits, '.', '_' and '-', starting with "
            "a letter or digit (no spaces, slashes or control characters)."
        )
    return name


def check_text(
    text: str, what: str, max_chars: int, empty_hint: str = "write some words", where: str = ""
) -> str:
    """A user text as stored: CRLF made LF, outer white space stripped, then checked.

    Raises:
        UserInputError: empty or invisible, NUL or other control characters, longer than max_chars.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    bad = next((ch for ch in text if _is_control(ch)), None)
    if bad is not None:
        raise UserInputError(
            f"{what}{where} contains a control character (U+{ord(bad):04X}) at position {text.index(bad) + 1}; "
            "remove it (only tabs and line breaks are allowed)."
        )
    if not text:
        raise UserInputError(f"{what} is empty{where}: {empty_hint}.")
    what += where
    if not any(_visible(ch) for ch in text):
        raise UserInputError(f"{what} holds only invisible characters: {empty_hint}.")
    if len(text) > max_chars:
        raise UserInputError(f"{what} is {len(text):,} characters long; the limit is {max_chars:,}.")
    return text


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS


def _visible(ch: str) -> bool:
    # Letters, marks, numbers, punctuation, symbols: not white space (Z*), control or format (C*: ZWSP, BOM).
    return unicodedata.category(ch)[0] not in "ZC"


def check_label(label: str | None) -> str | None:
    if label is None:
        return None
    label = label.strip()
    if not label:
        return None
    if any(unicodedata.category(ch)[0] == "C" for ch in label):
        raise UserInputError("--label contains a control or invisible character; use plain words.")
    if len(label) > LABEL_CHARS_MAX:
        raise UserInputError(f"--label is {len(label)} characters long; the limit is {LABEL_CHARS_MAX}.")
    return label
