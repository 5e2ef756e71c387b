"""Run the real CLI in-process (click's runner over the real entry point)."""

from __future__ import annotations

from dataclasses import dataclass

from click.testing import CliRunner

from mipo_local.cli import main as cli_main


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str, input: str | None = None) -> Result:
    """Invoke `mipo-local ARGS` through `main()` so error handling is the real one."""
    runner = CliRunner()
    code_box = {}

    def entry():
        code_box["code"] = cli_main.main(list(args))

    from click import command

    wrapper = command()(entry)
    res = runner.invoke(wrapper, [], input=input, catch_exceptions=False)
    return Result(code_box.get("code", res.exit_code), res.stdout, res.stderr)
