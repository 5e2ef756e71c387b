"""`mipo-local pairs ...` (MIPO pair generation and the pairs store) and `mipo-local prompts synth`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import pairs as mipo_pairs
from .. import pairs_store, user_pairs
from ..errors import UserInputError
from ..prompts_import import read_text_file
from ..settings import NEGATIVE_STRATEGIES, PairSettings, with_overrides
from ..synth import synthesize_prompts
from .common import ID, drive, open_workspace, table


@click.group(invoke_without_command=True)
@click.option(
    "--strategy",
    type=click.Choice(NEGATIVE_STRATEGIES),
    default=None,
    help="How the negative is sampled (default: random-context).",
)
@click.option("--per-prompt", type=int, default=None, help="Pairs per prompt and context (default: 2).")
@click.option(
    "--candidates",
    type=int,
    default=None,
    help="Answers sampled per side; the best-PMI positive and worst negative are kept (default: 1).",
)
@click.option(
    "--guidance",
    type=float,
    default=None,
    help="Context-contrastive sampling strength g: y+ ~ p(y|c,x)[p(y|c,x)/p(y|c',x)]^g (0: plain sampling).",
)
@click.option(
    "--temperature", type=float, default=None, help="Sampling temperature (default: 0.1, as in the paper)."
)
@click.option("--top-p", type=float, default=None, help="Nucleus sampling (default: 0.9).")
@click.option("--max-tokens", type=int, default=None, help="Longest answer in tokens (default: 128).")
@click.option("--seed", type=int, default=None, help="Seed: the same seed gives the same pairs (default: 0).")
@click.option(
    "--score/--no-score",
    default=None,
    help="Score each pair's pointwise mutual information under the base (default: on).",
)
@click.option(
    "--min-pmi",
    type=float,
    default=None,
    help="Drop pairs whose PMI margin (chosen minus rejected) is below this.",
)
@click.option(
    "--repeat-penalty",
    type=float,
    default=None,
    help="llama.cpp's repetition penalty while sampling both answers (default: 1.1; 1 is none).",
)
@click.option(
    "--context-turn",
    type=click.Choice(["user", "system"]),
    default=None,
    help="Where the contexts sit while the answers are sampled: at the head of the question (user, the "
    "default) or as the system turn. Training always puts your context in the system turn.",
)
@click.option(
    "--from-run",
    "from_run",
    default=None,
    metavar="RUN",
    help="The next self-improvement round: sample from RUN's model (the base + RUN's LoRA, in llama.cpp).",
)
@click.pass_context
def pairs(ctx: click.Context, from_run: str | None, **options) -> None:
    """Generate MIPO preference pairs: y+ with your context, y- with an unrelated one.

    Resumable: run it again after Ctrl-C (or a crash) and it continues where it stopped.
    """
    if ctx.invoked_subcommand is not None:
        return
    ws = open_workspace(ctx)
    settings = with_overrides(PairSettings(), **options)
    summary = drive(mipo_pairs.generate_pairs(ws, settings, from_run=from_run))
    click.echo(mipo_pairs.describe(summary) + f"; {ws.count('pairs')} pairs in the workspace.")


@pairs.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """List all pairs: id, source (user, generated, import), strategy, PMI margin, prompt and the start of
    the chosen answer."""
    rows = []
    for p in pairs_store.list_pairs(open_workspace(ctx)):
        margin = "" if p.pmi_margin is None else f"{p.pmi_margin:+.2f}"
        rows.append([str(p.id), p.source, p.strategy, margin, p.prompt, p.chosen])
    table(
        rows,
        ["id", "source", "strategy", "pmi", "prompt", "chosen"],
        empty="No pairs yet. Generate them: mipo-local pairs",
    )


@pairs.command()
@click.argument("pair_id", type=ID)
@click.pass_context
def show(ctx: click.Context, pair_id: int) -> None:
    """Show one pair: prompt, contexts, chosen and rejected, scores."""
    p = pairs_store.get_pair(open_workspace(ctx), pair_id)
    yours = f", yours from {p.origin or 'an import'}" if p.source == user_pairs.USER else ""
    click.echo(f"Pair {p.id} ({p.strategy}, seed {p.seed}{yours})")
    click.echo(f"Context:  {p.context}")
    if p.neg_context:
        click.echo(f"Negative context: {p.neg_context}")
    if p.neg_prompt:
        click.echo(f"Negative prompt:  {p.neg_prompt}")
    click.echo(f"Prompt:   {p.prompt}\n\n--- chosen ---\n{p.chosen}\n\n--- rejected ---\n{p.rejected}\n")
    if p.scores:
        click.echo("Scores:   " + json.dumps(p.scores, indent=None))


@pairs.command()
@click.argument("pair_id", type=ID)
@click.pass_context
def rm(ctx: click.Context, pair_id: int) -> None:
    """Delete pair PAIR_ID (the ids are in `mipo-local pairs list`)."""
    pairs_store.remove_pair(open_workspace(ctx), pair_id)
    click.echo(f"Removed pair {pair_id}.")


@pairs.command()
@click.argument("pair_id", type=ID)
@click.option("--keep", "action", flag_value="keep", help="Keep the pair as it is, as one of yours.")
@click.option("--drop", "action", flag_value="drop", help="Delete the pair; `pairs` never samples it again.")
@click.option("--swap", "action", flag_value="swap", help="Exchange chosen and rejected.")
@click.option("--chosen", "chosen", default=None, metavar="TEXT", help="Replace the chosen answer with TEXT.")
@click.option(
    "--chosen-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="F",
    help="Replace the chosen answer with the text of file F.",
)
@click.pass_context
def review(
    ctx: click.Context, pair_id: int, action: str | None, chosen: str | None, chosen_file: Path | None
) -> None:
    """Review pair PAIR_ID: keep, drop, swap, or give a better chosen answer. A kept, swapped or edited
    pair becomes yours (source user): training weighs it with --user-weight, and `pairs regenerate` or a
    rerun of `pairs` never overwrites it."""
    given = [a for a in (action, chosen is not None and "edit", chosen_file is not None and "edit") if a]
    if len(given) != 1:
        raise UserInputError("Give exactly one of --keep, --drop, --swap, --chosen or --chosen-file.")
    if chosen_file is not None:
        chosen = read_text_file(chosen_file)
    ws = open_workspace(ctx)
    pair = user_pairs.review_pair(ws, pair_id, given[0], chosen)
    done = {"keep": "Kept", "swap": "Swapped chosen and rejected of", "edit": "Rewrote the chosen answer of"}
    if pair is None:
        click.echo(f"Dropped pair {pair_id}; `mipo-local pairs` will not sample it again.")
    else:
        click.echo(f"{done[given[0]]} pair {pair_id}; it is yours now (source user).")


@pairs.command()
@click.argument("pair_id", type=ID)
@click.option("--seed", type=int, default=None, help="Sampling seed (default: a fresh random one).")
@click.pass_context
def regenerate(ctx: click.Context, pair_id: int, seed: int | None) -> None:
    """Sample pair PAIR_ID again with a fresh seed: same prompt, contexts and settings, new answers."""
    ws = open_workspace(ctx)
    used = drive(mipo_pairs.regenerate_pair(ws, pair_id, seed))
    p = pairs_store.get_pair(ws, pair_id)
    margin = "" if p.pmi_margin is None else f", PMI margin {p.pmi_margin:+.3f}"
    click.echo(
        f"Regenerated pair {pair_id} with seed {used}{margin}. See it: mipo-local pairs show {pair_id}"
    )


@pairs.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def export_cmd(ctx: click.Context, file: Path) -> None:
    """Write all pairs to FILE as JSONL (prompt/chosen/rejected + messages; works in TRL and mlx-lm-lora)."""
    n = pairs_store.export_jsonl(open_workspace(ctx), file)
    click.echo(f"Wrote {n} pairs to {file}.")


@pairs.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def import_cmd(ctx: click.Context, file: Path) -> None:
    """Import pairs from a JSONL FILE (prompt/chosen/rejected, optional system). All or nothing."""
    added, present = pairs_store.import_jsonl(open_workspace(ctx), file)
    click.echo(f"Imported {added} pairs ({present} already present).")


@click.command()
@click.option("--n", "n", type=int, default=None, help="How many prompts to add (default: 16).")
@click.option(
    "--seed", type=int, default=None, help="Sampling seed (default: 0; reruns continue with new samples)."
)
@click.pass_context
def synth(ctx: click.Context, n: int | None, seed: int | None) -> None:
    """Let the base model propose N questions a person with your contexts would ask."""
    ws = open_workspace(ctx)
    added = drive(synthesize_prompts(ws, n, seed=seed))
    click.echo(f"Added {added} synthetic prompts.")


def register(cli: click.Group) -> None:
    cli.add_command(pairs)
    cli.commands["prompts"].add_command(synth)
