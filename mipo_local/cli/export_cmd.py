"""`mipo-local export` and `mipo-local exports list`."""

from __future__ import annotations

import click

from .. import fidelity
from ..settings import QUANT_TYPES, ExportSettings, with_overrides
from .common import drive, open_workspace


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.command()
@click.option("--run", "run_name", default=None, help="The run to export (default: the latest finished run).")
@click.option(
    "--quant",
    type=click.Choice(QUANT_TYPES, case_sensitive=False),
    default=None,
    help="Quantization of the merged model (default: auto = Q8_0 under 1B parameters, Q4_K_M above).",
)
@click.option(
    "--adapter-only", is_flag=True, help="Write a GGUF LoRA adapter (a few MB) instead of a merged model."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: <workspace>/exports/RUN-QUANT).",
)
@click.option(
    "--ollama",
    "ollama_name",
    default=None,
    metavar="NAME",
    help="Also add the model to Ollama as NAME (prints the command when Ollama is not installed).",
)
@click.option("--no-system", is_flag=True, help="Leave your contexts out of the Modelfile's SYSTEM prompt.")
@click.option("--no-verify", is_flag=True, help="Skip the fidelity check on the held-out pairs.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--threads", type=int, default=None, help="llama.cpp threads for quantizing and verifying.")
@click.pass_context
def export(
    ctx: click.Context,
    run_name: str | None,
    quant: str | None,
    adapter_only: bool,
    out_dir: str | None,
    ollama_name: str | None,
    no_system: bool,
    no_verify: bool,
    force: bool,
    threads: int | None,
) -> None:
    """Export a trained run as a quantized GGUF (or a LoRA adapter) with an Ollama Modelfile."""
    from ..export import export as export_job  # keeps `mipo-local --help` free of numpy/gguf imports

    ws = open_workspace(ctx)
    settings = with_overrides(
        ExportSettings(),
        quant=quant.lower() if quant else None,
        adapter_only=True if adapter_only else None,
        system_from_contexts=False if no_system else None,
        verify=False if no_verify else None,
        threads=threads,
    )
    result = drive(export_job(ws, run_name, settings, out_dir, ollama_name, force))
    what = "an adapter" if result.kind == "adapter" else f"a {result.quant.upper()} model"
    click.echo(
        f"Exported run '{result.run}' as {what}: {result.path} ({_mb(result.files[result.path.name])})."
    )
    if result.modelfile:
        click.echo(f"Modelfile: {result.modelfile}")
    if result.fidelity:
        click.echo(fidelity.describe(result.fidelity))
    click.echo(f"Took {result.timings['total_s']:.1f} s.")


@click.group()
def exports() -> None:
    """Exported models and adapters in this workspace."""


@exports.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """List every export with its quant, size, fidelity and paths."""
    from ..export import list_exports

    rows = list_exports(open_workspace(ctx))
    if not rows:
        click.echo("No exports yet. Export the latest run: mipo-local export")
        return
    # Paths are printed whole (a table would cut them): the file on the row, the Modelfile below it.
    click.echo(f"{'id':>3}  {'run':14} {'kind':8} {'quant':6} {'size':>9}  {'fidelity':>8}  path")
    for e in rows:
        fid = e.info.get("fidelity")
        fid_text = (
            "-"
            if not fid
            else "n/a"
            if fid["sign_agreement"] is None
            else f"{100 * fid['sign_agreement']:.1f}%"
        )
        quant = (e.quant or "-").upper()
        click.echo(
            f"{e.id:>3}  {e.run or '-':14} {e.kind:8} {quant:6} {_mb(e.size):>9}  {fid_text:>8}  {e.path}"
        )
        if e.info.get("modelfile"):
            click.echo(f"{'':>3}  {'':14} {'':8} {'':6} {'':>9}  {'':>8}  {e.info['modelfile']}")


def register(cli: click.Group) -> None:
    cli.add_command(export)
    cli.add_command(exports)
