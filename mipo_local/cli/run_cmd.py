"""`mipo-local run`: synth prompts, pairs, train, export, eval in one resumable command."""

from __future__ import annotations

import click

from ..pipeline import run_pipeline
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
@click.pass_context
def run_cmd(ctx: click.Context, n_prompts: int) -> None:
    """Run the whole pipeline with good defaults. Rerun it to resume after an interruption."""
    ws = open_workspace(ctx)
    result = drive(run_pipeline(ws, n_prompts=n_prompts))
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
