"""ExportSummary: where an export's files are, its fidelity result, and the commands that run it."""

from __future__ import annotations

import re
import shlex

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static, TextArea

from mipo_local import fidelity


def ollama_name_for(run: str | None) -> str:
    return "mipo-" + (re.sub(r"[^a-z0-9._-]+", "-", (run or "model").lower()).strip("-.") or "model")


def run_commands(export, base_path: str, ollama_name: str | None = None) -> str:
    """The shell commands that run an export in llama.cpp and in Ollama (paths quoted for the shell)."""
    q = shlex.quote
    lines = ["# llama.cpp"]
    if export.kind == "adapter":
        lines.append(f"llama-cli -m {q(base_path)} --lora {q(export.path)} -cnv")
    else:
        lines.append(f"llama-cli -m {q(export.path)} -cnv")
    modelfile = export.info.get("modelfile")
    if modelfile:
        name = ollama_name or ollama_name_for(export.run)
        lines += ["# Ollama", f"ollama create {name} -f {q(modelfile)}", f"ollama run {name}"]
    return "\n".join(lines)


def fidelity_text(fid: dict | None) -> str:
    text = escape(fidelity.describe(fid))
    return text.replace("BELOW the expected level", "[b red]below the expected level[/]")


class ExportSummary(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="export-facts")
        yield TextArea(id="export-commands", read_only=True, soft_wrap=True)

    def show(self, export, base_path: str, ollama_name: str | None = None) -> None:
        facts = self.query_one("#export-facts", Static)
        commands = self.query_one("#export-commands", TextArea)
        if export is None:
            facts.update("No export yet: choose the options above and press Export (x).")
            commands.text = ""
            return
        what = "GGUF LoRA adapter" if export.kind == "adapter" else f"{(export.quant or '').upper()} model"
        lines = [
            f"[b]Export #{export.id}[/] of run {escape(export.run or '?')}: {what}, {export.size / 1e6:.1f} MB",
            f"File: {escape(export.path)}",
        ]
        if export.info.get("modelfile"):
            lines.append(f"Modelfile: {escape(export.info['modelfile'])}")
        lines.append(fidelity_text(export.info.get("fidelity")))
        lines += [f"[yellow]{escape(w)}[/]" for w in export.info.get("warnings") or []]
        facts.update("\n".join(lines))
        commands.text = run_commands(export, base_path, ollama_name)
