"""`mipo-local prompts add|import|list|rm` (`prompts synth` is added by the pairs module)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserInputError
from ..prompts_import import IMPORT_LIMIT, parse_prompts
from ..validation import ID_MAX
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
@click.option(
    "--limit",
    type=click.IntRange(1, 1_000_000),
    default=IMPORT_LIMIT,
    show_default=True,
    help="Refuse a file with more prompts than this (nothing is imported then).",
)
@click.pass_context
def import_prompts(ctx: click.Context, file: Path, limit: int) -> None:
    """Import prompts from FILE: plain text (one per line), a Markdown list, JSONL with a `prompt` field,
    or a ChatGPT `conversations.json` export (its user turns). All or nothing; undo with
    `prompts rm --source import`."""
    texts, fmt = parse_prompts(file, limit)
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
@click.argument("ids", nargs=-1, metavar="[ID | FIRST-LAST]...")
@click.option(
    "--source",
    type=click.Choice(["user", "import", "synthetic"]),
    default=None,
    help="Delete every prompt of this origin (e.g. undo an import).",
)
@click.pass_context
def rm(ctx: click.Context, ids: tuple[str, ...], source: str | None) -> None:
    """Delete prompts: by id (`rm 4`), by range (`rm 10-200`) or by origin (`rm --source import`)."""
    if not ids and source is None:
        raise UserInputError("Say which prompts to delete: ids, a range FIRST-LAST, or --source.")
    ws = open_workspace(ctx)
    if source is not None:
        if ids:
            raise UserInputError("Give ids or --source, not both.")
        n = ws.remove_prompts([p.id for p in ws.prompts(source)])
    else:
        single, ranges = _parse_ids(ids)
        n = ws.remove_prompts(single, ranges=ranges)
    click.echo(f"Removed {n} prompt{'s' if n != 1 else ''}.")


def _parse_ids(ids: tuple[str, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    single, ranges = [], []
    for text in ids:
        first, dash, last = text.partition("-")
        try:
            numbers = [int(first), int(last)] if dash else [int(first)]
        except ValueError:
            raise UserInputError(f"'{text}' is not a prompt id or a range FIRST-LAST.") from None
        if not all(1 <= n <= ID_MAX for n in numbers) or (dash and numbers[0] > numbers[1]):
            raise UserInputError(f"'{text}' is not a valid id or range (ids start at 1, FIRST <= LAST).")
        if dash:
            ranges.append((numbers[0], numbers[1]))
        else:
            single.append(numbers[0])
    return single, ranges


def register(cli: click.Group) -> None:
    cli.add_command(prompts)
