"""`mipo-local train` and `mipo-local runs list|show`."""

from __future__ import annotations

import click

from ..settings import ROUND_INITS, ROUND_REFS, TrainSettings, with_overrides
from ..train import runs as run_store
from ..train.batching import ANCHORS
from ..train.loop import train as train_job
from .common import drive, open_workspace, table


def _targets(_ctx, _param, value):
    return None if value is None else tuple(t.strip() for t in value.split(",") if t.strip())


@click.command()
@click.option(
    "--backend",
    type=click.Choice(["auto", "mlx", "torch"]),
    default=None,
    help="auto: MLX on Apple Silicon, torch elsewhere.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="torch device (auto: CUDA when available).",
)
@click.option("--epochs", type=int, default=None, help="Passes over the training pairs (default: 1).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: 5e-4).")
@click.option("--beta", type=float, default=None, help="DPO beta (default: 0.1).")
@click.option(
    "--sft-weight",
    type=float,
    default=None,
    help="Add this times the chosen answer's per-token NLL to the DPO loss: holds the model near "
    "ordinary text (RPO; default: 1, 0 is plain DPO).",
)
@click.option(
    "--other-context-kl",
    type=float,
    default=None,
    help="Add this times the per-token KL from the base model to yours on each pair's anchor text "
    "(--kl-anchor): the model changes its answers for your context only, which keeps the damage to "
    "everything else small (default: 30; 0 turns it off and trains about 1.5x faster).",
)
@click.option(
    "--kl-anchor",
    type=click.Choice(ANCHORS),
    default=None,
    help="The anchor text: the chosen answer with no system turn (no-context, the default), or the "
    "rejected answer under the context it was sampled with (rejected).",
)
@click.option("--rank", type=int, default=None, help="LoRA rank (default: 8).")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: 16).")
@click.option(
    "--targets",
    callback=_targets,
    default=None,
    help="LoRA targets, comma-separated from q,k,v,o,gate,up,down (default: all).",
)
@click.option("--batch-size", type=int, default=None, help="Pairs per micro-batch (default: 1).")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step (default: 4).")
@click.option(
    "--max-len",
    type=int,
    default=None,
    help="Prompt + response tokens; longer responses are cut (default: 512).",
)
@click.option(
    "--ref",
    type=click.Choice(["cached", "llama.cpp"]),
    default=None,
    help="Reference log-probs: by the backend with the adapter off (exact), or llama.cpp.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default=None,
    help="torch compute precision (auto: bf16 where fast).",
)
@click.option("--threads", type=int, default=None, help="CPU threads for training.")
@click.option(
    "--grad-checkpointing/--no-grad-checkpointing",
    default=None,
    help="Recompute activations in the backward pass: less memory, about a third more time (default: off).",
)
@click.option(
    "--checkpoint-every", type=int, default=None, help="Optimizer steps between checkpoints (default: 10)."
)
@click.option(
    "--eval-every", type=int, default=None, help="Optimizer steps between held-out evaluations (default: 10)."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the named run (or the latest) from its last checkpoint, with the run's own settings.",
)
@click.option("--run", "run_name", default=None, help="Run name (default: run-N).")
@click.option(
    "--from-run",
    "from_run",
    default=None,
    metavar="RUN",
    help="The next self-improvement round: train on the pairs RUN's model sampled (`pairs --from-run RUN`).",
)
@click.option(
    "--round-init",
    type=click.Choice(ROUND_INITS),
    default=None,
    help="With --from-run: continue RUN's LoRA or start a fresh one (default: continue).",
)
@click.option(
    "--round-ref",
    type=click.Choice(ROUND_REFS),
    default=None,
    help="With --from-run: DPO's reference is the base model or RUN's model (default: base).",
)
@click.option(
    "--user-weight",
    type=float,
    default=None,
    metavar="W",
    help="Weight of each pair you made (`feedback list`) on the loss, MIPO's pairs weighing 1; 0 leaves "
    "them out (default: 2). They are never held out, and when few each is repeated every epoch until "
    "they make 1/8 of its pairs, at most 8 times.",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed for LoRA init, data order and the held-out split (default: 0).",
)
@click.pass_context
def train(ctx: click.Context, resume: bool, run_name: str | None, **options) -> None:
    """Fine-tune the base model on your pairs with LoRA DPO. Resumable with --resume."""
    ws = open_workspace(ctx)
    settings = with_overrides(TrainSettings(), **options)
    summary = drive(train_job(ws, settings, run_name=run_name, resume=resume))
    final = summary.final
    held = (
        f"held-out accuracy {final['accuracy']:.2f}, margin {final['margin']:.3f}"
        if final
        else "no held-out pairs"
    )
    click.echo(
        f"Run '{summary.run}' finished: {summary.steps} steps on {summary.train_pairs} pairs, {held} ({summary.seconds:.0f} s)."
    )
    click.echo("Next: mipo-local export")


@click.group()
def runs() -> None:
    """Training runs in this workspace."""


@runs.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """List runs with their status and final held-out metrics."""
    rows = []
    for r in run_store.list_runs(open_workspace(ctx)):
        final = (r.summary or {}).get("final") or {}
        acc = f"{final['accuracy']:.2f}" if "accuracy" in final else ""
        rows.append(
            [r.name, r.status, str(r.round), r.backend or "", str((r.summary or {}).get("steps", "")), acc]
        )
    if not rows:
        click.echo("No runs yet. Train one: mipo-local train")
        return
    table(rows, ["name", "status", "round", "backend", "steps", "heldout acc"])


@runs.command()
@click.argument("name")
@click.pass_context
def show(ctx: click.Context, name: str) -> None:
    """Show a run's settings and its logged metrics."""
    ws = open_workspace(ctx)
    run = run_store.require_run(ws, name)
    click.echo(f"Run {run.name}: {run.status}, backend {run.backend}, {run.describe_round()}")
    summary = run.summary or {}
    if summary:
        mine = summary.get("user_pairs", 0)
        yours = (
            f"; {mine} of them yours (weight {run.settings.get('user_weight', 1.0):g}, each seen "
            f"{summary.get('user_repeats', 1)}x an epoch)"
            if mine
            else "; none of them yours"
        )
        click.echo(
            f"Trained on {summary.get('train_pairs', 0)} pairs ({summary.get('heldout_pairs', 0)} held out){yours}."
        )
    click.echo("Settings: " + ", ".join(f"{k}={v}" for k, v in run.settings.items()))
    for line in run_store.read_log(ws, run.id):
        if line["kind"] in ("train", "eval"):
            speed = f"  {line['pairs_per_s']:.2f} pairs/s" if "pairs_per_s" in line else ""
            click.echo(
                f"  {line['kind']:5} step {line['step']:4}  loss {line.get('loss', float('nan')):.4f}  "
                f"acc {line.get('accuracy', 0):.2f}  margin {line.get('margin', 0):+.3f}{speed}"
            )
        elif "ref_mean_abs_diff" in line:
            a, b = line["ref_compared_sources"]
            click.echo(
                f"  reference log-probs: {a} vs {b} differ by {line['ref_mean_abs_diff']:.4f} nats on average "
                f"({line['ref_compared_pairs']} pairs)"
            )


def register(cli: click.Group) -> None:
    cli.add_command(train)
    cli.add_command(runs)
