"""`prompts synth`: the base model proposes questions a person with these contexts would plausibly ask.

Candidates are sampled at a high temperature across topic hints, cleaned (first line, no numbering or
quotes), filtered (a real question of sensible length, not a copy of the context) and deduplicated.
"""

from __future__ import annotations

import re
from collections.abc import Generator

from . import modelsource
from .chat import chat_format
from .errors import UserInputError
from .progress import EtaClock, Log, Progress
from .workspace import Workspace, normalize_text

TOPICS = (
    "daily life", "food", "work", "health", "money", "travel", "a hobby", "learning something new",
    "family", "technology", "a decision I have to make", "the weekend", "shopping", "a problem at home",
)  # fmt: skip
INSTRUCTION = (
    "Here is a description of a person:\n{context}\n\n"
    "Write one short question about {topic} that this person might ask an AI assistant. "
    "Write it in the first person. Reply with the question only."
)
_META = re.compile(
    r"^(what a |great question|sure|here|as an ai|i'm sorry|you said)|\"|\bquestion\b", re.IGNORECASE
)
_PREFIX = re.compile(r"^\s*(?:[-*+]|\d+[.)]|q(?:uestion)?\s*\d*\s*[:.)-])\s*", re.IGNORECASE)


def clean_candidate(text: str) -> str | None:
    """The question in a model's answer, or None when it is not a usable question."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"“”'").strip()
    if "?" in line:
        line = line[: line.index("?") + 1]
    if not (12 <= len(line) <= 200) or not line.endswith("?") or _META.search(line):
        return None
    return line


def synthesize_prompts(
    ws: Workspace, n: int, *, seed: int = 0, temperature: float = 0.9
) -> Generator[Progress | Log, None, int]:
    """Add up to `n` synthetic prompts. Yields progress; returns how many were added."""
    from .engine import Engine, GenRequest

    if not 1 <= n <= 1000:
        raise UserInputError(f"--n must be between 1 and 1000, not {n}.")
    contexts = ws.contexts()
    if not contexts:
        raise UserInputError(
            "There are no contexts yet: synthesis needs to know who you are.",
            hint='Run: mipo-local context add "I am ..."',
        )
    model = modelsource.base_model(ws)
    cf = chat_format(str(model.file))
    existing = {normalize_text(p.text).casefold() for p in ws.prompts()}
    context_texts = {c.text.casefold() for c in contexts}
    added, attempt = 0, 0
    clock = EtaClock(n)
    with ws.job("synth", f"mipo-local prompts synth --n {n}"):
        engine = Engine(model.file, n_seq=16, ctx_per_seq=1024)
        try:
            while added < n and attempt < n * 8:
                batch = []
                for _ in range(16):
                    c = contexts[attempt % len(contexts)]
                    topic = TOPICS[(attempt * 7 + seed) % len(TOPICS)]
                    ids = cf.prompt_ids(None, INSTRUCTION.format(context=c.text, topic=topic))
                    batch.append(
                        GenRequest(
                            ids,
                            max_tokens=48,
                            temperature=temperature,
                            top_p=0.95,
                            seed=seed * 100003 + attempt,
                            id=attempt,
                        )
                    )
                    attempt += 1
                fresh = []
                for result in sorted(engine.generate(batch), key=lambda r: r.id):
                    q = clean_candidate(result.text)
                    if q is None or q.casefold() in existing or any(q.casefold() in t for t in context_texts):
                        continue
                    existing.add(q.casefold())
                    fresh.append(q)
                fresh = fresh[: n - added]
                if fresh:
                    new, _ = ws.add_prompts(fresh, source="synthetic")
                    added += len(new)
                yield clock.event("synth", added, unit="prompts")
        finally:
            engine.close()
    if added < n:
        yield Log(
            "synth",
            f"Only {added} usable questions out of {attempt} tries; add a few prompts by hand.",
            "warning",
        )
    return added
