"""Fidelity check: does the exported file still prefer what the trained policy preferred?

The exported file (or base + GGUF adapter) is loaded in llama.cpp, the run's held-out pairs are scored
(summed response log-probs, tokens exactly as training saw them), and compared with the trained policy's
log-probs saved by training in heldout.json:

- sign agreement: the share of pairs whose DPO margin, (logp_c - ref_c) - (logp_r - ref_r), has the same
  sign under the export as under the trained policy. Each margin is taken against the base model in its own
  numerics: the trained policy against the training reference, the export against the base scored in
  llama.cpp and quantized like the export. The engines' difference and the quantization error (each about
  1-2 nats per 150-token answer on the 135M default model) then cancel instead of swamping the small margins
  a short training run produces;
- Pearson correlation of the log-probs (chosen and rejected, all pairs) between the two.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError
from .pairs_store import list_pairs
from .progress import PhaseMeter, Progress
from .train import runs
from .workspace import Workspace

HELDOUT_FILE = "heldout.json"


# A held-out pair's trained DPO margin smaller than this (nats) is not judged: numeric noise (bf16 training,
# another engine, quantization) moves a margin by a few tenths of a nat, so the sign of a smaller one says
# nothing about the export. Measured on the default model after a short `run`: margins of 0.02 and 0.2 nats
# flipped under an F16 export whose LoRA had been applied exactly.
DECIDED_MARGIN = 0.5


@dataclass
class Fidelity:
    pairs: int
    sign_agreement: float | None  # over the decided pairs; None when no trained margin was large enough
    pearson: float | None  # None when the log-probs have no spread (fewer than 2 pairs)
    mean_abs_logp_diff: float  # nats per response, export vs trained policy
    threshold: float
    skipped: int = 0  # held-out pairs deleted from the workspace since training
    available: int = 0  # held-out pairs left in the workspace (more than `pairs` when capped)
    decided: int = 0  # pairs whose trained margin is at least DECIDED_MARGIN

    @property
    def ok(self) -> bool:
        return self.sign_agreement is None or self.sign_agreement >= self.threshold

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        of = f" (of {self.available})" if self.available > self.pairs else ""
        mean = f", mean difference {self.mean_abs_logp_diff:.3f} nats."
        return f"Fidelity on {self.pairs}{of} held-out pairs: {describe(self.as_dict())[len('Fidelity: ') : -1]}{mean}"


def describe(fid: dict | None) -> str:
    """One line for a stored fidelity result (an export's `info["fidelity"]`)."""
    if not fid:
        return "Fidelity: not checked."
    corr = "n/a" if fid["pearson"] is None else f"{fid['pearson']:.4f}"
    if fid["sign_agreement"] is None:
        return (
            f"Fidelity: training moved no held-out DPO margin by {DECIDED_MARGIN} nats or more, too little to "
            f"judge; log-prob correlation {corr}."
        )
    decided = fid.get("decided", fid["pairs"])
    verdict = "ok" if fid["ok"] else "BELOW the expected level"
    return (
        f"Fidelity: {100 * fid['sign_agreement']:.1f}% same preference sign on {decided} held-out pairs "
        f"(of {fid['pairs']} scored), log-prob correlation {corr} ({verdict})."
    )


def read_heldout(ws: Workspace, run_name: str) -> list[dict]:
    """The held-out log-probs training saved; [] when the run held none out."""
    path = runs.final_dir(ws, run_name) / HELDOUT_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        keys = ("pair_id", "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
        optional = ("llama_policy_chosen", "llama_policy_rejected")
        return [{**{k: row[k] for k in keys}, **{k: row[k] for k in optional if k in row}} for row in rows]
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(
            f"{path} is damaged ({err}); train the run again or export with --no-verify."
        ) from err


def compare(
    heldout: list[dict],
    scored: list[tuple[float, float]],
    threshold: float,
    skipped: int = 0,
    engine_refs: list[tuple[float, float]] | None = None,
) -> Fidelity:
    """Fidelity of exported log-probs `scored` [(chosen, rejected)] against the trained policy's.

    `engine_refs`: the base model's log-probs in the export's engine; without them the export's margin is
    taken against the training reference."""
    pc = np.array([h["policy_chosen"] for h in heldout], dtype=np.float64)
    pr = np.array([h["policy_rejected"] for h in heldout], dtype=np.float64)
    rc = np.array([h["ref_chosen"] for h in heldout], dtype=np.float64)
    rr = np.array([h["ref_rejected"] for h in heldout], dtype=np.float64)
    ec = np.array([s[0] for s in scored], dtype=np.float64)
    er = np.array([s[1] for s in scored], dtype=np.float64)
    trained_margin = (pc - rc) - (pr - rr)
    if engine_refs is not None:
        rc = np.array([e[0] for e in engine_refs], dtype=np.float64)
        rr = np.array([e[1] for e in engine_refs], dtype=np.float64)
    export_margin = (ec - rc) - (er - rr)
    decided = np.abs(trained_margin) >= DECIDED_MARGIN
    same = np.sign(trained_margin[decided]) == np.sign(export_margin[decided])
    agree = float(np.mean(same)) if decided.any() else None
    policy, export = np.concatenate([pc, pr]), np.concatenate([ec, er])
    pearson = None
    if len(policy) >= 2 and policy.std() > 0 and export.std() > 0:
        pearson = float(np.corrcoef(policy, export)[0, 1])
    diff = float(np.mean(np.abs(policy - export))) if len(policy) else 0.0
    return Fidelity(len(pc), agree, pearson, diff, threshold, skipped, decided=int(decided.sum()))


def check_steps(
    ws: Workspace,
    run: runs.Run,
    model_path: str | os.PathLike,
    *,
    base_path: str | os.PathLike,
    lora_path: str | os.PathLike | None = None,
    threshold: float = 0.95,
    threads: int | None = None,
    max_pairs: int | None = None,
    quant: str | None = None,
    stage: str = "export",
) -> Generator[Progress, None, Fidelity | None]:
    """Score the run's held-out pairs with the exported model in llama.cpp (None when there are none),
    yielding a Progress event of `stage` after every decode step: the phases are loading the export,
    scoring it, and scoring the base where the workspace has no cached scores yet.

    Args:
        model_path: the exported GGUF (or the base, with `lora_path` the exported adapter).
        base_path: the run's base model, whose chat template and tokenizer training used.
        max_pairs: score at most this many held-out pairs (the first by id): scoring is the slow part,
            about 600 tokens/s for the 135M default model on two cores.
        quant: the export's quantization (None for an adapter or F16): the base is scored quantized the
            same way (cached in the workspace; training precomputes it for the automatic quant).
    """
    from .engine import Engine
    from .train.batching import encode_pairs
    from .train.reference import LLAMA_CPP, cached, llama_cpp_refs_steps

    heldout = read_heldout(ws, run.name)
    if not heldout:
        return None
    by_id = {p.id: p for p in list_pairs(ws)}
    present = sorted((h for h in heldout if h["pair_id"] in by_id), key=lambda h: h["pair_id"])
    kept = present[:max_pairs] if max_pairs else present
    if not kept:
        return None
    max_len = int(run.settings.get("max_len", 512))
    sha = run.base_model["sha256"]
    # The training batcher's own encoding (template, tokenizer, truncation), so tokens match training's.
    items = encode_pairs(str(base_path), [by_id[h["pair_id"]] for h in kept], max_len)
    longest = max(len(t.encoded.prompt) + max(len(t.encoded.chosen), len(t.encoded.rejected)) for t in items)
    requests = [(t.encoded.prompt, r) for t in items for r in (t.encoded.chosen, t.encoded.rejected)]
    with_llama_policy = all("llama_policy_chosen" in h for h in kept)

    def to_score(q: str | None) -> int:
        """The tokens of the base's scores that the workspace has not cached for quantization `q`."""
        source = LLAMA_CPP if q in (None, "f16") else f"{LLAMA_CPP}:{q}"
        have = cached(ws, [t.pair_id for t in items], sha, source, max_len)
        return sum(len(p) + len(r) for t in items if t.pair_id not in have for p, r in
                   [(t.encoded.prompt, t.encoded.chosen), (t.encoded.prompt, t.encoded.rejected)])  # fmt: skip

    plan = [("export", sum(len(p) + len(r) for p, r in requests)), ("base", to_score(quant))]
    if with_llama_policy and quant not in (None, "f16"):
        plan.append(("f16", to_score(None)))
    meter = PhaseMeter(stage, plan)
    yield meter.loading("the exported model")
    with Engine(
        Path(model_path), n_seq=4, ctx_per_seq=max(64, longest + 8), lora_path=lora_path, n_threads=threads
    ) as engine:
        scores = yield from meter.relay(
            engine.score_many_steps(requests), "export", "fidelity check", "the exported model", "answers"
        )
    scored = [(scores[2 * i], scores[2 * i + 1]) for i in range(len(items))]
    if quant not in (None, "f16") and meter.offset["base"][1] > 0:  # quantized once, then scored
        yield meter.loading(f"the base model, quantized to {quant.upper()} as the export")
    base = yield from meter.relay(
        llama_cpp_refs_steps(ws, items, model_sha=sha, max_len=max_len, base_gguf=Path(base_path),
                             threads=threads, quant=quant),
        "base", "fidelity check", "the base model", "answers",
    )  # fmt: skip
    engine_refs = [base[t.pair_id] for t in items]
    if with_llama_policy:
        # The trained policy as llama.cpp computes it (base + exact adapter), against the F16 base there.
        f16 = yield from meter.relay(
            llama_cpp_refs_steps(ws, items, model_sha=sha, max_len=max_len, base_gguf=Path(base_path),
                                 threads=threads),
            "f16" if "f16" in meter.offset else "base", "fidelity check", "the F16 base model", "answers",
        )  # fmt: skip
        kept = [
            {"pair_id": h["pair_id"], "policy_chosen": h["llama_policy_chosen"],
             "policy_rejected": h["llama_policy_rejected"], "ref_chosen": f16[h["pair_id"]][0],
             "ref_rejected": f16[h["pair_id"]][1]}
            for h in kept
        ]  # fmt: skip
    fid = compare(kept, scored, threshold, skipped=len(heldout) - len(present), engine_refs=engine_refs)
    fid.available = len(present)
    return fid
