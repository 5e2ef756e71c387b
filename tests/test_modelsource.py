import hashlib
import json
import shutil

import pytest

from mipo_local import catalog, modelsource
from mipo_local.errors import ModelError, NetworkError, UserInputError


def _fake_ollama(root, name, tag, blob_bytes):
    digest = hashlib.sha256(blob_bytes).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(blob_bytes)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "layers": [
                    {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00"},
                ],
            }
        )
    )
    return root / "blobs" / f"sha256-{digest}"


def test_ollama_name_resolves_to_blob(tmp_path, monkeypatch, tiny_gguf):
    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    blob = _fake_ollama(root, "tiny", "1b", tiny_gguf.read_bytes())
    assert modelsource.resolve("ollama:tiny:1b") == blob
    with pytest.raises(ModelError, match="Ollama has no model 'nope'"):
        modelsource.resolve("ollama:nope")


def test_ollama_broken_manifest(tmp_path, monkeypatch):
    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / "bad" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{not json")
    with pytest.raises(ModelError, match="manifest .* not readable"):
        modelsource.resolve("ollama:bad")


def test_hf_cache_layout_resolves_offline(tmp_path, monkeypatch, tiny_gguf):
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo_dir = hub / "models--someone--tiny-GGUF"
    snap = repo_dir / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    shutil.copy(tiny_gguf, snap / "tiny.gguf")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    assert modelsource.resolve("hf:someone/tiny-GGUF/tiny.gguf") == snap / "tiny.gguf"
    # `models pull` of a cached file works offline; of anything else it says why, in one sentence.
    assert modelsource.pull("someone/tiny-GGUF", "tiny.gguf") == snap / "tiny.gguf"
    with pytest.raises(NetworkError, match="HF_HUB_OFFLINE is set"):
        modelsource.pull("someone/other-GGUF", "x.gguf")
    with pytest.raises(ModelError, match="models pull"):
        modelsource.resolve("hf:someone/other-GGUF/x.gguf")


def test_unknown_spec_lists_forms():
    with pytest.raises(UserInputError, match="catalog id"):
        modelsource.resolve("no-such-model")


def test_catalog_is_valid():
    entries = catalog.load_catalog()
    ids = [e.id for e in entries]
    assert len(ids) == len(set(ids))
    assert sum(e.default for e in entries) == 1
    assert {e.architecture for e in entries} >= {"llama", "qwen2", "gemma3"}
    for e in entries:
        assert e.size_mb > 0 and e.license
        assert e.package if e.source == "pypi" else e.repo, e.id
        if e.chat_template:
            assert "{%" in catalog.builtin_template(e.chat_template)


@pytest.mark.slow
def test_gemma_catalog_model_is_prepared_with_a_template(tmp_path):
    from mipo_local import gguf_io
    from mipo_local.chat import ChatFormat

    path = modelsource.prepare_catalog_entry(catalog.find_entry("gemma3-270m"), tmp_path)
    info = gguf_io.read_info(path)
    assert info.architecture == "gemma3" and info.chat_template
    text = ChatFormat(path).prompt_text("I am Ana.", "Hi?")
    assert text.startswith("<bos><start_of_turn>user\nI am Ana.\n\nHi?<end_of_turn>\n<start_of_turn>model\n")
