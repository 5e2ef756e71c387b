"""From workspace pairs to token batches: encoding, truncation, the held-out split, the data order, packing.

Plain numpy, shared by both backends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..chat import ChatFormat, EncodedPair, chat_format
from ..errors import UserInputError
from ..pairs_store import Pair

MIN_RESPONSE_ROOM = 8  # tokens a prompt must leave free under max_len


@dataclass
class TrainPair:
    pair_id: int
    encoded: EncodedPair

    @property
    def n_tokens(self) -> int:
        """Tokens one packed forward pass reads: the shared prompt once, then both responses."""
        e = self.encoded
        return len(e.prompt) + len(e.chosen) + len(e.rejected)


def encode_pairs(
    base_gguf: str, pairs: list[Pair], max_len: int, anchor: str | None = None
) -> list[TrainPair]:
    """Tokenize with the GGUF's own template (system turn = the pair's context).

    Each response is cut so that prompt + response fits in `max_len` (the prompt is never cut: a model
    trained on half a question learns nothing useful). `anchor` adds each pair's sequence for training's
    KL anchor (see `anchor_sequence`); None adds none.

    Raises:
        UserInputError: a prompt leaves fewer than 8 tokens for the answer.
    """
    cf = chat_format(str(base_gguf))
    out = []
    for p in pairs:
        e = cf.encode_pair(p.context or None, p.prompt, p.chosen, p.rejected)
        room = max_len - len(e.prompt)
        if room < MIN_RESPONSE_ROOM:
            raise UserInputError(
                f"Pair {p.id}'s prompt (context + question) is {len(e.prompt)} tokens, too long for "
                f"--max-len {max_len}; raise --max-len."
            )
        anchor_prompt, anchor_response = anchor_sequence(cf, p, anchor, max_len)
        encoded = EncodedPair(e.prompt, e.chosen[:room], e.rejected[:room], anchor_prompt, anchor_response)
        out.append(TrainPair(p.id, encoded))
    return out


ANCHORS = ("no-context", "rejected")


def anchor_sequence(
    cf: ChatFormat, p: Pair, anchor: str | None, max_len: int
) -> tuple[list[int] | None, list[int] | None]:
    """The prompt and response tokens on which training's KL anchor holds the model where the base was.

    "no-context": the chosen answer after the question with no system turn, so the model learns the
    user's wishes as an answer to their context, not everywhere (on the benchmark it kept the
    neutral-text drift under 1%, bench/README.md). "rejected": the rejected answer after the prompt it was
    sampled with (another persona's context, or none). (None, None) where there is nothing to anchor: no
    anchor asked, no context of the pair's own ("no-context"), or a negative sampled under the user's own
    context ("rejected": a random-prompt pair). A pair the user made has no "rejected" anchor: its rejected
    answer may be a swapped positive, a chat answer or an A/B loser, sampled under no other context we know.
    Cut to `max_len` like the pair's own answers.
    """
    if anchor == "no-context" and p.context:
        context, response = None, p.chosen
    elif (anchor == "rejected" and p.source != "user" and not p.neg_prompt
          and (p.neg_context or None) != (p.context or None)):  # fmt: skip
        context, response = p.neg_context or None, p.rejected
    else:
        return None, None
    prompt_ids = cf.prompt_ids(context, p.prompt)
    response_ids = cf.response_ids(context, p.prompt, response)[: max(0, max_len - len(prompt_ids))]
    return (prompt_ids, response_ids) if response_ids else (None, None)


def _rank_key(seed: int, pair_id: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{pair_id}".encode(), digest_size=8).digest()


def split_heldout(pair_ids: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split into (train ids, held-out ids), both sorted.

    Pairs are ranked by a hash of (seed, pair id), and the lowest `fraction` is held out (at least one pair
    once there are 4 or more). The rank of a pair does not depend on the others, so adding pairs later
    keeps most of the old held-out set.
    """
    ids = sorted(set(pair_ids))
    n_held = 0 if len(ids) < 4 or fraction <= 0 else max(1, int(np.floor(len(ids) * fraction + 0.5)))
    held = sorted(sorted(ids, key=lambda i: _rank_key(seed, i))[:n_held])
    held_set = set(held)
    return [i for i in ids if i not in held_set], held


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of the training pairs in an epoch.

    A pure function of (seed, epoch), so a resumed run recomputes exactly where it was from the step counter.
    """
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def micro_batches(items: list[TrainPair], size: int) -> list[list[TrainPair]]:
    """Chunks of `size` pairs, sorted by length first so pairs of similar size run together."""
    ordered = sorted(items, key=lambda t: (t.n_tokens, t.pair_id))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


@dataclass
class PackedPairs:
    """Pairs as model input: one row per pair, the shared prompt read once, rows padded to the longest.

    Row i holds pair i as `prompt + chosen + rejected`; the rejected tokens see the prompt but not the
    chosen ones and take positions right after the prompt, so each response is scored exactly as if it
    followed its prompt alone. (One pair per row, not several: attention grows with the square of a row.)
    Sequence 2i is pair i's chosen response, 2i+1 its rejected one.
    """

    tokens: np.ndarray  # (B, T) int64, padded with 0
    positions: np.ndarray  # (B, T) int64
    mask: np.ndarray  # (B, T, T) bool, True where the query row may attend to the key column
    predictors: np.ndarray  # (N,) flat index (row * T + column) of the state predicting each response token
    targets: np.ndarray  # (N,) the response tokens
    owner: np.ndarray  # (N,) sequence index (2i chosen, 2i+1 rejected)
    n_sequences: int
    # per row: (prompt, chosen, rejected) lengths (rejected 0 for a single sequence), for torch_attention
    spans: list[tuple[int, int, int]]


def pack_pairs(pairs: list[EncodedPair]) -> PackedPairs:
    """Pairs as model input, one row each (the layout PackedPairs describes)."""
    if not all(e.prompt and e.chosen and e.rejected for e in pairs):
        raise ValueError("every packed pair needs a prompt and two non-empty responses")
    return _pack([(e.prompt, e.chosen, e.rejected) for e in pairs])


def pack_sequences(seqs: list[tuple[list[int], list[int]]]) -> PackedPairs:
    """(prompt, response) token sequences as model input, one causal row each, padded to the longest.

    Sequence i is row i; its response tokens are scored (`owner` = i). Used for the pairs' other-context
    sequences, which share no prompt with anything else in a batch.
    """
    if not seqs or not all(p and r for p, r in seqs):
        raise ValueError("every packed sequence needs a prompt and a non-empty response")
    return _pack([(p, r, []) for p, r in seqs])


def _pack(rows: list[tuple[list[int], list[int], list[int]]]) -> PackedPairs:
    """Rows of (prompt, first response, second response or []): the layout PackedPairs describes. Each
    non-empty response is the next scored sequence (pairs: 2i chosen, 2i+1 rejected; single sequences: i)."""
    # Rows are padded to the longest and no further: every padding token costs a full token's work in every
    # matmul. (Rounding widths up to a multiple of 16, for fewer distinct shapes, cost 3.3% of the
    # benchmark's work and did not lower its peak RSS: the backend hands freed memory back after each step.)
    width = max(len(p) + len(a) + len(b) for p, a, b in rows)
    n = len(rows)
    tokens = np.zeros((n, width), np.int64)
    positions = np.zeros((n, width), np.int64)
    mask = np.zeros((n, width, width), bool)
    predictors, targets, owner, spans = [], [], [], []
    causal = np.tril(np.ones((width, width), bool))
    sequence = 0  # index of the next scored response
    for i, (prompt, first, second) in enumerate(rows):
        p, c, r = len(prompt), len(first), len(second)
        used = p + c + r
        tokens[i, :used] = [*prompt, *first, *second]
        positions[i, :used] = [*range(p + c), *range(p, p + r)]
        mask[i, :used, :used] = causal[:used, :used]
        mask[i, p + c : used, p : p + c] = False  # the second answer never sees the first one
        mask[i, np.arange(used, width), np.arange(used, width)] = True  # padding sees itself (no empty rows)
        # Token k of a response is predicted by the state before it; the first by the prompt's last state.
        base = i * width
        for start, response in ((p, first), (p + c, second)):
            if response:
                predictors += [base + p - 1, *range(base + start, base + start + len(response) - 1)]
                targets += response
                owner += [sequence] * len(response)
                sequence += 1
        spans.append((p, c, r))
    as_i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return PackedPairs(
        tokens, positions, mask, as_i64(predictors), as_i64(targets), as_i64(owner), sequence, spans
    )
