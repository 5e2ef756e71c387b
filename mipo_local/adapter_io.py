"""The trained adapter as it leaves training: LoRA tensors in GGUF names and layout, in safetensors.

This file is the contract between training (either backend) and export: export reads it and never needs
to know who trained. Layout per base tensor `<name>` (e.g. `blk.0.attn_q.weight`):

    <name>.lora_a   float32 (rank, in)
    <name>.lora_b   float32 (out, rank)     rows already in the GGUF's order (llama q/k permuted)
    delta W = scale * lora_b @ lora_a,  scale = alpha / rank

The safetensors metadata carries alpha, rank, the base model's sha256 and architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TrainingError
from .fsutil import atomic_path

ADAPTER_FILE = "lora.safetensors"


@dataclass
class LoraTensor:
    """One LoRA pair in GGUF layout for the base tensor `name` (e.g. `blk.0.attn_q.weight`).

    delta W (numpy order, out x in) = scale * b @ a, with a: (rank, in) and b: (out, rank), so that
    llama.cpp's `<name>.lora_a` / `<name>.lora_b` tensors are exactly `a` and `b`. For llama, `b`'s rows
    are already permuted the way the GGUF stores q/k (the HF->GGUF rotary permutation).
    """

    a: np.ndarray
    b: np.ndarray
    scale: float


@dataclass
class AdapterFile:
    tensors: dict[str, LoraTensor]
    alpha: float
    rank: int
    base_sha256: str
    architecture: str
    extra: dict


def save_adapter(
    path: Path,
    tensors: dict[str, LoraTensor],
    *,
    alpha: float,
    rank: int,
    base_sha256: str,
    architecture: str,
    extra: dict | None = None,
) -> Path:
    from safetensors.numpy import save_file

    flat: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        flat[f"{name}.lora_a"] = np.ascontiguousarray(t.a, dtype=np.float32)
        flat[f"{name}.lora_b"] = np.ascontiguousarray(t.b, dtype=np.float32)
    meta = {
        "alpha": str(alpha),
        "rank": str(rank),
        "base_sha256": base_sha256,
        "architecture": architecture,
        "extra": json.dumps(extra or {}),
    }
    with atomic_path(Path(path)) as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return Path(path)


def load_adapter(path: Path) -> AdapterFile:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"The adapter file {path} is missing; the run has no finished checkpoint.")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        alpha, rank = float(meta["alpha"]), int(meta["rank"])
    except Exception as err:  # safetensors raises several types for damaged files
        raise TrainingError(f"The adapter file {path} is damaged ({err}).") from err
    scale = alpha / rank
    tensors: dict[str, LoraTensor] = {}
    for key in arrays:
        if key.endswith(".lora_a"):
            base = key[: -len(".lora_a")]
            tensors[base] = LoraTensor(arrays[key], arrays[f"{base}.lora_b"], scale)
    return AdapterFile(
        tensors=tensors,
        alpha=alpha,
        rank=rank,
        base_sha256=meta.get("base_sha256", ""),
        architecture=meta.get("architecture", ""),
        extra=json.loads(meta.get("extra", "{}")),
    )
