"""Quantize an F16 GGUF with llama.cpp's own quantizer (llama_model_quantize via llama-cpp-python)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ExportError, UserInputError
from .fsutil import FULL_BELOW, PRIVATE_FILE, disk_full_error, free_bytes, usable_cores
from .settings import QUANT_TYPES

AUTO_THRESHOLD_PARAMS = 1_000_000_000
# 4-bit K-quants hurt a 135M model badly (and fall back to other types on its 576-wide rows), so small
# models get Q8_0; from 1B parameters Q4_K_M keeps quality at a quarter of the F16 size.
AUTO_SMALL, AUTO_LARGE = "q8_0", "q4_k_m"

# Bits per weight of each type, for the free-disk estimate before writing.
BITS_PER_WEIGHT = {"f16": 16.0, "q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.5}


def _ftype(quant: str) -> int:
    import llama_cpp

    return {
        "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    }[quant]


def resolve_quant(quant: str | None, n_params: int) -> str:
    """The concrete quant for a name (auto: Q8_0 under 1B parameters, Q4_K_M above).

    Raises:
        UserInputError: an unsupported name, listing the valid ones.
    """
    name = (quant or "auto").strip().lower()
    if name not in QUANT_TYPES:
        raise UserInputError(
            f"'{quant}' is not a supported quant type; choose one of: {', '.join(QUANT_TYPES)}."
        )
    if name == "auto":
        return AUTO_SMALL if n_params < AUTO_THRESHOLD_PARAMS else AUTO_LARGE
    return name


def estimated_bytes(quant: str, n_params: int) -> int:
    """An upper-end estimate of a quantized file's size (tensor data plus 5% for metadata and fallbacks)."""
    return int(n_params * BITS_PER_WEIGHT[quant] / 8 * 1.05) + (16 << 20)


def quantize(
    source: str | os.PathLike, target: str | os.PathLike, quant: str, *, threads: int | None = None
) -> Path:
    """Quantize the GGUF `source` (F16, or a quantized base) into `target` (written by llama.cpp; made
    owner-only).

    The caller writes `target` inside a temporary export directory, which provides atomicity.

    Raises:
        ExportError: llama.cpp reported a failure.
    """
    import llama_cpp

    from .llama_loader import _quiet

    _quiet()  # llama.cpp's per-tensor log lines go to Python logging, not the terminal
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(quant)
    params.nthread = threads or usable_cores()
    # A base that is itself quantized (Q4_K_M, as most hubs ship) is dequantized and quantized again: that is
    # the reference a quantized export of it is checked against, the export's merge having dequantized it.
    params.allow_requantize = True
    target = Path(target)
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0 or not target.is_file():
        written = target.stat().st_size if target.is_file() else 0
        target.unlink(missing_ok=True)
        # llama.cpp says only "code 1" when its write fails: a file system left with less room than the
        # part it could not write is a full disk.
        expected = Path(source).stat().st_size * BITS_PER_WEIGHT[quant] / 16
        if free_bytes(target.parent) < max(FULL_BELOW, expected - written):
            raise disk_full_error(target)
        raise ExportError(f"llama.cpp could not quantize {source} to {quant.upper()} (code {rc}).")
    os.chmod(target, PRIVATE_FILE)
    return target
