"""The app's sections, in journey order: (key, mode name, title). Screens register in app.py."""

from __future__ import annotations

SECTIONS: list[tuple[str, str, str]] = [
    ("1", "profile", "Profile"),
    ("2", "prompts", "Prompts"),
    ("3", "pairs", "Pairs"),
    ("4", "train", "Train"),
    ("5", "export", "Export"),
    ("6", "evaluate", "Evaluate"),
    ("7", "chat", "Chat"),
]
