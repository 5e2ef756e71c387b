"""The foundation commands, run for real through the CLI entry point."""

import os
import shutil
import stat
import subprocess
import sys

from tests.clihelp import run_cli
from tests.test_modelsource import _fake_ollama


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


def test_models_list_info_and_every_model_source_through_the_cli(ws_dir, tiny_gguf, tmp_path, monkeypatch):
    """`models list|info|pull` and `init --model` with a local path, an Ollama name and an HF cache file."""
    r = run_cli("models", "list")
    assert r.exit_code == 0, r.output
    for model_id in ("smollm2-135m *", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama3.2-1b"):
        assert model_id in r.stdout
    r = run_cli("models", "info", str(tiny_gguf))
    assert r.exit_code == 0 and "llama (supported: yes)" in r.stdout and "Chat template: yes" in r.stdout
    # A fake Ollama store and a fake Hugging Face cache, both holding the tiny model.
    ollama = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    blob = _fake_ollama(ollama, "tiny", "1b", tiny_gguf.read_bytes())
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    snap = hub / "models--someone--tiny-GGUF" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    shutil.copy(tiny_gguf, snap / "tiny.gguf")
    (hub / "models--someone--tiny-GGUF" / "refs").mkdir()
    (hub / "models--someone--tiny-GGUF" / "refs" / "main").write_text("a" * 40)
    r = run_cli("models", "pull", "someone/tiny-GGUF", "--file", "tiny.gguf")  # cached: HF_HUB_OFFLINE is set
    assert r.exit_code == 0 and f"Downloaded to {snap / 'tiny.gguf'}" in r.stdout, r.output
    for spec, path in (("ollama:tiny:1b", blob), ("hf:someone/tiny-GGUF/tiny.gguf", snap / "tiny.gguf")):
        r = run_cli("init", "--model", spec)
        assert r.exit_code == 0 and f"ready at {path}" in r.stdout, r.output
        assert "ready" in run_cli("status").stdout


def test_context_from_a_file_with_a_label_and_context_list(ws_dir, tiny_gguf, tmp_path):
    _init_tiny(tiny_gguf)
    f = tmp_path / "me.txt"
    f.write_text("I am Ana, a vegan chef in Lisbon.\nKeep answers short.\n", encoding="utf-8")
    r = run_cli("context", "add", "--file", str(f), "--label", "me")
    assert r.exit_code == 0 and "Added context 1." in r.stdout
    r = run_cli("context", "list")
    assert r.stdout.splitlines()[0].split() == ["id", "label", "text"]
    assert "me" in r.stdout and "I am Ana, a vegan chef in Lisbon. Keep answers short." in r.stdout


def test_status_shows_the_latest_run_and_export(ws_dir, tiny_gguf):
    from mipo_local.workspace import Workspace
    from tests import exporthelp

    _init_tiny(tiny_gguf)
    assert "Latest run: none" in run_cli("status").stdout
    exporthelp.make_finished_run(Workspace.open(ws_dir), "run-1", n_pairs=2)
    assert run_cli("export", "--adapter-only", "--no-verify").exit_code == 0
    r = run_cli("status")
    assert "Pairs:      2" in r.stdout and "Latest run: run-1 (finished)" in r.stdout
    assert "Latest export: #1 adapter" in r.stdout


def test_models_pull_without_a_network_is_one_sentence_and_changes_nothing(ws_dir, tiny_gguf, monkeypatch):
    """HF_HUB_OFFLINE unset and every socket refused: the download is really tried and fails in one line."""
    import socket
    import time

    import huggingface_hub.constants

    from mipo_local import modelsource
    from tests.faulthelp import checksum

    _init_tiny(tiny_gguf)
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network blocked in this test: {address}")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(host))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(address))
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retry back-off
    cache = modelsource.hf_hub_cache()
    before = checksum(ws_dir), checksum(cache)
    r = run_cli("models", "pull", "someone/repo", "--file", "m.gguf")
    assert attempts, "the download was not attempted"
    assert r.exit_code != 0 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (
        "Error: Cannot download someone/repo/m.gguf: the Hugging Face Hub cannot be reached and it is not "
        "in the local cache.\n"
    )
    assert (checksum(ws_dir), checksum(cache)) == before
