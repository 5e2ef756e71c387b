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


def read_text_file(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"File not found: {path}.")
    if not path.is_file():
        raise UserInputError(f"{path} is not a file.")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserInputError(
            f"{path}: line {line} is not valid UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8."
        ) from err


def parse_prompts(path: Path) -> tuple[list[str], str]:
    """Return (prompts, format name). Raises UserInputError naming the file and line on bad content."""
    path = Path(path)
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
        nodes = [n.get("message") for n in mapping.values() if isinstance(n, dict) and n.get("message")]
        nodes.sort(key=lambda m: m.get("create_time") or 0)
        for message in nodes:
            if (message.get("author") or {}).get("role") != "user":
                continue
            parts = (message.get("content") or {}).get("parts") or []
            words = "\n".join(p for p in parts if isinstance(p, str)).strip()
            if words:
                prompts.append(words)
    if not prompts:
        raise UserInputError(f"{path} contains no user messages.")
    return prompts
