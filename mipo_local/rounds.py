"""Self-improvement rounds: round k+1 samples its pairs from the round-k model, with the same MIPO recipe.

The round-k model is the base plus run k's LoRA, loaded by llama.cpp as an adapter (no merge, no second
copy of the base): the GGUF adapter is written once next to the run's trained weights. Round 1 samples
from the base alone. A run's round is the round of the pairs it trained on; `pairs --from-run R` makes the
pairs of round(R) + 1, and `train --from-run R` trains on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserInputError
from .workspace import Workspace

ADAPTER_GGUF = "adapter.gguf"  # beside the run's lora.safetensors


@dataclass(frozen=True)
class Sampler:
    """The model a round samples its pairs from."""

    run: str | None  # None: the base model (round 1)
    round: int
    adapter: Path | None  # the run's GGUF LoRA adapter, applied on the base by llama.cpp
    adapter_sha256: str | None = None

    @property
    def label(self) -> str:
        return (
            "the base model"
            if self.run is None
            else f"the base model + run '{self.run}' (round {self.round - 1})"
        )

    def key_parts(self) -> tuple:
        """What the sampler adds to a pair's key: nothing for the base (round-1 keys stay as they are)."""
        return () if self.run is None else ("from", self.run, self.adapter_sha256[:16])


def run_round(ws: Workspace, run_name: str) -> int:
    """The round a finished run's pairs belong to (1 for a run trained on the base model's pairs)."""
    from .train import runs

    run = runs.require_run(ws, run_name)
    return int(run.settings.get("round") or 1)


def sampler_for(ws: Workspace, from_run: str | None) -> Sampler:
    """The sampler of the next round after `from_run` (the base model when None).

    Raises:
        UserInputError / WorkspaceError: no such run, or it has not finished.
    """
    if from_run is None:
        return Sampler(None, 1, None)
    from .adapter_gguf import write_adapter_gguf
    from .adapter_io import ADAPTER_FILE, load_adapter
    from .fsutil import sha256_file
    from .modelsource import base_model
    from .train import runs

    run = runs.require_run(ws, from_run, finished=True)
    base = base_model(ws)
    if run.base_model.get("sha256") != base.sha256:
        raise UserInputError(
            f"Run '{from_run}' was trained on another base model than this workspace's; "
            "its model cannot sample this workspace's next round."
        )
    final = runs.final_dir(ws, from_run)
    adapter = final / ADAPTER_GGUF
    if not adapter.is_file():  # written once, atomically; the run's folder holds what the run made
        write_adapter_gguf(base.file, adapter, load_adapter(final / ADAPTER_FILE))
    return Sampler(from_run, run_round(ws, from_run) + 1, adapter, sha256_file(adapter))
