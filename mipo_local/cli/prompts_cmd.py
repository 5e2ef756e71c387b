"""`mipo-local prompts add|import|list|rm` (`prompts synth` is added by the pairs module)."""

from __future__ import annotations

from pathlib import Path

import click

from ..prompts_import import parse_prompts
from .common import open_workspace, table


@click.group()
def prompts() -> None:
    """The questions you tend to ask: the prompts MIPO builds preference pairs from."""


def _report(added: int, duplicates: list[str]) -> None:
    click.echo(f"Added {added} prompt{'s' if added != 1 else ''}.")
    if duplicates:
        click.echo(
            f"Skipped {len(duplicates)} duplicate{'s' if len(duplicates) != 1 else ''} (kept once):", err=True
        )
        for text in duplicates[:10]:
            click.echo(f"  {text[:80]}", err=True)


@prompts.command()
@click.argument("text", nargs=-1, required=True)
@click.pass_context
def add(ctx: click.Context, text: tuple[str, ...]) -> None:
    """Add one or more prompts (each argument is one prompt)."""
    ws = open_workspace(ctx)
    added, dups = ws.add_prompts(list(text))
    _report(len(added), dups)


@prompts.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def import_prompts(ctx: click.Context, file: Path) -> None:
    """Import prompts from FILE: plain text (one per line), a Markdown list, JSONL with a `prompt` field,
    or a ChatGPT `conversations.json` export (its user turns). All or nothing."""
    texts, fmt = parse_prompts(file)
    ws = open_workspace(ctx)
    added, dups = ws.add_prompts(texts, source="import")
    click.echo(f"Read {len(texts)} prompts from {file} ({fmt}).")
    _report(len(added), dups)


@prompts.command("list")
@click.option(
    "--source",
    type=click.Choice(["user", "import", "synthetic"]),
    default=None,
    help="Only prompts of this origin.",
)
@click.pass_context
def list_prompts(ctx: click.Context, source: str | None) -> None:
    """List prompts."""
    ws = open_workspace(ctx)
    rows = [[str(p.id), p.source, p.text] for p in ws.prompts(source)]
    if not rows:
        click.echo(
            'No prompts yet. Add some: mipo-local prompts add "..." or mipo-local prompts synth --n 16'
        )
        return
    table(rows, ["id", "source", "prompt"])


@prompts.command()
@click.argument("prompt_id", type=int)
@click.pass_context
def rm(ctx: click.Context, prompt_id: int) -> None:
    """Delete prompt PROMPT_ID."""
    open_workspace(ctx).remove_prompt(prompt_id)
    click.echo(f"Removed prompt {prompt_id}.")


def register(cli: click.Group) -> None:
    cli.add_command(prompts)
