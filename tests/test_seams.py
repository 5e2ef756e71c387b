"""The package's one-way seams, read from its own source: the MLX backend never imports the torch backend,
the adapter format never imports the training package, and training never imports the export side."""

import ast
from pathlib import Path

import pytest

import mipo_local

PACKAGE = Path(mipo_local.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (at any depth, lazy imports included), as absolute mipo_local names."""
    own = "mipo_local." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = own.split(".")[: -node.level] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return names


def modules(pattern: str) -> list[Path]:
    return sorted(PACKAGE.glob(pattern))


SEAMS = [
    ("train/mlx_*.py", ("mipo_local.train.torch_", "torch")),
    ("adapter_*.py", ("mipo_local.train",)),
    (
        "train/*.py",
        ("mipo_local.fidelity", "mipo_local.export", "mipo_local.merge", "mipo_local.cli", "mipo_local.tui"),
    ),
]


@pytest.mark.parametrize(("pattern", "forbidden"), SEAMS, ids=[s[0] for s in SEAMS])
def test_a_seam_is_crossed_one_way_only(pattern, forbidden):
    found = modules(pattern)
    assert found, pattern
    crossing = {
        f"{p.relative_to(PACKAGE)} imports {name}"
        for p in found
        for name in imported_modules(p)
        if any(
            name == f or name.startswith(f + ".") or name.startswith(f) and f.endswith("_") for f in forbidden
        )
    }
    assert crossing == set()


def test_the_import_reader_sees_lazy_and_relative_imports():
    """The check above can fail: a module that crosses a seam inside a function is caught."""
    probe = PACKAGE / "train" / "mlx_backend.py"
    names = imported_modules(probe)
    assert "mipo_local.gguf_io.gguf_permute_rows" in names and "mlx.core" in names
    loop = imported_modules(PACKAGE / "train" / "loop.py")
    assert "mipo_local.train.reference.policy_logps_llama_cpp" in loop  # relative, from a sibling
    assert "mipo_local.adapter_io.load_adapter" in loop  # imported inside a function
