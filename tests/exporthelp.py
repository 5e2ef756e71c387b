"""Build a finished training run for export tests: seeded random LoRA tensors and real held-out log-probs.

Training has its own tests; export only needs what training leaves behind (adapter_io's contract):
runs/NAME/final/lora.safetensors and heldout.json, and a `finished` row in `runs`. The held-out "policy"
log-probs come from llama.cpp running the base model with the exact (float32) LoRA applied as an adapter,
the reference log-probs from the base alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np

from mipo_local import gguf_io, modelsource
from mipo_local.adapter_gguf import write_adapter_gguf
from mipo_local.adapter_io import ADAPTER_FILE, load_adapter, save_adapter
from mipo_local.engine import Engine
from mipo_local.fidelity import HELDOUT_FILE
from mipo_local.fsutil import private_dir, sha256_file
from mipo_local.pairs_store import list_pairs
from mipo_local.train import runs
from mipo_local.train.backend import LoraTensor
from mipo_local.train.batching import encode_pairs

CONTEXT = "I am Ana, a vegan chef in Lisbon. I like short answers."
TOPICS = ("rice", "tea", "bread", "soup", "pasta", "salad", "beans", "stew", "curry", "tacos", "cake", "pie")


def random_lora(base: Path, *, rank: int = 4, alpha: float = 8.0, std: float = 0.05, seed: int = 0,
                targets=tuple(gguf_io.LORA_TARGET_TENSORS), reader=None) -> dict[str, LoraTensor]:  # fmt: skip
    """Seeded random LoRA pairs on every targeted tensor of `base`, in GGUF layout."""
    reader = reader or gguf_io.open_reader(base)
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    arch = gguf_io.field_value(reader, gguf.Keys.General.ARCHITECTURE)
    n_layers = int(gguf_io.field_value(reader, f"{arch}.block_count"))
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(n_layers):
        for short in targets:
            name = gguf_io.tensor_name(gguf_io.LORA_TARGET_TENSORS[short], layer)
            rows, cols = shapes[name]
            a = (rng.standard_normal((rank, cols)) * std).astype(np.float32)
            b = (rng.standard_normal((rows, rank)) * std).astype(np.float32)
            out[name] = LoraTensor(a, b, alpha / rank)
    return out


def insert_pairs(ws, n: int) -> None:
    with ws.transaction() as conn:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            conn.execute(
                "INSERT INTO pairs(pair_key, prompt, context, strategy, chosen, rejected, seed, settings, created_at)"
                " VALUES (?, ?, ?, 'test', ?, ?, 0, '{}', ?)",
                (f"export-{i}", f"How do I cook {topic} tonight?", CONTEXT,
                 f"Quick vegan {topic}: keep it simple and fresh.", f"Cook the {topic} with bacon and butter.",
                 time.time()),
            )  # fmt: skip


def make_finished_run(ws, name: str = "run-1", *, n_pairs: int = 6, rank: int = 4, alpha: float = 8.0,
                      std: float = 0.05, seed: int = 0, max_len: int = 512) -> runs.Run:  # fmt: skip
    """A finished run on the workspace's base model with a random LoRA; every pair is held out."""
    model = modelsource.base_model(ws)
    if not list_pairs(ws):
        insert_pairs(ws, n_pairs)
    lora = random_lora(model.file, rank=rank, alpha=alpha, std=std, seed=seed)
    settings = {"rank": rank, "alpha": alpha, "max_len": max_len, "seed": seed}
    run = runs.create_run(ws, name, "test", settings, {**model.__dict__})
    final = private_dir(runs.final_dir(ws, name))
    save_adapter(final / ADAPTER_FILE, lora, alpha=alpha, rank=rank, base_sha256=sha256_file(model.file),
                 architecture=model.architecture, extra={"run": name})  # fmt: skip
    heldout = heldout_logprobs(ws, model.file, final, max_len)
    (final / HELDOUT_FILE).write_text(json.dumps(heldout))
    runs.set_status(ws, run.id, "finished", {"steps": 1})
    return runs.get_run(ws, name)


def heldout_logprobs(ws, base: Path, final: Path, max_len: int) -> list[dict]:
    """Policy (base + exact LoRA in llama.cpp) and reference (base) log-probs of every pair."""
    pairs = list_pairs(ws)
    items = encode_pairs(str(base), pairs, max_len)
    requests = [(t.encoded.prompt, r) for t in items for r in (t.encoded.chosen, t.encoded.rejected)]
    ctx = max(len(p) + len(r) for p, r in requests) + 8
    adapter_path = final / ".policy-adapter.gguf"
    write_adapter_gguf(base, adapter_path, load_adapter(final / ADAPTER_FILE))
    try:
        with Engine(base, n_seq=4, ctx_per_seq=ctx, lora_path=adapter_path, n_threads=2) as e:
            policy = e.score_many(requests)
    finally:
        adapter_path.unlink()
    with Engine(base, n_seq=4, ctx_per_seq=ctx, n_threads=2) as e:
        ref = e.score_many(requests)
    return [
        {"pair_id": t.pair_id, "policy_chosen": policy[2 * i], "policy_rejected": policy[2 * i + 1],
         "ref_chosen": ref[2 * i], "ref_rejected": ref[2 * i + 1]}
        for i, t in enumerate(items)
    ]  # fmt: skip
