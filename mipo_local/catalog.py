"""The catalog of known base models: `models/catalog.toml`, data not code."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import UserInputError

REQUIRED_FIELDS = ("id", "name", "source", "file", "architecture", "params", "size_mb", "license")
SOURCES = ("pypi", "hf")


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    name: str
    source: str
    file: str
    architecture: str
    params: str
    size_mb: int
    license: str
    package: str | None = None
    repo: str | None = None
    prepare: str = "none"
    chat_template: str | None = None
    default: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def ready_mb(self) -> int:
        """Megabytes the model takes once ready: its file, or the F16 working copy (2 bytes a parameter)."""
        if self.prepare != "f16":
            return self.size_mb
        number, scale = self.params[:-1], {"M": 1e6, "B": 1e9}[self.params[-1].upper()]
        return round(float(number) * scale * 2 / 1e6)


def catalog_path() -> Path:
    """The installed copy (wheel) or, in a source checkout, models/catalog.toml."""
    packaged = Path(str(resources.files("mipo_local").joinpath("data", "catalog.toml")))
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "models" / "catalog.toml"


def load_catalog(path: Path | None = None) -> list[CatalogEntry]:
    path = path or catalog_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserInputError(f"{path}: the model catalog is not valid TOML ({err}).") from err
    entries = []
    known = {f for f in CatalogEntry.__dataclass_fields__ if f != "extra"}
    for i, raw in enumerate(data.get("model", []), start=1):
        missing = [f for f in REQUIRED_FIELDS if f not in raw]
        if missing:
            raise UserInputError(f"{path}: model #{i} lacks the field(s) {', '.join(missing)}.")
        if raw["source"] not in SOURCES:
            raise UserInputError(f"{path}: model '{raw['id']}' has an unknown source '{raw['source']}'.")
        entries.append(
            CatalogEntry(
                **{k: v for k, v in raw.items() if k in known},
                extra={k: v for k, v in raw.items() if k not in known},
            )
        )
    return entries


def find_entry(model_id: str) -> CatalogEntry | None:
    return next((e for e in load_catalog() if e.id == model_id), None)


def default_entry() -> CatalogEntry:
    return next(e for e in load_catalog() if e.default)


def builtin_template(name: str) -> str:
    """A chat template shipped with mipo-local (for base models whose GGUF has none)."""
    path = resources.files("mipo_local").joinpath("data", "templates", f"{name}.jinja")
    return path.read_text(encoding="utf-8")
