"""The foundation commands, run for real through the CLI entry point."""

import os
import stat
import subprocess
import sys

from tests.clihelp import run_cli


def _init_tiny(tiny_gguf):
    r = run_cli("init", "--model", str(tiny_gguf))
    assert r.exit_code == 0, r.output
    return r


def test_init_status_and_the_basic_flow(ws_dir, tiny_gguf):
    r = _init_tiny(tiny_gguf)
    assert "(created)" in r.stdout and "llama" in r.stdout
    assert stat.S_IMODE(os.stat(ws_dir).st_mode) == 0o700
    assert run_cli("context", "add", "I am Ana, a vegan chef.").exit_code == 0
    r = run_cli("prompts", "add", "What should I cook?", "Any dessert idea?", "What should I cook?")
    assert r.exit_code == 0 and "Added 2 prompts" in r.stdout and "1 duplicate" in r.stderr
    r = run_cli("status")
    assert "Contexts:   1" in r.stdout and "Prompts:    2" in r.stdout and "ready" in r.stdout
    r = run_cli("prompts", "list")
    assert "Any dessert idea?" in r.stdout
    assert run_cli("prompts", "rm", "1").exit_code == 0
    assert "What should I cook?" not in run_cli("prompts", "list").stdout
    assert run_cli("context", "rm", "1").exit_code == 0


def test_prompts_import_formats_through_cli(ws_dir, tiny_gguf, tmp_path):
    _init_tiny(tiny_gguf)
    f = tmp_path / "q.md"
    f.write_text("- One?\n- Two?\n")
    r = run_cli("prompts", "import", str(f))
    assert r.exit_code == 0 and "(markdown)" in r.stdout and "Added 2 prompts" in r.stdout
    r = run_cli("prompts", "list", "--source", "import")
    assert "One?" in r.stdout


def test_commands_before_init_say_so(ws_dir):
    r = run_cli("status")
    assert r.exit_code != 0 and "mipo-local init" in r.stderr


def test_help_on_every_command():
    from mipo_local.cli.main import cli

    def walk(group, path):
        yield path
        for name, cmd in getattr(group, "commands", {}).items():
            yield from walk(cmd, [*path, name])

    for path in walk(cli, []):
        r = run_cli(*path, "--help")
        assert r.exit_code == 0 and "Usage:" in r.stdout, path
        assert (cli if not path else None) or len(r.stdout.splitlines()) > 3


def test_console_script_and_headless_core():
    code = (
        "import sys, mipo_local, mipo_local.cli.main, mipo_local.workspace, mipo_local.modelsource;"
        "assert 'textual' not in sys.modules, 'textual imported by the core';"
        "assert 'torch' not in sys.modules and 'llama_cpp' not in sys.modules, 'heavy import at startup'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(["mipo-local", "--version"], capture_output=True, text=True, check=True)
    assert "mipo-local" in out.stdout
