"""Fidelity check: does the exported file still prefer what the trained policy preferred?

The exported file (or base + GGUF adapter) is loaded in llama.cpp, the run's held-out pairs are scored
(summed response log-probs, tokens exactly as training saw them), and compared with the trained policy's
log-probs saved by training in heldout.json:

- sign agreement: the share of pairs whose DPO margin, (logp_c - ref_c) - (logp_r - ref_r), has the same
  sign under the export as under the trained policy;
- Pearson correlation of the log-probs (chosen and rejected, all pairs) between the two.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError
from .pairs_store import list_pairs
from .train import runs
from .workspace import Workspace

HELDOUT_FILE = "heldout.json"


@dataclass
class Fidelity:
    pairs: int
    sign_agreement: float
    pearson: float | None  # None when the log-probs have no spread (fewer than 2 pairs)
    mean_abs_logp_diff: float  # nats per response, export vs trained policy
    threshold: float
    skipped: int = 0  # held-out pairs deleted from the workspace since training
    available: int = 0  # held-out pairs left in the workspace (more than `pairs` when capped)

    @property
    def ok(self) -> bool:
        return self.sign_agreement >= self.threshold

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        corr = "n/a" if self.pearson is None else f"{self.pearson:.4f}"
        of = f" (of {self.available})" if self.available > self.pairs else ""
        return (
            f"Fidelity on {self.pairs}{of} held-out pairs: {100 * self.sign_agreement:.1f}% same DPO margin sign as "
            f"the trained model, log-prob correlation {corr}, mean difference {self.mean_abs_logp_diff:.3f} nats."
        )


def read_heldout(ws: Workspace, run_name: str) -> list[dict]:
    """The held-out log-probs training saved; [] when the run held none out."""
    path = runs.final_dir(ws, run_name) / HELDOUT_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        keys = ("pair_id", "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
        return [{k: row[k] for k in keys} for row in rows]
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(
            f"{path} is damaged ({err}); train the run again or export with --no-verify."
        ) from err


def compare(
    heldout: list[dict], scored: list[tuple[float, float]], threshold: float, skipped: int = 0
) -> Fidelity:
    """Fidelity of exported log-probs `scored` [(chosen, rejected)] against the trained policy's."""
    pc = np.array([h["policy_chosen"] for h in heldout], dtype=np.float64)
    pr = np.array([h["policy_rejected"] for h in heldout], dtype=np.float64)
    rc = np.array([h["ref_chosen"] for h in heldout], dtype=np.float64)
    rr = np.array([h["ref_rejected"] for h in heldout], dtype=np.float64)
    ec = np.array([s[0] for s in scored], dtype=np.float64)
    er = np.array([s[1] for s in scored], dtype=np.float64)
    trained_margin = (pc - rc) - (pr - rr)
    export_margin = (ec - rc) - (er - rr)
    agree = float(np.mean(np.sign(trained_margin) == np.sign(export_margin))) if len(pc) else 0.0
    policy, export = np.concatenate([pc, pr]), np.concatenate([ec, er])
    pearson = None
    if len(policy) >= 2 and policy.std() > 0 and export.std() > 0:
        pearson = float(np.corrcoef(policy, export)[0, 1])
    diff = float(np.mean(np.abs(policy - export))) if len(policy) else 0.0
    return Fidelity(len(pc), agree, pearson, diff, threshold, skipped)


def check(
    ws: Workspace,
    run: runs.Run,
    model_path: str | os.PathLike,
    *,
    base_path: str | os.PathLike,
    lora_path: str | os.PathLike | None = None,
    threshold: float = 0.95,
    threads: int | None = None,
    max_pairs: int | None = None,
) -> Fidelity | None:
    """Score the run's held-out pairs with the exported model in llama.cpp; None when there are none.

    Args:
        model_path: the exported GGUF (or the base, with `lora_path` the exported adapter).
        base_path: the run's base model, whose chat template and tokenizer training used.
        max_pairs: score at most this many held-out pairs (the first by id): scoring is the slow part,
            about 600 tokens/s for the 135M default model on two cores.
    """
    from .engine import Engine
    from .train.batching import encode_pairs

    heldout = read_heldout(ws, run.name)
    if not heldout:
        return None
    by_id = {p.id: p for p in list_pairs(ws)}
    present = sorted((h for h in heldout if h["pair_id"] in by_id), key=lambda h: h["pair_id"])
    kept = present[:max_pairs] if max_pairs else present
    if not kept:
        return None
    max_len = int(run.settings.get("max_len", 512))
    # The training batcher's own encoding (template, tokenizer, truncation), so tokens match training's.
    items = encode_pairs(str(base_path), [by_id[h["pair_id"]] for h in kept], max_len)
    longest = max(len(t.encoded.prompt) + max(len(t.encoded.chosen), len(t.encoded.rejected)) for t in items)
    requests = [(t.encoded.prompt, r) for t in items for r in (t.encoded.chosen, t.encoded.rejected)]
    with Engine(
        Path(model_path), n_seq=4, ctx_per_seq=max(64, longest + 8), lora_path=lora_path, n_threads=threads
    ) as engine:
        scores = engine.score_many(requests)
    scored = [(scores[2 * i], scores[2 * i + 1]) for i in range(len(items))]
    fid = compare(kept, scored, threshold, skipped=len(heldout) - len(present))
    fid.available = len(present)
    return fid
