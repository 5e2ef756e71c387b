"""One LoRA-DPO training loop for every backend, readable top to bottom.

    pairs -> tokens -> held-out split -> reference log-probs (cached) -> for each optimizer step:
    grad_accum micro-batches (forward + backward) -> AdamW at the warmup+cosine lr -> log, evaluate,
    checkpoint -> final adapter in GGUF layout + held-out log-probs for export's fidelity check.

The data order is a pure function of (seed, epoch) and the step counter, so a checkpoint needs only the
backend's tensors and the step to resume exactly where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import modelsource
from ..adapter_io import ADAPTER_FILE, save_adapter
from ..errors import MipoError, TrainingError, UserInputError
from ..fsutil import atomic_dir, atomic_write_text, private_dir
from ..pairs_store import list_pairs
from ..progress import Log, Progress, drain
from ..quantize import resolve_quant
from ..settings import LORA_TARGETS, ROUND_INITS, ROUND_REFS, ExportSettings, TrainSettings
from ..user_pairs import USER, list_user_pairs
from ..validation import THREADS_MAX, check_name, require_int, require_seed
from ..workspace import Workspace
from . import runs
from .backend import Backend, LoraConfig, PairBatch
from .batching import ANCHORS, TrainPair, encode_pairs, epoch_order, micro_batches, split_heldout
from .checkpoints import STATE_FILE, load_latest_checkpoint, save_checkpoint
from .dpo import dpo_metrics, dpo_terms
from .meter import HELDOUT, LOADING, REFERENCE, TRAINING, Plan, TrainMeter
from .reference import (
    LLAMA_CPP,
    backend_source,
    cached,
    llama_cpp_refs_steps,
    mean_abs_difference,
    policy_logps_llama_cpp,
    reference_logps,
)

HELDOUT_FILE = "heldout.json"
SPLIT_FILE = "split.json"  # the run's train / held-out pair ids, fixed at its start
COMPARE_PAIRS = 8  # pairs scored by the second reference source to report how far the two are apart
# The user's pairs are few next to MIPO's: each is repeated in every epoch until they make at least this
# share of its pairs, at most USER_REPEATS_MAX times (the --user-weight help says the same).
USER_SHARE = 0.125
USER_REPEATS_MAX = 8
OOM_HINT = "Lower --max-len, --batch-size or --rank, or add --grad-checkpointing, then rerun with --resume."


@dataclass
class TrainSummary:
    run: str
    steps: int
    train_pairs: int
    heldout_pairs: int
    final: dict  # held-out metrics at the end (empty without held-out pairs)
    seconds: float  # the whole job, model loading included
    load_seconds: float = 0.0
    last_train: dict = field(default_factory=dict)  # the last step's training metrics
    user_pairs: int = 0  # pairs the user made among the training pairs
    user_repeats: int = 1  # times each of them is seen per epoch


def backend_name(settings: TrainSettings) -> str:
    """`auto`: MLX on Apple Silicon, torch everywhere else (CUDA when there is one)."""
    if settings.backend == "auto":
        return "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "torch"
    return settings.backend


def pick_backend(settings: TrainSettings) -> Backend:
    """A fresh (unloaded) backend object for the settings; heavy imports happen here."""
    name = backend_name(settings)
    options = dict(
        precision=settings.precision, threads=settings.threads, grad_checkpointing=settings.grad_checkpointing
    )
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as err:
            raise TrainingError("The torch backend needs torch installed.") from err
        return TorchBackend(**options)
    if name == "mlx":
        try:
            from .mlx_backend import MLXBackend
        except ImportError as err:
            raise TrainingError("The MLX backend needs mlx and mlx-lm (pip install mlx mlx-lm).") from err
        return MLXBackend(**options)
    raise UserInputError(f"--backend must be auto, torch or mlx, not '{name}'.")


def validate(s: TrainSettings) -> None:
    """Raise UserInputError naming the first bad setting."""
    bad = [t for t in s.targets if t not in LORA_TARGETS]
    if bad or not s.targets:
        raise UserInputError(
            f"--targets has unknown names {', '.join(bad) or '(none given)'}; valid: {','.join(LORA_TARGETS)}."
        )
    for name, low, high in INT_RANGES:
        value = getattr(s, name)
        if value < low:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least {low}, not {value}.")
        require_int(f"--{name.replace('_', '-')}", value, low, high)
    require_seed("--seed", s.seed)
    require_int("--threads", s.threads, 1, THREADS_MAX)
    checks = [
        ("lr", 0 < s.lr < 1, "between 0 and 1"),
        ("beta", 0 < s.beta <= 100, "positive, at most 100"),
        ("sft_weight", 0 <= s.sft_weight <= 10, "between 0 and 10"),
        ("other_context_kl", 0 <= s.other_context_kl <= 100, "between 0 and 100"),
        ("kl_anchor", s.kl_anchor in ANCHORS, " or ".join(ANCHORS)),
        ("alpha", 0 < s.alpha <= 10_000, "positive, at most 10000"),
        ("eval_fraction", 0 <= s.eval_fraction <= 0.5, "between 0 and 0.5"),
        ("warmup_ratio", 0 <= s.warmup_ratio < 1, "between 0 and 1"),
        ("backend", s.backend in ("auto", "torch", "mlx"), "auto, torch or mlx"),
        ("ref", s.ref in ("cached", LLAMA_CPP), "cached or llama.cpp"),
        ("device", s.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
        ("precision", s.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
        ("round_init", s.round_init in ROUND_INITS, " or ".join(ROUND_INITS)),
        ("round_ref", s.round_ref in ROUND_REFS, " or ".join(ROUND_REFS)),
        ("user_weight", 0 <= s.user_weight <= 100, "between 0 and 100"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise UserInputError(f"--{name.replace('_', '-')} must be {what}, not {getattr(s, name)!r}.")


# (setting, lowest, highest): the highest values are far beyond any useful run, and stop a typo (an epoch
# count of a million) from starting a job of months.
INT_RANGES = (
    ("epochs", 1, 100), ("rank", 1, 1024), ("batch_size", 1, 256), ("grad_accum", 1, 4096),
    ("max_len", 32, 131_072), ("eval_every", 1, 1_000_000), ("checkpoint_every", 1, 1_000_000),
)  # fmt: skip


def check_rank_fits(rank: int, info, targets) -> None:
    """LoRA's rank cannot usefully exceed the smaller side of any matrix it adapts; a larger one only
    allocates memory (a rank of 10^8 asks for hundreds of GB)."""
    from .. import gguf_io

    shapes = {t.name: t.shape for t in info.tensors}
    smallest = min(
        (min(shapes[name]) for kind in targets for i in range(info.n_layers)
         if (name := gguf_io.tensor_name(gguf_io.LORA_TARGET_TENSORS[kind], i)) in shapes),
        default=None,
    )  # fmt: skip
    if smallest is not None and rank > smallest:
        raise UserInputError(
            f"--rank {rank} is larger than this model's smallest adapted matrix side ({smallest}); "
            f"use at most {smallest} (8 or 16 is usual)."
        )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to 10% of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(backend: Backend, items: list[TrainPair], refs: dict, beta: float) -> tuple[dict, dict]:
    """Held-out DPO metrics of the current policy, and its summed log-probs per pair id."""
    return drain(evaluate_steps(backend, items, refs, beta))


def evaluate_steps(
    backend: Backend, items: list[TrainPair], refs: dict, beta: float
) -> Generator[Progress, None, tuple[dict, dict]]:
    """`evaluate`, yielding the held-out pairs scored after every chunk of them."""
    policy = {}
    for chunk in micro_batches(items, 4):
        c, r = backend.logprobs([t.encoded for t in chunk], adapter=True)
        policy.update({t.pair_id: (float(a), float(b)) for t, a, b in zip(chunk, c, r, strict=True)})
        yield Progress("train", len(policy), len(items), "held-out pairs scored", unit="held-out pairs")
    ids = [t.pair_id for t in items]
    arrays = [np.array([src[i][k] for i in ids]) for src in (policy, refs) for k in (0, 1)]
    loss, r_c, r_r = dpo_terms(*arrays, beta, np)
    return dpo_metrics(loss, r_c, r_r), policy


def round_settings(ws: Workspace, s: TrainSettings) -> TrainSettings:
    """The settings of a run that trains on the next round after `s.from_run`: its round number, and, when
    it continues that run's LoRA, that LoRA's shape (rank, alpha, targets)."""
    if s.from_run is None:
        return dataclasses.replace(s, round=1)
    prev = runs.require_run(ws, s.from_run, finished=True)
    prev_settings = resumed_settings(prev.settings)
    s = dataclasses.replace(s, round=prev_settings.round + 1)
    if s.round_init == "continue":
        s = dataclasses.replace(
            s, rank=prev_settings.rank, alpha=prev_settings.alpha, targets=tuple(prev_settings.targets)
        )
    return s


def round_pairs(ws: Workspace, s: TrainSettings):
    """The pairs a run trains on: those its round's model sampled (round 1: the base model's and imported
    pairs; round k+1: those of `pairs --from-run`), and every pair the user made, whichever model sampled
    it (none with --user-weight 0)."""
    pairs = [p for p in list_pairs(ws, sampler=s.from_run) if p.source != USER]
    if s.user_weight > 0:
        pairs += list_user_pairs(ws)
    return sorted(pairs, key=lambda p: p.id)


def user_repeats(n_user: int, n_other: int) -> int:
    """How often each user pair appears per epoch: enough for the user's pairs to make USER_SHARE of the
    epoch's pairs, at least once and at most USER_REPEATS_MAX times."""
    if not n_user:
        return 1
    need = USER_SHARE * n_other / ((1 - USER_SHARE) * n_user)
    return max(1, min(USER_REPEATS_MAX, math.ceil(need - 1e-9)))


def resumed_settings(stored: dict) -> TrainSettings:
    """A run's settings as stored at its start; a setting added since gets the value that run trained with."""
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {k: v for k, v in stored.items() if k in known}
    # A stored run that lacks a setting trained without it: no KL anchor (or the "rejected" one), a first
    # round, every pair at weight 1.
    values.setdefault("other_context_kl", 0.0)
    values.setdefault("kl_anchor", "rejected")
    values.setdefault("from_run", None)
    values.setdefault("round", 1)
    values.setdefault("user_weight", 1.0)
    return TrainSettings(**{**values, "targets": tuple(values["targets"])})


def train(
    ws: Workspace, settings: TrainSettings, run_name: str | None = None, resume: bool = False
) -> Generator[Progress | Log, None, TrainSummary]:
    """The `mipo-local train` job: yields progress, returns a summary. Resumable after Ctrl-C or kill -9.

    With resume=True the run's own stored settings are used (the given ones are ignored).

    Raises:
        UserInputError: no pairs, bad settings, an existing run name without resume.
        TrainingError: NaN loss, out of memory, unreadable checkpoints.
    """
    validate(settings)
    model = modelsource.base_model(ws)
    if resume:
        run = runs.require_run(ws, run_name)
        if run.status == "finished":
            raise UserInputError(f"The run '{run.name}' has already finished; there is nothing to resume.")
        settings = resumed_settings(run.settings)
    else:
        from .. import gguf_io

        settings = round_settings(ws, settings)
        check_rank_fits(settings.rank, gguf_io.read_info(model.file), settings.targets)
        if run_name is not None:
            check_name("--run", run_name)
    pairs = round_pairs(ws, settings)
    if not pairs:
        if settings.from_run:
            raise UserInputError(
                f"There are no pairs of round {settings.round} yet (sampled by run '{settings.from_run}').",
                hint=f"Generate them first: mipo-local pairs --from-run {settings.from_run}",
            )
        raise UserInputError("There are no pairs to train on.", hint="Generate them first: mipo-local pairs")
    with ws.job("train", f"mipo-local train ({run_name or 'new run'})"):
        if not resume:
            run = runs.create_run(
                ws, run_name or runs.new_run_name(ws), backend_name(settings), asdict(settings), asdict(model)
            )
        try:
            return (yield from _train_run(ws, settings, run, model, pairs, resume))
        except BaseException as err:
            if not resume and runs.get_run(ws, run.name).status == "created":
                # Stopped before training began (the model did not load, a bad setting, Ctrl-C while
                # loading): nothing to resume, so the name stays free for the next try.
                runs.delete_run(ws, run.id)
            else:
                runs.set_status(ws, run.id, "failed" if isinstance(err, TrainingError) else "cancelled")
            raise


def _split(root: Path, items: list[TrainPair], user_ids: set[int], settings: TrainSettings, resume: bool):
    """The run's (train, held-out, user) items: fixed when the run starts, so a resume sees the same data.
    The user's pairs are never held out: they are few, and each one is what the user asked for."""
    by_id = {t.pair_id: t for t in items}
    path = root / SPLIT_FILE
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        gone = [i for i in saved["train"] + saved["heldout"] if i not in by_id]
        if gone:
            raise TrainingError(
                f"Pair {gone[0]} was removed after run {root.name} started; it cannot resume exactly.",
                hint="Start a new run with another --run name.",
            )
        train_ids, held_ids, mine = saved["train"], saved["heldout"], saved.get("user", [])
    else:
        mine = sorted(i for i in by_id if i in user_ids)
        train_ids, held_ids = split_heldout([i for i in by_id if i not in user_ids], settings.eval_fraction,
                                            settings.seed)  # fmt: skip
        train_ids = sorted(train_ids + mine)
        atomic_write_text(path, json.dumps({"train": train_ids, "heldout": held_ids, "user": mine}))
    if not train_ids:
        raise UserInputError(f"All {len(items)} pairs are held out; add pairs or lower the held-out share.")
    return [by_id[i] for i in train_ids], [by_id[i] for i in held_ids], set(mine)


def _train_run(ws, settings, run, model, pairs, resume) -> Generator[Progress | Log, None, TrainSummary]:
    started = time.monotonic()
    root = private_dir(runs.run_dir(ws, run.name))
    backend = pick_backend(settings)
    meter = TrainMeter()
    yield Log("train", f"Run '{run.name}': loading {model.name} for the {backend.name} backend...")
    yield meter.event(LOADING, 0, 0, "steps", f"{model.name} for the {backend.name} backend")
    lora = LoraConfig(settings.rank, settings.alpha, tuple(settings.targets))
    try:
        backend.load(model.file, lora, seed=settings.seed, device=settings.device)
    except MemoryError as err:
        raise TrainingError(f"Out of memory while loading {model.name} for training.", hint=OOM_HINT) from err
    previous = None
    if settings.from_run:  # a later round: the LoRA it continues, or the model DPO measures against
        from ..adapter_io import load_adapter

        previous = load_adapter(runs.final_dir(ws, settings.from_run) / ADAPTER_FILE).tensors
        if settings.round_init == "continue":  # a checkpoint, when resuming, replaces it below
            backend.set_lora_tensors(previous)
        yield Log("train", f"Round {settings.round}: {settings.round_init} run '{settings.from_run}''s LoRA, "
                           f"reference: {'the base model' if settings.round_ref == 'base' else 'that run'}.")  # fmt: skip
    load_seconds = time.monotonic() - started
    runs.set_status(ws, run.id, "running")
    yield Log("train", f"Loaded in {load_seconds:.0f} s; preparing {len(pairs)} pairs.")

    # Data: the model's own template and tokenizer; the split fixed at the run's start.
    anchor = settings.kl_anchor if settings.other_context_kl > 0 else None
    items = encode_pairs(str(model.file), pairs, settings.max_len, anchor)
    train_items, held_items, mine = _split(
        root, items, {p.id for p in pairs if p.source == USER}, settings, resume
    )
    items = train_items + held_items
    # The user's pairs: weighted on the objective, and repeated in every epoch when they are few.
    repeats = user_repeats(len(mine), len(train_items) - len(mine))
    n_distinct = len(train_items)
    train_items = train_items + [t for t in train_items if t.pair_id in mine] * (repeats - 1)
    weight = {i: settings.user_weight for i in mine}

    # The schedule.
    per_step = settings.batch_size * settings.grad_accum
    steps_per_epoch = math.ceil(len(train_items) / per_step)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, round(settings.warmup_ratio * total))

    # Reference log-probs, once per pair, from the cache when a run already computed them.
    exact = backend_source(backend)
    source = LLAMA_CPP if settings.ref == LLAMA_CPP else exact
    ref_args = dict(
        model_sha=model.sha256, max_len=settings.max_len, base_gguf=model.file, threads=settings.threads
    )
    by_previous = previous is not None and settings.round_ref == "previous"
    ref_source = f"{exact}@{settings.from_run}" if by_previous else source
    missing = len(items) - len(
        cached(ws, [t.pair_id for t in items], model.sha256, ref_source, settings.max_len)
    )
    meter.plan(_plan(settings, len(train_items), len(held_items), total, 0, missing))
    try:
        if by_previous:
            refs = yield from meter.relay(
                REFERENCE, _previous_round_refs(ws, backend, items, previous, settings, exact, ref_args)
            )
        else:
            refs = yield from meter.relay(
                REFERENCE, reference_logps(ws, backend, items, source=source, **ref_args)
            )
        if by_previous:
            other = {}
        elif source == LLAMA_CPP:  # how far the fast source is from the exact one, on a few pairs
            compare = reference_logps(ws, backend, items[:COMPARE_PAIRS], source=exact, **ref_args)
            other = yield from meter.relay(REFERENCE, compare)
        else:
            other = cached(ws, [t.pair_id for t in items], model.sha256, LLAMA_CPP, settings.max_len)
    except MemoryError as err:
        raise TrainingError("Out of memory while computing reference log-probs.", hint=OOM_HINT) from err
    compared = mean_abs_difference(refs, other)
    if compared and not resume:
        diff, n = compared
        info = {"ref_source": source, "ref_mean_abs_diff": diff, "ref_compared_pairs": n,
                "ref_compared_sources": sorted({exact, LLAMA_CPP})}  # fmt: skip
        runs.log(ws, run.id, 0, "info", info)
        yield Log(
            "train",
            f"Reference log-probs: llama.cpp and {exact} differ by {diff:.4f} nats on average ({n} pairs).",
        )

    step = 0
    if resume:
        state, warnings = load_latest_checkpoint(root, backend)
        for w in warnings:
            yield Log("train", w, "warning")
        step = int(state.get("step", 0))
        runs.truncate_log(ws, run.id, step)
        yield Log("train", f"Resuming run '{run.name}' at step {step} of {total}.")
        meter.plan(_plan(settings, len(train_items), len(held_items), total, step, 0))
    yours = (
        f" ({len(mine)} yours, weight {settings.user_weight:g}, each seen {repeats}x an epoch)"
        if mine
        else ""
    )
    if not resume:
        yield Log("train", f"Training {total} steps ({settings.epochs} epoch{'s' if settings.epochs > 1 else ''} of "
                           f"{steps_per_epoch}) on {n_distinct} pairs{yours}; {len(held_items)} held out.")  # fmt: skip
    runs.log(ws, run.id, step, "info", {"train_pairs": n_distinct, "heldout_pairs": len(held_items),
                                        "user_pairs": len(mine), "user_repeats": repeats,
                                        "total_steps": total, "backend": backend.name, "ref_source": source})  # fmt: skip

    t0, tokens, pairs_done, first_step = time.monotonic(), 0, 0, step
    saved_step, at_yield, metrics = step, False, {}
    yield meter.event(TRAINING, step, total, "steps", f"step {step + 1}/{total} starting")
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = epoch_order(len(train_items), settings.seed, epoch)
            chosen = [train_items[i] for i in order[in_epoch * per_step : (in_epoch + 1) * per_step]]
            lr = lr_at(step, total, settings.lr, warmup)
            parts = []
            batches = micro_batches(chosen, settings.batch_size)
            for i, mb in enumerate(batches, 1):
                pb = PairBatch([t.encoded for t in mb], np.array([refs[t.pair_id][0] for t in mb]),
                               np.array([refs[t.pair_id][1] for t in mb]),
                               np.array([weight.get(t.pair_id, 1.0) for t in mb]) if weight else None)  # fmt: skip
                parts.append(
                    (
                        len(mb),
                        backend.accumulate(
                            pb,
                            beta=settings.beta,
                            loss_scale=len(mb) / len(chosen),
                            sft_weight=settings.sft_weight,
                            kl_weight=settings.other_context_kl,
                        ),
                    )
                )
                meter.advance(TRAINING, len(mb))
                if i < len(batches):
                    # A safe point: nothing is applied until the optimizer step, so a stop here keeps the
                    # state of the last whole step (the gradients so far are simply dropped).
                    at_yield = True
                    yield meter.event(TRAINING, step, total, "steps", f"step {step + 1}/{total}, micro-batch "
                                      f"{i}/{len(batches)} done")  # fmt: skip
                    at_yield = False
            keys = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "other_kl")
            metrics = {k: sum(n * m[k] for n, m in parts) / len(chosen) for k in keys if k in parts[0][1]}
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(
                    f"The loss became {metrics['loss']} at step {step + 1}; training stopped and the last "
                    f"good checkpoint (step {saved_step}) is kept.",
                    hint="Lower --lr, then continue with --resume.",
                )
            grad_norm = backend.optimizer_step(lr)
            if not math.isfinite(grad_norm):
                raise TrainingError(
                    f"The gradients became {grad_norm} at step {step + 1}; training stopped and the last "
                    f"good checkpoint (step {saved_step}) is kept.",
                    hint="Lower --lr, then continue with --resume.",
                )
            step += 1
            tokens += sum(t.n_tokens for t in chosen)
            pairs_done += len(chosen)
            elapsed = max(1e-9, time.monotonic() - t0)
            per_step_s = elapsed / (step - first_step)
            event = meter.event(TRAINING, step, total, "steps", f"step {step}/{total} done, {per_step_s:.1f} s/step",
                                loss=round(metrics["loss"], 4), acc=round(metrics["accuracy"], 2), lr=f"{lr:.2e}")  # fmt: skip
            metrics.update(lr=lr, grad_norm=grad_norm, epoch=epoch + 1, tokens_per_s=tokens / elapsed,
                           pairs_per_s=pairs_done / elapsed, eta_s=event.eta_s)  # fmt: skip
            runs.log(ws, run.id, step, "train", metrics)
            if step % settings.checkpoint_every == 0 and step < total:
                save_checkpoint(root, backend, {"step": step, "epoch": epoch, "total": total})
                saved_step = step
            at_yield = True
            yield event
            if held_items and (step % settings.eval_every == 0 or step == total):
                ev, _ = yield from meter.relay(
                    HELDOUT, evaluate_steps(backend, held_items, refs, settings.beta)
                )
                runs.log(ws, run.id, step, "eval", ev)
                yield Log("train", f"step {step}: held-out loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.2f}, "
                                   f"margin {ev['margin']:+.3f}")  # fmt: skip
            at_yield = False
    except MemoryError as err:
        raise TrainingError(f"Out of memory at training step {step + 1}.", hint=OOM_HINT) from err
    except (GeneratorExit, KeyboardInterrupt):
        # Stopped at a yield (between two steps or two micro-batches): the state is that of `step` whole
        # steps, so keep what was trained since the last checkpoint. (LoRA dropout is off: a partial step
        # leaves no trace in the random state either.)
        if at_yield and step > saved_step:
            save_checkpoint(
                root, backend, {"step": step, "epoch": (step - 1) // steps_per_epoch, "total": total}
            )
        raise

    final, policy = ({}, {})
    if held_items:
        final, policy = yield from meter.relay(
            HELDOUT, evaluate_steps(backend, held_items, refs, settings.beta)
        )
    heldout = [
        {"pair_id": t.pair_id, "policy_chosen": policy[t.pair_id][0], "policy_rejected": policy[t.pair_id][1],
         "ref_chosen": refs[t.pair_id][0], "ref_rejected": refs[t.pair_id][1]}
        for t in held_items
    ]  # fmt: skip
    with atomic_dir(runs.final_dir(ws, run.name)) as tmp:
        save_adapter(tmp / ADAPTER_FILE, backend.lora_tensors(), alpha=settings.alpha, rank=settings.rank,
                     base_sha256=model.sha256, architecture=model.architecture,
                     extra={"run": run.name, "backend": backend.name, "settings": asdict(settings)})  # fmt: skip
        if held_items:
            yield Log(
                "train", "Scoring held-out pairs in llama.cpp (base, base + adapter) for the export check."
            )
            yield meter.event(
                HELDOUT, 0, len(held_items), "held-out pairs", "llama.cpp, for the export check"
            )
            try:
                heldout = _llama_cpp_heldout(ws, tmp / ADAPTER_FILE, held_items, heldout, model, ref_args)
            except (MipoError, MemoryError) as err:
                # Only a head start for the export's check, which computes what it needs itself: the trained
                # adapter must not be lost over it.
                yield Log("train", f"Skipped scoring the held-out pairs in llama.cpp ({err}).", "warning")
        (tmp / HELDOUT_FILE).write_text(json.dumps(heldout))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "total": total}))
    summary = TrainSummary(run.name, step, n_distinct, len(held_items), final,
                           time.monotonic() - started, load_seconds, metrics, len(mine), repeats)  # fmt: skip
    runs.set_status(ws, run.id, "finished", asdict(summary))
    return summary


def _plan(settings: TrainSettings, n_train: int, n_held: int, total: int, step: int, ref_pairs: int) -> Plan:
    """The work left from `step` on: the ETA's measure (meter.py)."""
    evals = sum(1 for s in range(step + 1, total + 1) if s % settings.eval_every == 0 or s == total)
    per_step = min(n_train, settings.batch_size * settings.grad_accum)
    # The final evaluation and the llama.cpp scoring for the export check each read the held-out pairs once.
    return Plan(ref_pairs, total - step, per_step, n_held, evals + 2 if n_held else 0)


def _previous_round_refs(ws, backend, items, previous, settings, exact, ref_args):
    """Reference log-probs under the previous round's model: the backend with that run's LoRA, cached
    under a source name of its own. A fresh LoRA is put back afterwards."""
    fresh = backend.lora_tensors() if settings.round_init == "fresh" else None
    backend.set_lora_tensors(previous)
    try:
        source = f"{exact}@{settings.from_run}"
        return (yield from reference_logps(ws, backend, items, source=source, adapter=True, **ref_args))
    finally:
        if fresh is not None:
            backend.set_lora_tensors(fresh)


def _llama_cpp_heldout(ws, adapter_path, held_items, heldout, model, ref_args) -> list[dict]:
    """Add llama.cpp's log-probs of the trained policy (base + exact adapter) to the first held-out pairs.

    The export's fidelity check compares exported files with these: same engine, F16 weights, so the
    numeric noise of bf16 training (measured: a held-out margin of -1.89 nats in bf16 that is +0.52 in
    fp32) does not count against an export. The base, plain and quantized like the default export, is
    scored and cached at the same time so that exporting stays quick."""
    from ..adapter_io import load_adapter

    first = sorted(held_items, key=lambda t: t.pair_id)[: ExportSettings().verify_pairs]
    drain(llama_cpp_refs_steps(ws, first, **ref_args))
    quant = resolve_quant(ExportSettings().quant, model.n_params)
    drain(llama_cpp_refs_steps(ws, first, **ref_args, quant=quant))
    policy = policy_logps_llama_cpp(model.file, first, load_adapter(adapter_path), ref_args["threads"])
    return [
        {**row, "llama_policy_chosen": policy[row["pair_id"]][0], "llama_policy_rejected": policy[row["pair_id"]][1]}
        if row["pair_id"] in policy
        else row
        for row in heldout
    ]  # fmt: skip
