"""How much an answer is about its own question: the pointwise mutual information between the question
and the answer under a model, log p(y | c, x) - mean over other questions x' of log p(y | c, x').

An answer that meets a wish but stops answering ("Dance with the saints on a rainy day" to "What is a fun
weekend activity?") is about as likely after any question, and scores near 0; a real answer to x is far
likelier after x, and scores well above. Per token, so long and short answers compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OTHER_QUESTIONS = 4  # questions x' an answer is also scored after


def relevance(
    engine,
    cf,
    context: str | None,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    others: int = OTHER_QUESTIONS,
) -> list[float]:
    """Per-token question-answer PMI of each answer (nats), in one batched scoring pass.

    Each answer i is scored after its own question and after the `others` questions that follow it in
    `questions` (cyclically), under `context` as the system turn."""
    n = len(questions)
    if n < 2:
        raise ValueError("relevance needs at least two questions to compare with")
    others = min(others, n - 1)
    prompts = [cf.prompt_ids(context, q) for q in questions]
    items, lengths = [], []
    for i, answer in enumerate(answers):
        response = cf.response_ids(context, questions[i], answer)
        lengths.append(max(1, len(response)))
        for j in range(others + 1):
            items.append((prompts[(i + j) % n], response))
    scores = iter(engine.score_many(items))
    out = []
    for length in lengths:
        own, *rest = (next(scores) for _ in range(others + 1))
        out.append((own - float(np.mean(rest))) / length)
    return out
