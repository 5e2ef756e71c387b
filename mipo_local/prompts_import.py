"""Read prompts from a file: plain text (one per line), a Markdown list, JSONL, or a ChatGPT export.

Formats are detected from the content, not only the name:
    conversations.json   ChatGPT export: a JSON list of conversations; every user turn becomes a prompt
    *.jsonl              one JSON object per line with a `prompt` field
    Markdown             lines starting with `-`, `*`, `+` or `1.`; other lines (headings, prose) are ignored
    plain text           one prompt per non-empty line
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserInputError

_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.*\S)\s*$")


IMPORT_LIMIT = 1000  # prompts one import adds unless --limit says more
FILE_BYTES_MAX = 64 << 20  # a text file of prompts or pairs larger than this is not one a person wrote


def read_text_file(path: Path) -> str:
    """A UTF-8 text file (UTF-16 with a byte-order mark too); one sentence naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"File not found: {path}.")
    if not path.is_file():
        raise UserInputError(f"{path} is not a file.")
    if path.stat().st_size > FILE_BYTES_MAX:
        raise UserInputError(
            f"{path} is {path.stat().st_size / 1e6:.0f} MB; the limit is {FILE_BYTES_MAX >> 20} MB."
        )
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise UserInputError(f"{path} is not valid UTF-16 text; save the file as UTF-8.") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserInputError(
            f"{path}: line {line} is not valid UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8."
        ) from err
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise UserInputError(
            f"{path}: line {line} holds NUL characters; the file looks like UTF-16 without a byte-order "
            "mark. Save it as UTF-8."
        )
    return text


def parse_prompts(path: Path, limit: int = IMPORT_LIMIT) -> tuple[list[str], str]:
    """Return (prompts, format name). Raises UserInputError naming the file and line on bad content, or
    when the file holds more than `limit` prompts (nothing is imported then)."""
    prompts, fmt = _parse(Path(path))
    if len(prompts) > limit:
        raise UserInputError(
            f"{path} holds {len(prompts):,} prompts, more than the {limit:,} one import takes; nothing was "
            f"imported.",
            hint=f"Import them all with --limit {len(prompts)}, or split the file.",
        )
    return prompts, fmt


def _parse(path: Path) -> tuple[list[str], str]:
    text = read_text_file(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(path, text), "jsonl"
    if stripped.startswith("["):
        return _parse_chatgpt(path, text), "chatgpt"
    if stripped.startswith("{"):
        return _parse_jsonl(path, text), "jsonl"
    lines = text.splitlines()
    items = [m.group(1) for line in lines if (m := _LIST_ITEM.match(line))]
    if items:
        return items, "markdown"
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserInputError(f"{path} contains no prompts.")
    return prompts, "text"


def iter_jsonl(path: Path, text: str):
    """Yield (line number, object) for each non-empty line; a bad line raises naming its number."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}: line {number} is not valid JSON ({err.msg}).") from err


def _parse_jsonl(path: Path, text: str) -> list[str]:
    prompts = []
    for number, obj in iter_jsonl(path, text):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise UserInputError(f"{path}: line {number} has no string field 'prompt'.")
        if not obj["prompt"].strip():
            raise UserInputError(f"{path}: line {number} has an empty 'prompt'.")
        prompts.append(obj["prompt"])
    if not prompts:
        raise UserInputError(f"{path} contains no prompts.")
    return prompts


def _parse_chatgpt(path: Path, text: str) -> list[str]:
    """User turns of a ChatGPT `conversations.json` export, in conversation order."""
    try:
        conversations = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: line {err.lineno} is not valid JSON ({err.msg}).") from err
    if not isinstance(conversations, list):
        raise UserInputError(f"{path} is not a ChatGPT export (expected a JSON list of conversations).")
    prompts: list[str] = []
    for i, conv in enumerate(conversations, start=1):
        mapping = conv.get("mapping") if isinstance(conv, dict) else None
        if not isinstance(mapping, dict):
            raise UserInputError(
                f"{path}: conversation #{i} has no 'mapping'; is this a ChatGPT conversations.json?"
            )
        nodes = [n.get("message") for n in mapping.values() if isinstance(n, dict)]
        messages = [m for m in nodes if isinstance(m, dict)]
        # Exports differ: create_time may be missing, null, a number or a string. Order by it where it is
        # a number and keep the file's order otherwise (sorted() is stable).
        messages.sort(key=lambda m: _number(m.get("create_time")))
        for message in messages:
            if _role(message.get("author")) != "user":
                continue
            words = _message_text(message.get("content"))
            if words:
                prompts.append(words)
    if not prompts:
        raise UserInputError(f"{path} contains no user messages.")
    return prompts


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            return float(value)
        except (TypeError, ValueError):
            return 0.0
    return float(value)


def _role(author) -> str | None:
    """The author's role: {"role": "user"} in ChatGPT's exports; a plain string in some converters."""
    if isinstance(author, dict):
        role = author.get("role")
        return role if isinstance(role, str) else None
    return author if isinstance(author, str) else None


def _message_text(content) -> str:
    """The text parts of a message's content, joined; a bare string counts as one part."""
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if isinstance(parts, str):
        parts = [parts]
    if not isinstance(parts, list):
        return ""
    return "\n".join(p for p in parts if isinstance(p, str)).strip()
