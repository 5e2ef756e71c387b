"""`mipo-local feedback list|rm`: the pairs the user made (reviewed pairs, chat thumbs, blind A/B picks)."""

from __future__ import annotations

import click

from .. import user_pairs
from .common import ID, open_workspace, table


@click.group()
def feedback() -> None:
    """Your own choices as pairs: reviewed pairs (`pairs review`), /good, /bad and /better in chat, and
    picks in the app's blind A/B. Training includes them by default (see `train --user-weight`)."""


@feedback.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """List your pairs: id, where you made them, prompt, chosen and rejected answers."""
    rows = [
        [str(p.id), p.origin or "", p.prompt, p.chosen, p.rejected]
        for p in user_pairs.list_user_pairs(open_workspace(ctx))
    ]
    hint = "No pairs of yours yet: review one (mipo-local pairs review ID --keep) or use /good in chat."
    table(rows, ["id", "from", "prompt", "chosen", "rejected"], empty=hint)


@feedback.command()
@click.argument("pair_id", type=ID)
@click.pass_context
def rm(ctx: click.Context, pair_id: int) -> None:
    """Delete your pair PAIR_ID (the ids are in `mipo-local feedback list`)."""
    user_pairs.remove_user_pair(open_workspace(ctx), pair_id)
    click.echo(f"Removed your pair {pair_id}.")


def register(cli: click.Group) -> None:
    cli.add_command(feedback)
