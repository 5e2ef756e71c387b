"""Answers that are no answer: a loop, nothing, a cut-off repetition, or an echo of the context or question.

A small model falls into such answers often (the default model loops in about a quarter of its prompted
answers), and each of them can pass a wish's check ("Ahoy! Ahoy! Ahoy! ..." begins with "Ahoy"), or score
as highly context-specific under MIPO's pointwise mutual information (the context sentence copied back).
None of them may become a positive (pairs.py), and the benchmark never counts one (bench/quality.py).
Word-level checks, so they work for any language whose words `\\w` matches.
"""

from __future__ import annotations

import re

MIN_WORDS = 12  # shorter answers are too short to call a loop
DISTINCT_TRIGRAMS = 0.5  # a loop: under half of its word trigrams distinct
TAIL_WORDS = 30  # a cut-off answer is judged on its last words
TAIL_DISTINCT = 0.6
ECHO_SHARE = 0.5  # an echo: half of the answer's word 4-grams copied from the context or the question


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _distinct_share(seq: list[str], n: int) -> float:
    grams = list(zip(*(seq[i:] for i in range(n)), strict=False))
    return len(set(grams)) / len(grams) if grams else 1.0


def loops(text: str) -> bool:
    """One phrase or sentence over and over: under half of the word trigrams distinct."""
    w = words(text)
    return len(w) >= MIN_WORDS and _distinct_share(w, 3) < DISTINCT_TRIGRAMS


def _echo_share(answer: list[str], source: str) -> float:
    grams = list(zip(answer, answer[1:], answer[2:], answer[3:], strict=False))
    if not grams:
        return 0.0
    src = words(source)
    known = set(zip(src, src[1:], src[2:], src[3:], strict=False))
    return sum(g in known for g in grams) / len(grams)


def verdict(
    answer: str, *, context: str | None = None, question: str | None = None, cut: bool = False
) -> str | None:
    """Why `answer` is degenerate ("empty", "loop", "cut in a loop", "echoes the context", "echoes the
    question"), or None for a real answer. `cut`: the answer stopped at the token limit."""
    w = words(answer)
    if not w:
        return "empty"
    if loops(answer):
        return "loop"
    if cut and len(w) >= TAIL_WORDS and _distinct_share(w[-TAIL_WORDS:], 3) < TAIL_DISTINCT:
        return "cut in a loop"
    if context and set(w) <= set(words(context)):  # "Tom, Cheers, Tom!": the wish alone, no answer
        return "echoes the context"
    for name, source in (("context", context), ("question", question)):
        if source and len(w) >= 4 and _echo_share(w, source) >= ECHO_SHARE:
            return f"echoes the {name}"
    return None
