"""The whole default flow runs with network sockets blocked, and leaves only owner-only files behind."""

import os
import socket
import stat
from pathlib import Path

import pytest

from tests.clihelp import run_cli


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *args, **kwargs):
        if isinstance(address, tuple) or (isinstance(address, str) and not address.startswith("/")):
            attempts.append(address)
            raise OSError(f"network blocked in this test: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, a: refuse(self, a))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


def _ok(*args, input=None):
    r = run_cli(*args, input=input)
    assert r.exit_code == 0, (args, r.output)
    return r


def test_default_flow_offline_and_private(ws_dir, tiny_gguf, no_network):
    _ok("init", "--model", str(tiny_gguf))
    _ok("context", "add", "I am Ana, a pirate fan. Greet me with Ahoy.")
    _ok("prompts", "add", *[f"How do I make dish number {i}?" for i in range(8)])
    run_cli(
        "prompts", "synth", "--n", "2"
    )  # a random model may propose no usable question; it must not reach out
    _ok("pairs", "--max-tokens", "8")
    _ok("train", "--precision", "fp32", "--threads", "1", "--rank", "4", "--alpha", "8", "--max-len", "96")
    _ok("export", "--quant", "q8_0")
    _ok("eval", "--n", "2", "--no-plot")
    _ok("chat", "--max-tokens", "4", input="Hello?\n/quit\n")
    assert no_network == []
    # Only `models pull` may connect, and here it is refused by the blocked socket or by HF_HUB_OFFLINE.
    assert run_cli("models", "pull", "someone/repo", "--file", "x.gguf").exit_code != 0
    # Privacy: the workspace directory tree is 0700 and every file in it is 0600.
    for path in [ws_dir, *ws_dir.rglob("*")]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        else:
            assert mode == 0o600, (path, oct(mode))


def test_no_pickle_loading_in_the_library():
    """Checkpoints and adapters load through safetensors; torch.load is only allowed with weights_only."""
    root = Path(__file__).resolve().parent.parent / "mipo_local"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)
