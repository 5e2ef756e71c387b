"""`mipo-local init` and `mipo-local status`."""

from __future__ import annotations

import click

from .. import modelsource, user_pairs
from ..workspace import Workspace, resolve_workspace_dir
from .common import open_workspace


@click.command()
@click.option(
    "--model",
    "-m",
    "spec",
    default=None,
    help="Base model: 'default' (embedded SmolLM2-135M-Instruct), a catalog id, a .gguf path, "
    "ollama:NAME[:TAG] or hf:OWNER/REPO/FILE.gguf. Default: keep the current one, else 'default'.",
)
@click.pass_context
def init(ctx: click.Context, spec: str | None) -> None:
    """Create the workspace (or switch its base model) and prepare the model."""
    root = resolve_workspace_dir((ctx.find_root().obj or {}).get("workspace"))
    existed = (root / "mipo.db").exists()
    if spec is None and existed:
        ws = Workspace.open(root)
        current = ws.get_config(modelsource.CONFIG_KEY)
        spec = current["spec"] if current else None
    # Validate the model before creating anything, so a bad spec leaves no half-made workspace behind.
    modelsource.check_model(spec)
    ws = Workspace.open(root, create=True)
    model = modelsource.set_base_model(ws, spec)
    click.echo(f"Workspace: {ws.root}{'' if existed else ' (created)'}")
    click.echo(
        f"Base model: {model.name} [{model.architecture}, {model.n_params / 1e6:.0f}M params] ready at {model.path}"
    )
    click.echo(
        'Next: `mipo-local context add "..."` then `mipo-local prompts add "..."` (or run `mipo-local`).'
    )


@click.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the workspace, its base model, counts and the latest run and export."""
    ws = open_workspace(ctx)
    click.echo(f"Workspace:  {ws.root}")
    raw = ws.get_config(modelsource.CONFIG_KEY)
    if raw is None:
        click.echo("Base model: none (run `mipo-local init`)")
    else:
        model = modelsource.BaseModel(**raw)
        state = "ready" if model.file.is_file() else "MISSING (run `mipo-local init`)"
        click.echo(
            f"Base model: {model.name} [{model.architecture}, {model.n_params / 1e6:.0f}M params] {state}"
        )
        click.echo(f"            {model.path}")
    n_syn = len(ws.prompts(source="synthetic"))
    click.echo(f"Contexts:   {ws.count('contexts')}")
    click.echo(f"Prompts:    {ws.count('prompts')} ({n_syn} synthetic)")
    click.echo(f"Pairs:      {ws.count('pairs')} ({user_pairs.count_user_pairs(ws)} yours)")
    run = ws.query("SELECT name, status, updated_at FROM runs ORDER BY updated_at DESC LIMIT 1")
    click.echo(f"Latest run: {run[0]['name']} ({run[0]['status']})" if run else "Latest run: none")
    exp = ws.query("SELECT id, kind, quant, path FROM exports ORDER BY id DESC LIMIT 1")
    if exp:
        e = exp[0]
        click.echo(f"Latest export: #{e['id']} {e['kind']} {e['quant'] or ''} {e['path']}")
    else:
        click.echo("Latest export: none")
    for job in ws.running_jobs():
        click.echo(f"Running job: {job['kind']} (process {job['pid']}): {job['description']}")


def register(cli: click.Group) -> None:
    cli.add_command(init)
    cli.add_command(status)
