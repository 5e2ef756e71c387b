"""`mipo-local run`: synth prompts, pairs, train, export, eval in one resumable command."""

from __future__ import annotations

import click

from ..pipeline import DEFAULT_ROUNDS, run_pipeline
from ..settings import EvalSettings, PairSettings, with_overrides
from .common import drive, open_workspace


@click.command("run")
@click.option(
    "--prompts",
    "n_prompts",
    type=int,
    default=32,
    show_default=True,
    help="Synthesize prompts until there are this many.",
)
@click.option(
    "--max-tokens",
    type=int,
    default=None,
    help="Longest answer in tokens, for the pairs and the evaluation (default: 128 for the pairs, 192 for the evaluation).",
)
@click.option(
    "--rounds",
    type=int,
    default=DEFAULT_ROUNDS,
    show_default=True,
    help="Self-improvement rounds: each samples new pairs from the previous round's model and trains on them.",
)
@click.pass_context
def run_cmd(ctx: click.Context, n_prompts: int, max_tokens: int | None, rounds: int) -> None:
    """Run the whole pipeline with good defaults. Rerun it to resume after an interruption."""
    ws = open_workspace(ctx)
    pairs = with_overrides(PairSettings(), max_tokens=max_tokens)
    evaluation = with_overrides(EvalSettings(), max_tokens=max_tokens)
    result = drive(run_pipeline(ws, n_prompts=n_prompts, pairs=pairs, evaluation=evaluation, rounds=rounds))
    click.echo("Stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()))
    r = result.eval_report
    if r is not None:
        click.echo(
            f"Held-out pair accuracy {r.pair_accuracy:.2f}; context sensitivity {r.base.pmi:+.2f} -> {r.personalized.pmi:+.2f} nats; "
            f"drift {r.drift * 100:+.2f}%."
        )
    click.echo("Chat with it: mipo-local chat   |   see `mipo-local exports list` for the files.")


def register(cli: click.Group) -> None:
    cli.add_command(run_cmd)
