"""The one interface both training backends (torch, MLX) implement.

The loop (loop.py) owns the schedule, accumulation, held-out evaluation, checkpoints and progress; a
backend owns only tensors: forward passes, gradients, the optimizer state and the LoRA weights.
Everything crossing this boundary is numpy or plain Python, so the loop never imports torch or mlx.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapter_io import LoraTensor  # noqa: F401 (part of the interface)
from ..chat import EncodedPair


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = (
        "q",
        "k",
        "v",
        "o",
        "gate",
        "up",
        "down",
    )  # keys of gguf_io.LORA_TARGET_TENSORS
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class PairBatch:
    """Pairs for one micro-batch, with the reference log-probs (summed over response tokens) when known."""

    pairs: list[EncodedPair]
    ref_chosen: np.ndarray | None = None  # shape (n,), float64
    ref_rejected: np.ndarray | None = None
    weights: np.ndarray | None = None  # shape (n,): each pair's weight on the objective; None: all 1


class Backend(ABC):
    """A LoRA policy over a GGUF base model."""

    name: str = "abstract"

    @abstractmethod
    def load(self, base_gguf: Path, lora: LoraConfig, *, seed: int, device: str = "auto") -> None:
        """Load the base weights from the GGUF and attach freshly initialised LoRA layers (seeded)."""

    @abstractmethod
    def logprobs(self, pairs: list[EncodedPair], *, adapter: bool) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probs of the chosen and rejected responses (prompt tokens masked), no gradients.

        adapter=False gives the reference model (the base), without holding a second copy in memory.
        """

    @abstractmethod
    def accumulate(
        self,
        batch: PairBatch,
        *,
        beta: float,
        loss_scale: float,
        sft_weight: float = 0.0,
        kl_weight: float = 0.0,
    ) -> dict[str, float]:
        """Forward + backward of the DPO objective (dpo.dpo_objective) on `batch`, adding `loss_scale` *
        gradients to the buffers. kl_weight > 0 also reads the pairs' other-context sequences (and
        reports their mean per-token KL from the reference as `other_kl`).

        Returns the batch's metrics (loss, chosen/rejected rewards, margin, accuracy, tokens).
        """

    @abstractmethod
    def optimizer_step(self, lr: float, *, max_grad_norm: float = 1.0) -> float:
        """Apply AdamW with learning rate `lr` to the accumulated gradients, zero them; return grad norm."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write LoRA weights and optimizer state (safetensors + JSON; never pickle) into `directory`."""

    @abstractmethod
    def load_state(self, directory: Path) -> None:
        """Restore what `save` wrote. Raises TrainingError for a missing or corrupt checkpoint."""

    @abstractmethod
    def lora_tensors(self) -> dict[str, LoraTensor]:
        """The trained LoRA weights keyed by GGUF base-tensor name, in GGUF layout (see LoraTensor)."""

    @abstractmethod
    def set_lora_tensors(self, tensors: dict[str, LoraTensor]) -> None:
        """Load LoRA weights given in GGUF layout (the inverse of lora_tensors): a round that continues the
        previous round's adapter starts from them."""
