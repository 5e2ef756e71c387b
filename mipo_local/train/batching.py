"""From workspace pairs to token batches: encoding, truncation, the held-out split, the data order."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..chat import EncodedPair, chat_format
from ..errors import UserInputError
from ..pairs_store import Pair


@dataclass
class TrainPair:
    pair_id: int
    encoded: EncodedPair

    @property
    def n_tokens(self) -> int:
        e = self.encoded
        return 2 * len(e.prompt) + len(e.chosen) + len(e.rejected)


def encode_pairs(base_gguf: str, pairs: list[Pair], max_len: int) -> list[TrainPair]:
    """Tokenize with the GGUF's own template (system turn = the pair's context); responses are cut to fit max_len."""
    cf = chat_format(str(base_gguf))
    out = []
    for p in pairs:
        e = cf.encode_pair(p.context or None, p.prompt, p.chosen, p.rejected)
        room = max_len - len(e.prompt)
        if room < 8:
            raise UserInputError(
                f"Pair {p.id}'s prompt is {len(e.prompt)} tokens, too long for --max-len {max_len}; raise --max-len."
            )
        out.append(TrainPair(p.id, EncodedPair(e.prompt, e.chosen[:room], e.rejected[:room])))
    return out


def split_heldout(pair_ids: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split: (train ids, held-out ids). At least one held-out pair when there are 4 or more."""
    ids = sorted(pair_ids)
    n_held = 0 if len(ids) < 4 or fraction <= 0 else max(1, int(math.floor(len(ids) * fraction + 0.5)))
    order = np.random.default_rng(seed).permutation(len(ids))
    held = sorted(ids[i] for i in order[:n_held])
    held_set = set(held)
    return [i for i in ids if i not in held_set], held


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of the training pairs in an epoch: a pure function of (seed, epoch), so resume can
    recompute exactly where it was."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def micro_batches(items: list[TrainPair], size: int) -> list[list[TrainPair]]:
    """Group into micro-batches of similar length (sorted within a window) to keep padding low."""
    return [items[i : i + size] for i in range(0, len(items), size)]
