"""ModelLine: the workspace's base model in one line."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static

from mipo_local import modelsource


def model_summary(ws) -> str:
    raw = ws.get_config(modelsource.CONFIG_KEY)
    if raw is None:
        return "Base model: none yet"
    model = modelsource.BaseModel(**raw)
    missing = "" if model.file.is_file() else "  [b red]file missing: choose it again[/]"
    return (
        f"Base model: [b]{escape(model.name)}[/] [dim]({model.architecture}, "
        f"{model.n_params / 1e6:.0f}M params)[/]{missing}"
    )


class ModelLine(Static):
    def show(self, ws) -> None:
        self.update(model_summary(ws))
