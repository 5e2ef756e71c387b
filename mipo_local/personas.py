"""The bank of unrelated persona contexts c' that MIPO samples negatives with.

`mipo_local/data/personas.jsonl` holds 241 personas written by hand for this project, one JSON object
{"id", "text"} a line: people of 12 to 85, from every continent, with their work, tastes and the way they
want answers, some written in their own language (German, French, Spanish, Portuguese, Italian, Polish,
Dutch, Turkish, Indonesian, Swahili). The bank is combined with the user's own other contexts when they have
several distinct ones.
"""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def persona_bank() -> tuple[str, ...]:
    text = resources.files("mipo_local").joinpath("data", "personas.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line)["text"] for line in text.splitlines() if line.strip())


def negative_pool(user_context: str, other_user_contexts: list[str]) -> list[str]:
    """Candidates for c': the bank plus the user's other contexts, never the same text as c."""
    own = user_context.strip().casefold()
    pool = [c for c in dict.fromkeys([*other_user_contexts, *persona_bank()]) if c.strip().casefold() != own]
    return pool
