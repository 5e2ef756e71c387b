"""`mipo-local context add|list|edit|rm`: who you are, what you like, how you want answers."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserInputError
from ..prompts_import import read_text_file
from .common import ID, open_workspace, table


@click.group()
def context() -> None:
    """Your contexts: notes about you that the model learns to use (the system turn during training)."""


@context.command()
@click.argument("text", required=False)
@click.option(
    "--file",
    "-f",
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the context from a UTF-8 text file.",
)
@click.option("--label", default=None, help="A short name for this context (optional).")
@click.pass_context
def add(ctx: click.Context, text: str | None, file: Path | None, label: str | None) -> None:
    """Add a context given as TEXT or with --file."""
    if (text is None) == (file is None):
        raise UserInputError("Give the context as TEXT or with --file FILE (one of the two).")
    if file is not None:
        text = read_text_file(file)
        if not text.strip():
            raise UserInputError(f"{file} is empty: write a few words about yourself in it.")
    ws = open_workspace(ctx)
    c = ws.add_context(text, label)
    click.echo(f"Added context {c.id}.")


@context.command("list")
@click.pass_context
def list_contexts(ctx: click.Context) -> None:
    """List your contexts."""
    ws = open_workspace(ctx)
    rows = [[str(c.id), c.label or "", c.text] for c in ws.contexts()]
    if not rows:
        click.echo('No contexts yet. Add one: mipo-local context add "I am ..."')
        return
    table(rows, ["id", "label", "text"])


@context.command()
@click.argument("context_id", type=ID)
@click.argument("text")
@click.pass_context
def edit(ctx: click.Context, context_id: int, text: str) -> None:
    """Replace the text of context CONTEXT_ID."""
    open_workspace(ctx).update_context(context_id, text)
    click.echo(f"Updated context {context_id}.")


@context.command()
@click.argument("context_id", type=ID)
@click.pass_context
def rm(ctx: click.Context, context_id: int) -> None:
    """Delete context CONTEXT_ID (pairs made from it keep their copy of the text)."""
    open_workspace(ctx).remove_context(context_id)
    click.echo(f"Removed context {context_id}.")


def register(cli: click.Group) -> None:
    cli.add_command(context)
