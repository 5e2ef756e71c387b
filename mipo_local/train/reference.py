"""Reference log-probs: computed once per pair, cached in the workspace (`ref_logps`), reused by every run.

Two sources: the training backend with its adapter switched off (exact: the same numerics as the policy),
or llama.cpp on the base GGUF (fast for big models). The cache key is (pair, model sha256, source,
max_len), so a different model, source, precision or truncation never reads a stale value.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import numpy as np

from ..engine import DecodeStep
from ..progress import EtaClock, Progress
from ..workspace import Workspace
from .backend import Backend
from .batching import TrainPair, micro_batches

LLAMA_CPP = "llama.cpp"
CHUNK = 4  # pairs per no-grad forward pass
Refs = dict[int, tuple[float, float]]


def backend_source(backend: Backend) -> str:
    """The cache's name for a backend's own numbers, e.g. `torch:bf16` (precision changes the values)."""
    return getattr(backend, "ref_source", backend.name)


def cached(ws: Workspace, pair_ids: list[int], model_sha: str, source: str, max_len: int) -> Refs:
    wanted = set(pair_ids)
    rows = ws.query(
        "SELECT pair_id, chosen, rejected FROM ref_logps WHERE model_sha256 = ? AND source = ? AND max_len = ?",
        (model_sha, source, max_len),
    )
    return {r["pair_id"]: (r["chosen"], r["rejected"]) for r in rows if r["pair_id"] in wanted}


def _store(ws: Workspace, values: Refs, model_sha: str, source: str, max_len: int) -> None:
    with ws.transaction() as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO ref_logps(pair_id, model_sha256, source, max_len, chosen, rejected)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(pid, model_sha, source, max_len, c, r) for pid, (c, r) in values.items()],
        )


def _score_llama_cpp(base_gguf: Path, items: list[TrainPair], threads: int | None):
    """Score `items` in llama.cpp, yielding the engine's DecodeSteps; returns their Refs."""
    from ..engine import Engine

    longest = max(len(t.encoded.prompt) + max(len(t.encoded.chosen), len(t.encoded.rejected)) for t in items)
    with Engine(base_gguf, n_seq=8, ctx_per_seq=longest + 8, n_threads=threads) as engine:
        scores = yield from engine.score_many_steps(
            [(t.encoded.prompt, r) for t in items for r in (t.encoded.chosen, t.encoded.rejected)]
        )
    return {t.pair_id: (scores[2 * i], scores[2 * i + 1]) for i, t in enumerate(items)}


def llama_cpp_refs_steps(
    ws: Workspace,
    items: list[TrainPair],
    *,
    model_sha: str,
    max_len: int,
    base_gguf: Path,
    threads: int | None,
    quant: str | None = None,
) -> Generator[DecodeStep, None, Refs]:
    """The base model's log-probs of `items` in llama.cpp: cached ones, the rest scored, yielding a
    DecodeStep after every decode; what is scored is stored at the end.

    `quant`: score the base quantized that way (e.g. q8_0), the reference a quantized export is compared
    with, so that the quantization's own error cancels out of the export's DPO margins."""
    source = LLAMA_CPP if quant in (None, "f16") else f"{LLAMA_CPP}:{quant}"
    refs = cached(ws, [t.pair_id for t in items], model_sha, source, max_len)
    missing = [t for t in items if t.pair_id not in refs]
    if not missing:
        return refs
    if source == LLAMA_CPP:
        values = yield from _score_llama_cpp(base_gguf, missing, threads)
    else:
        import tempfile

        from ..quantize import quantize

        with tempfile.TemporaryDirectory(prefix=".mipo-ref-", dir=ws.root) as tmp:
            quantized = quantize(base_gguf, Path(tmp) / f"base-{quant}.gguf", quant, threads=threads)
            values = yield from _score_llama_cpp(quantized, missing, threads)
    _store(ws, values, model_sha, source, max_len)
    refs.update(values)
    return refs


def reference_logps(
    ws: Workspace,
    backend: Backend,
    items: list[TrainPair],
    *,
    source: str,
    model_sha: str,
    max_len: int,
    base_gguf: Path,
    threads: int | None = None,
    adapter: bool = False,
) -> Generator[Progress, None, Refs]:
    """{pair_id: (chosen, rejected)} for `items`: the cache first, the missing ones computed and stored.

    `adapter`: score with the backend's current LoRA on (a later round's reference: the previous round's
    model); `source` must then name it apart from the base's numbers.

    Yields progress while computing; each chunk is committed as it finishes, so a cancelled job keeps them.
    """
    refs = cached(ws, [t.pair_id for t in items], model_sha, source, max_len)
    missing = [t for t in items if t.pair_id not in refs]
    if not missing:
        return refs
    clock = EtaClock(len(missing))
    if source == LLAMA_CPP:
        what = "reference log-probs (llama.cpp)"
        yield clock.event("train", 0, what, unit="pairs")
        steps = llama_cpp_refs_steps(ws, missing, model_sha=model_sha, max_len=max_len, base_gguf=base_gguf,
                                     threads=threads)  # fmt: skip
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                refs.update(stop.value)
                break
            yield clock.event("train", int(step.fraction * len(missing)), what, unit="pairs")
        yield clock.event("train", len(missing), what, unit="pairs")
        return refs
    done = 0
    for chunk in micro_batches(missing, CHUNK):
        c, r = backend.logprobs([t.encoded for t in chunk], adapter=adapter)
        values = {t.pair_id: (float(a), float(b)) for t, a, b in zip(chunk, c, r, strict=True)}
        _store(ws, values, model_sha, source, max_len)
        refs.update(values)
        done += len(chunk)
        what = "previous round's model" if adapter else "adapter off"
        yield clock.event("train", done, f"reference log-probs ({what})", unit="pairs")
    return refs


def mean_abs_difference(a: Refs, b: Refs) -> tuple[float, int] | None:
    """Mean |a - b| over the chosen and rejected log-probs of the pairs both hold, and how many pairs."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [abs(a[i][k] - b[i][k]) for i in common for k in (0, 1)]
    return float(np.mean(diffs)), len(common)


def policy_logps_llama_cpp(base_gguf: Path, items, adapter, threads: int | None) -> dict:
    """{pair_id: (chosen, rejected)}: the trained policy in llama.cpp, the base plus the exact LoRA adapter."""
    import tempfile

    from ..adapter_gguf import write_adapter_gguf
    from ..engine import Engine

    with tempfile.TemporaryDirectory(prefix="mipo-policy-") as tmp:
        lora = write_adapter_gguf(base_gguf, Path(tmp) / "adapter.gguf", adapter)
        longest = max(
            len(t.encoded.prompt) + max(len(t.encoded.chosen), len(t.encoded.rejected)) for t in items
        )
        with Engine(base_gguf, n_seq=8, ctx_per_seq=longest + 8, lora_path=lora, n_threads=threads) as engine:
            scores = engine.score_many(
                [(t.encoded.prompt, r) for t in items for r in (t.encoded.chosen, t.encoded.rejected)]
            )
    return {t.pair_id: (scores[2 * i], scores[2 * i + 1]) for i, t in enumerate(items)}
