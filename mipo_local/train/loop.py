"""One LoRA-DPO training loop for every backend, readable top to bottom.

    pairs -> tokens -> held-out split -> reference log-probs (cached) -> for each optimizer step:
    grad_accum micro-batches (forward + backward) -> AdamW at the warmup+cosine lr -> log, evaluate,
    checkpoint -> final adapter in GGUF layout + held-out log-probs for export's fidelity check.

The data order is a pure function of (seed, epoch) and the step counter, so a checkpoint needs only the
backend's tensors and the step to resume exactly where a killed run stopped.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import modelsource
from ..adapter_io import ADAPTER_FILE, save_adapter
from ..errors import TrainingError, UserInputError
from ..fsutil import atomic_dir, atomic_write_text, private_dir
from ..pairs_store import list_pairs
from ..progress import EtaClock, Log, Progress
from ..settings import LORA_TARGETS, TrainSettings
from ..workspace import Workspace
from . import runs
from .backend import Backend, LoraConfig, PairBatch
from .batching import TrainPair, encode_pairs, epoch_order, micro_batches, split_heldout
from .dpo import dpo_metrics, dpo_terms

HELDOUT_FILE = "heldout.json"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainSummary:
    run: str
    steps: int
    train_pairs: int
    heldout_pairs: int
    final: dict
    seconds: float


def pick_backend(settings: TrainSettings) -> Backend:
    """`auto`: MLX on Apple Silicon, torch everywhere else (CUDA when there is one)."""
    name = settings.backend
    if name == "auto":
        name = "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "torch"
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as err:
            raise TrainingError("The torch backend needs torch, transformers and peft installed.") from err
        return TorchBackend(
            precision=settings.precision,
            threads=settings.threads,
            grad_checkpointing=settings.grad_checkpointing,
        )
    if name == "mlx":
        try:
            from .mlx_backend import MLXBackend
        except ImportError as err:
            raise TrainingError("The MLX backend needs mlx and mlx-lm (pip install mlx mlx-lm).") from err
        return MLXBackend()
    raise UserInputError(f"--backend must be auto, torch or mlx, not '{name}'.")


def validate(settings: TrainSettings) -> None:
    bad = [t for t in settings.targets if t not in LORA_TARGETS]
    if bad:
        raise UserInputError(
            f"--targets has unknown names {', '.join(bad)}; valid: {','.join(LORA_TARGETS)}."
        )
    for field, low in (("epochs", 1), ("rank", 1), ("batch_size", 1), ("grad_accum", 1), ("max_len", 32)):
        if getattr(settings, field) < low:
            raise UserInputError(f"--{field.replace('_', '-')} must be at least {low}.")
    if not 0 < settings.lr < 1:
        raise UserInputError(f"--lr must be between 0 and 1, not {settings.lr}.")
    if settings.ref not in ("cached", "llama.cpp"):
        raise UserInputError(f"--ref must be cached or llama.cpp, not '{settings.ref}'.")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# -- reference log-probs, computed once per pair and cached in the workspace --------------------------


def reference_logps(
    ws, backend, items: list[TrainPair], source: str, model_sha: str, max_len: int, base_path: Path
):
    """{pair_id: (chosen, rejected)} from the cache, computing the missing ones (adapter off, or llama.cpp)."""
    rows = ws.query(
        "SELECT pair_id, chosen, rejected FROM ref_logps WHERE model_sha256 = ? AND source = ? AND max_len = ?",
        (model_sha, source, max_len),
    )
    cache = {r["pair_id"]: (r["chosen"], r["rejected"]) for r in rows}
    missing = [t for t in items if t.pair_id not in cache]
    if missing:
        if source == "llama.cpp":
            from ..engine import Engine

            longest = max(
                len(t.encoded.prompt) + max(len(t.encoded.chosen), len(t.encoded.rejected)) for t in missing
            )
            with Engine(base_path, n_seq=8, ctx_per_seq=longest + 8) as eng:
                scores = eng.score_many(
                    [(t.encoded.prompt, r) for t in missing for r in (t.encoded.chosen, t.encoded.rejected)]
                )
            values = [(scores[2 * i], scores[2 * i + 1]) for i in range(len(missing))]
        else:
            values = []
            for chunk in micro_batches(missing, 4):
                c, r = backend.logprobs([t.encoded for t in chunk], adapter=False)
                values += list(zip(c.tolist(), r.tolist(), strict=True))
        with ws.transaction() as conn:
            for t, (c, r) in zip(missing, values, strict=True):
                conn.execute(
                    "INSERT OR REPLACE INTO ref_logps(pair_id, model_sha256, source, max_len, chosen, rejected) VALUES (?, ?, ?, ?, ?, ?)",
                    (t.pair_id, model_sha, source, max_len, c, r),
                )
                cache[t.pair_id] = (c, r)
    return cache


# -- checkpoints -------------------------------------------------------------------------------------------


def _checkpoint_dirs(root: Path) -> list[Path]:
    ck = root / runs.CHECKPOINTS_DIR
    return sorted(p for p in ck.glob("step-*") if (p / "state.json").is_file()) if ck.is_dir() else []


def save_checkpoint(root: Path, backend: Backend, step: int, state: dict) -> Path:
    target = root / runs.CHECKPOINTS_DIR / f"step-{step:06d}"
    private_dir(target.parent)
    with atomic_dir(target) as tmp:
        backend.save(tmp)
        (tmp / "state.json").write_text(
            json.dumps(state)
        )  # written last: its presence marks a whole checkpoint
    for old in _checkpoint_dirs(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_latest_checkpoint(root: Path, backend: Backend) -> tuple[dict, list[str]]:
    """Restore the newest loadable checkpoint; a damaged one is skipped with a warning (the previous stays usable)."""
    warnings = []
    for ck in reversed(_checkpoint_dirs(root)):
        try:
            state = json.loads((ck / "state.json").read_text())
            backend.load_state(ck)
            return state, warnings
        except (TrainingError, ValueError, KeyError) as err:
            warnings.append(f"Checkpoint {ck.name} is damaged ({err}); trying the previous one.")
    return {}, warnings


# -- the loop ---------------------------------------------------------------------------------------------------


def evaluate(backend: Backend, items: list[TrainPair], refs: dict, beta: float) -> dict[str, float]:
    pc, pr, rc, rr = [], [], [], []
    for chunk in micro_batches(items, 4):
        c, r = backend.logprobs([t.encoded for t in chunk], adapter=True)
        pc += c.tolist()
        pr += r.tolist()
        rc += [refs[t.pair_id][0] for t in chunk]
        rr += [refs[t.pair_id][1] for t in chunk]
    loss, r_c, r_r = dpo_terms(*(np.array(x) for x in (pc, pr, rc, rr)), beta, np)
    return {**dpo_metrics(loss, r_c, r_r), "_policy": list(zip(pc, pr, strict=True))}


def train(
    ws: Workspace, settings: TrainSettings, run_name: str | None = None, resume: bool = False
) -> Generator[Progress | Log, None, TrainSummary]:
    """The `mipo-local train` job: yields progress, returns a summary. Resumable after Ctrl-C or kill -9."""
    validate(settings)
    model = modelsource.base_model(ws)
    pairs = list_pairs(ws)
    if not pairs:
        raise UserInputError("There are no pairs to train on.", hint="Generate them first: mipo-local pairs")
    with ws.job("train", f"mipo-local train ({run_name or 'new run'})"):
        if resume:
            run = runs.require_run(ws, run_name) if run_name else runs.require_run(ws, None)
            settings = TrainSettings(**{**run.settings, "targets": tuple(run.settings["targets"])})
        else:
            backend_name = pick_backend(settings).name
            run = runs.create_run(
                ws, run_name or runs.new_run_name(ws), backend_name, asdict(settings), asdict(model)
            )
        try:
            return (yield from _train_run(ws, settings, run, model, pairs, resume))
        except TrainingError:
            runs.set_status(ws, run.id, "failed")
            raise
        except BaseException:
            runs.set_status(ws, run.id, "cancelled")
            raise


def _train_run(ws, settings, run, model, pairs, resume) -> Generator[Progress | Log, None, TrainSummary]:
    started = time.monotonic()
    root = private_dir(runs.run_dir(ws, run.name))
    lora = LoraConfig(settings.rank, settings.alpha, tuple(settings.targets))
    yield Log("train", f"Run '{run.name}': loading {model.name} with the {settings.backend} backend...")
    backend = pick_backend(settings)
    backend.load(model.file, lora, seed=settings.seed, device=settings.device)

    items = encode_pairs(str(model.file), pairs, settings.max_len)
    by_id = {t.pair_id: t for t in items}
    train_ids, held_ids = split_heldout(list(by_id), settings.eval_fraction, settings.seed)
    train_items, held_items = [by_id[i] for i in train_ids], [by_id[i] for i in held_ids]
    refs = reference_logps(
        ws,
        backend,
        items,
        "llama.cpp" if settings.ref == "llama.cpp" else backend.name,
        model.sha256,
        settings.max_len,
        model.file,
    )
    if settings.ref == "llama.cpp":
        exact = reference_logps(
            ws, backend, held_items[:8], backend.name, model.sha256, settings.max_len, model.file
        )
        if exact:
            diff = float(
                np.mean([abs(refs[i][0] - exact[i][0]) + abs(refs[i][1] - exact[i][1]) for i in exact]) / 2
            )
            runs.log(ws, run.id, 0, "info", {"ref_mean_abs_diff_llama_cpp_vs_backend": diff})
            yield Log(
                "train",
                f"Reference log-probs: llama.cpp vs {backend.name} differ by {diff:.4f} nats on average.",
            )

    per_step = settings.batch_size * settings.grad_accum
    steps_per_epoch = max(1, math.ceil(len(train_items) / per_step))
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(round(settings.warmup_ratio * total)))
    step = 0
    if resume:
        state, warnings = load_latest_checkpoint(root, backend)
        for w in warnings:
            yield Log("train", w, "warning")
        step = int(state.get("step", 0))
        runs.truncate_log(ws, run.id, step)
        yield Log("train", f"Resuming run '{run.name}' at step {step} of {total}.")
    runs.set_status(ws, run.id, "running")
    runs.log(
        ws,
        run.id,
        step,
        "info",
        {
            "train_pairs": len(train_items),
            "heldout_pairs": len(held_items),
            "total_steps": total,
            "backend": backend.name,
        },
    )
    clock = EtaClock(total, already_done=step)
    tokens_done, t0 = 0.0, time.monotonic()
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = epoch_order(len(train_items), settings.seed, epoch)
            chosen = [train_items[i] for i in order[in_epoch * per_step : (in_epoch + 1) * per_step]]
            lr = lr_at(step, total, settings.lr, warmup)
            batch_metrics = []
            for mb in micro_batches(chosen, settings.batch_size):
                pb = PairBatch(
                    [t.encoded for t in mb],
                    np.array([refs[t.pair_id][0] for t in mb]),
                    np.array([refs[t.pair_id][1] for t in mb]),
                )
                batch_metrics.append(
                    backend.accumulate(pb, beta=settings.beta, loss_scale=len(mb) / len(chosen))
                )
            metrics = {
                k: float(np.mean([m[k] for m in batch_metrics])) for k in batch_metrics[0] if k != "tokens"
            }
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(
                    f"The loss became {metrics['loss']} at step {step + 1}; training stopped and the last good checkpoint is kept.",
                    hint="Lower --lr and resume with --resume.",
                )
            grad_norm = backend.optimizer_step(lr)
            step += 1
            tokens_done += sum(m["tokens"] for m in batch_metrics)
            metrics.update(
                lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_done / max(1e-9, time.monotonic() - t0)
            )
            runs.log(ws, run.id, step, "train", metrics)
            if held_items and (step % settings.eval_every == 0 or step == total):
                ev = evaluate(backend, held_items, refs, settings.beta)
                ev.pop("_policy")
                runs.log(ws, run.id, step, "eval", ev)
                yield Log(
                    "train",
                    f"step {step}: held-out loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.2f}, margin {ev['margin']:.3f}",
                )
            if step % settings.checkpoint_every == 0 and step < total:
                save_checkpoint(root, backend, step, {"step": step})
            yield clock.event(
                "train",
                step,
                unit="steps",
                loss=round(metrics["loss"], 4),
                acc=round(metrics["accuracy"], 2),
                lr=f"{lr:.2e}",
            )
    except MemoryError as err:
        raise TrainingError(
            "Out of memory while training.",
            hint="Lower --max-len, --batch-size or --rank, or use --grad-checkpointing.",
        ) from err

    final = evaluate(backend, held_items, refs, settings.beta) if held_items else {}
    policy = final.pop("_policy", [])
    heldout = [
        {
            "pair_id": t.pair_id,
            "policy_chosen": pc,
            "policy_rejected": pr,
            "ref_chosen": refs[t.pair_id][0],
            "ref_rejected": refs[t.pair_id][1],
        }
        for t, (pc, pr) in zip(held_items, policy, strict=True)
    ]
    with atomic_dir(runs.final_dir(ws, run.name)) as tmp:
        save_adapter(tmp / ADAPTER_FILE, backend.lora_tensors(), alpha=settings.alpha, rank=settings.rank,
                     base_sha256=model.sha256, architecture=model.architecture,
                     extra={"run": run.name, "settings": asdict(settings)})  # fmt: skip
        atomic_write_text(tmp / HELDOUT_FILE, json.dumps(heldout))
        backend.save(tmp)
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    summary = TrainSummary(
        run.name, step, len(train_items), len(held_items), final, time.monotonic() - started
    )
    runs.set_status(ws, run.id, "finished", asdict(summary))
    return summary
