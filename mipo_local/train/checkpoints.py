"""Checkpoints of a run: runs/NAME/checkpoints/step-NNNNNN/, each written whole or not at all.

A checkpoint holds the backend's state (LoRA weights, optimizer moments, RNG states: safetensors + JSON)
and `state.json` (the step, hence the data position, since the data order is a pure function of the seed,
the epoch and the step). The newest KEEP are kept, so a damaged latest one leaves the previous one usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import TrainingError
from ..fsutil import atomic_dir, private_dir
from .backend import Backend

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
KEEP = 2


def checkpoint_dirs(run_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory without state.json never finished writing)."""
    ck = Path(run_root) / CHECKPOINTS_DIR
    if not ck.is_dir():
        return []
    return sorted(p for p in ck.glob("step-*") if (p / STATE_FILE).is_file())


def save_checkpoint(run_root: Path, backend: Backend, state: dict) -> Path:
    """Write a checkpoint atomically (temp dir + rename), then prune all but the newest KEEP."""
    target = Path(run_root) / CHECKPOINTS_DIR / f"step-{state['step']:06d}"
    private_dir(target.parent)
    with atomic_dir(target) as tmp:
        backend.save(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state))
    for old in checkpoint_dirs(run_root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_latest_checkpoint(run_root: Path, backend: Backend) -> tuple[dict, list[str]]:
    """Restore the newest loadable checkpoint into `backend`; returns (its state, warnings).

    A damaged checkpoint is renamed `damaged-step-N`, a warning says so, and the previous one is tried. With
    no checkpoint at all
    the state is {} (the run starts from step 0).

    Raises:
        TrainingError: checkpoints exist but none of them can be read.
    """
    warnings = []
    found = checkpoint_dirs(run_root)
    for ck in reversed(found):
        try:
            state = json.loads((ck / STATE_FILE).read_text())
            int(state["step"])
            backend.load_state(ck)
            return state, warnings
        except (TrainingError, ValueError, KeyError, TypeError, OSError) as err:
            warnings.append(f"Checkpoint {ck.name} is damaged ({err}); trying the previous one.")
            # Set aside (not deleted), so pruning after the next save never keeps it over a good one.
            ck.rename(ck.with_name(f"damaged-{ck.name}"))
    if found:
        raise TrainingError(
            f"No checkpoint of {run_root} can be read ({len(found)} damaged).",
            hint="Start a new run with another --run name.",
        )
    return {}, warnings
