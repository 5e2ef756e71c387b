"""The export job: a trained run -> a personalized GGUF (or a GGUF LoRA adapter) + an Ollama Modelfile.

merged:  merge LoRA into the base -> F16 GGUF -> llama.cpp quantizer -> Modelfile -> fidelity check
adapter: GGUF LoRA adapter -> Modelfile (FROM base, ADAPTER) -> fidelity check (base + adapter)

Everything is checked first (run, quant, output folder, chat template, free disk), then written into a
private temporary folder beside the output folder, which replaces the output in one rename at the end:
an interrupted export leaves nothing behind, a finished one is complete. The intermediate F16 file of a
quantized export is deleted before the rename. Each export is recorded in the `exports` table.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf

from . import fidelity as fidelity_mod
from . import gguf_io, merge, ollama, quantize
from .adapter_gguf import adapter_bytes, write_adapter_gguf
from .adapter_io import ADAPTER_FILE, AdapterFile, load_adapter
from .errors import ExportError, ModelError, UserInputError
from .fsutil import atomic_dir, require_free_space, require_writable_dir, sha256_file
from .progress import EtaClock, Log, Progress
from .settings import ExportSettings
from .train import runs
from .validation import THREADS_MAX, require_int
from .workspace import Workspace

STAGE = "export"
Events = Generator[Progress | Log, None, Path]


@dataclass
class ExportResult:
    id: int
    run: str
    kind: str  # merged | adapter
    quant: str | None
    directory: Path
    path: Path  # the GGUF a user runs (merged model or adapter)
    size: int  # bytes of all files in the export folder
    files: dict[str, int]
    modelfile: Path | None
    fidelity: dict | None
    timings: dict[str, float]
    ollama: str | None = None  # what happened with --ollama NAME
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """Everything checked before writing a byte."""

    run: runs.Run
    base: Path
    reader: gguf.GGUFReader  # one reader for the whole job: gguf-py takes a while to parse a big vocabulary
    adapter: AdapterFile
    quant: str | None  # None for an adapter export
    out: Path
    stem: str  # file name stem: <model>-<run>
    template: str | None  # the Ollama TEMPLATE, None when the chat template cannot be translated
    turns: ollama.TurnFormat | None
    warnings: list[str]
    modelfile: str | None = None  # the Modelfile's text, written and checked before any heavy work

    @property
    def label(self) -> str:
        return self.quant or "adapter"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "model"


def default_out_dir(ws: Workspace, run_name: str, label: str) -> Path:
    return ws.root / "exports" / f"{run_name}-{label}"


def _recorded(ws, folder: Path) -> bool:
    """Whether an export row points into `folder`."""
    prefix = str(folder) + "/"
    rows = ws.query("SELECT 1 FROM exports WHERE substr(path, 1, ?) = ? LIMIT 1", (len(prefix), prefix))
    return bool(rows)


def occupied_folder(ws: Workspace, run_name: str | None, settings: ExportSettings) -> Path | None:
    """The default folder an export of `run_name` with `settings` writes to, when an earlier export lives
    there (exporting again needs `force`, which replaces it); None when it is free.

    Raises:
        UserInputError / WorkspaceError: as `export` would (no finished run, unknown quant).
    """
    run = runs.require_run(ws, run_name, finished=True)
    base = Path(run.base_model["path"])
    if settings.adapter_only:
        label = "adapter"
    elif base.is_file():
        reader = gguf_io.open_reader(base)
        label = quantize.resolve_quant(settings.quant, sum(int(t.n_elements) for t in reader.tensors))
    else:
        return None  # the export itself says the base model is missing
    out = default_out_dir(ws, run.name, label)
    return out if out.is_dir() and _recorded(ws, out) else None


def _plan(ws, run_name, settings: ExportSettings, out_dir, ollama_name, force) -> _Plan:
    require_int("--threads", settings.threads, 1, THREADS_MAX)
    if ollama_name is not None:
        ollama.check_model_name(ollama_name)
    run = runs.require_run(ws, run_name, finished=True)
    base = Path(run.base_model["path"])
    if not base.is_file():
        raise ModelError(
            f"The base model of run '{run.name}', {base}, is missing; run `mipo-local init` again."
        )
    reader = gguf_io.open_reader(base)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    quant = None if settings.adapter_only else quantize.resolve_quant(settings.quant, n_params)
    adapter = load_adapter(runs.final_dir(ws, run.name) / ADAPTER_FILE)
    out = (
        Path(out_dir).expanduser().resolve() if out_dir else default_out_dir(ws, run.name, quant or "adapter")
    )
    if out.exists() and not out.is_dir():
        raise UserInputError(f"The output path {out} is a file; give a folder path with --out.")
    warnings: list[str] = []
    if out.exists() and not force:
        if out_dir is None and not _recorded(ws, out):
            # The default folder with no export row: an export killed between its final rename and its
            # record left it. Nothing refers to it, so it is replaced rather than blocking every rerun.
            warnings.append(f"Replaced {out}, left by an export that was interrupted before it was recorded.")
        else:
            raise UserInputError(
                f"The output folder {out} already exists.", hint="Pass --force to replace it."
            )

    # The Ollama template comes before any heavy work, so an untranslatable template stops --ollama early.
    template, turns = None, None
    try:
        chat_template, add_bos = ollama.template_from_reader(reader, base)
        template, turns = ollama.translate(chat_template, add_bos=add_bos)
    except ExportError as err:
        if ollama_name:
            raise
        warnings.append(f"No Modelfile written: {err}")

    require_writable_dir(out.parent, "--out")
    if quant is None:
        needed = adapter_bytes(adapter) + (4 << 20)
    else:  # the F16 intermediate and the quantized file exist together for a moment
        needed = merge.merged_f16_bytes(reader) + (16 << 20)
        needed += quantize.estimated_bytes(quant, n_params) if quant != "f16" else 0
    require_free_space(out.parent, needed, f"exporting run '{run.name}'")

    name = run.base_model.get("name") or gguf_io.field_value(reader, gguf.Keys.General.NAME) or base.stem
    stem = f"{_slug(name)}-{_slug(run.name)}"
    plan = _Plan(run, base, reader, adapter, quant, out, stem, template, turns, warnings)
    if template is not None:
        plan.modelfile = _modelfile_text(ws, plan, settings)
    return plan


def main_file_name(plan: _Plan) -> str:
    """The file a user runs: the merged model at its quant, or the adapter."""
    if plan.quant is None:
        return f"{plan.stem}-lora.gguf"
    return f"{plan.stem}-F16.gguf" if plan.quant == "f16" else f"{plan.stem}-{plan.quant.upper()}.gguf"


def _modelfile_text(ws: Workspace, plan: _Plan, settings: ExportSettings) -> str:
    """The Modelfile, with the user's contexts as SYSTEM: checked here, before merging and quantizing.

    Ollama tokenizes the whole rendered prompt with special tokens parsed, so a context holding one of
    the model's special-token strings would turn into that token there (mipo-local keeps it text)."""
    from .chat import chat_format

    contexts = ws.contexts() if settings.system_from_contexts else []
    special = chat_format(str(plan.base)).tokenizer.special_strings
    for c in contexts:
        if '"""' in c.text:
            raise UserInputError(
                f'Context {c.id} contains """, which an Ollama Modelfile cannot hold.',
                hint=f"Edit it (mipo-local context edit {c.id} TEXT) or export with --no-system.",
            )
        found = special(c.text)
        if found:
            raise UserInputError(
                f"Context {c.id} contains {found[0]!r}, a special token of this model, which Ollama would "
                "read as that token rather than as text.",
                hint=f"Edit it (mipo-local context edit {c.id} TEXT) or export with --no-system.",
            )
    main = main_file_name(plan)
    return ollama.modelfile_text(
        from_=str(plan.base) if plan.quant is None else f"./{main}",
        adapter=f"./{main}" if plan.quant is None else None,
        template=plan.template,
        stops=plan.turns.stops,
        system="\n\n".join(c.text for c in contexts) or None,  # the model was trained with them as system
    )


def export(
    ws: Workspace,
    run_name: str | None,
    settings: ExportSettings,
    out_dir: str | Path | None = None,
    ollama_name: str | None = None,
    force: bool = False,
) -> Generator[Progress | Log, None, ExportResult]:
    """The `mipo-local export` job: yields progress, returns what was written.

    Args:
        run_name: the run to export (None: the latest finished run).
        out_dir: the export folder (default: <workspace>/exports/RUN-QUANT); must not exist unless force.
        ollama_name: also `ollama create` this model name (or say the exact command when Ollama is missing).

    Raises:
        UserInputError: unknown run or quant, output folder exists.
        WorkspaceError: no finished run, not enough disk space.
        ExportError: the adapter does not fit the base, quantizing failed, untranslatable template (--ollama).
    """
    started = time.monotonic()
    plan = _plan(ws, run_name, settings, out_dir, ollama_name, force)
    run, warnings, timings = plan.run, plan.warnings, {}
    with ws.job("export", f"mipo-local export {run.name} ({plan.label})"):
        yield Log(STAGE, f"Exporting run '{run.name}' ({plan.label}) to {plan.out}...")
        sha = sha256_file(plan.base)
        if plan.adapter.base_sha256 and plan.adapter.base_sha256 != sha:
            raise ExportError(
                f"The base model {plan.base} changed since run '{run.name}' was trained "
                f"(sha256 {sha[:12]}, trained on {plan.adapter.base_sha256[:12]}); export needs the same file."
            )
        meta = merge.provenance(base_sha256=sha, run_name=run.name, run_settings=run.settings)
        if not plan.out.is_relative_to(ws.root):
            ws.remember_scratch_dir(plan.out.parent)
        with atomic_dir(plan.out) as tmp:
            if plan.quant is None:
                main = yield from _write_adapter(tmp, plan, meta, timings)
            else:
                main = yield from _write_merged(tmp, plan, meta, settings, timings)
            modelfile = _write_modelfile(tmp, plan)
            fid = yield from _verify(ws, plan, main, settings, timings)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        timings["total_s"] = time.monotonic() - started

        for w in warnings:
            yield Log(STAGE, w, "warning")
        modelfile = plan.out / modelfile.name if modelfile else None
        ollama_msg = None
        if ollama_name:
            created, ollama_msg = ollama.create(ollama_name, modelfile)
            yield Log(STAGE, ollama_msg, "info" if created else "warning")
        result = ExportResult(
            id=0, run=run.name, kind="merged" if plan.quant else "adapter", quant=plan.quant,
            directory=plan.out, path=plan.out / main.name, size=sum(files.values()), files=files,
            modelfile=modelfile, fidelity=fid.as_dict() if fid else None, timings=timings,
            ollama=ollama_msg, warnings=warnings,
        )  # fmt: skip
        result.id = _record(ws, run, result, plan.turns.family if plan.turns else None)
        return result


def _write_adapter(tmp: Path, plan: _Plan, meta: dict, timings: dict) -> Events:
    t0 = time.monotonic()
    path = write_adapter_gguf(
        plan.base, tmp / main_file_name(plan), plan.adapter, metadata=meta, reader=plan.reader
    )
    timings["adapter_s"] = time.monotonic() - t0
    yield Progress(STAGE, 1, 1, "adapter written", unit="steps")
    return path


def _write_merged(tmp: Path, plan: _Plan, meta: dict, settings: ExportSettings, timings: dict) -> Events:
    """Merge into F16, then quantize (unless f16); yields progress, returns the final file."""
    quant = plan.quant
    f16 = tmp / (f"{plan.stem}-F16.gguf" if quant == "f16" else f".{plan.stem}-F16.tmp.gguf")
    t0 = time.monotonic()
    n = len(plan.reader.tensors)
    clock = EtaClock(n + (quant != "f16"))
    steps = merge.merge_steps(plan.base, f16, plan.adapter.tensors, metadata=meta, reader=plan.reader)
    for done, total in steps:
        if done == total or done % 8 == 0:
            yield clock.event(STAGE, done, "merging LoRA into F16", unit="tensors")
    timings["merge_f16_s"] = time.monotonic() - t0
    if quant == "f16":
        return f16
    yield Log(STAGE, f"Quantizing to {quant.upper()} with llama.cpp...")
    t0 = time.monotonic()
    target = quantize.quantize(f16, tmp / main_file_name(plan), quant, threads=settings.threads)
    f16.unlink()  # the intermediate F16 is not part of the export
    timings["quantize_s"] = time.monotonic() - t0
    yield clock.event(STAGE, clock.total, f"quantized to {quant.upper()}", unit="tensors")
    return target


def _write_modelfile(tmp: Path, plan: _Plan) -> Path | None:
    return ollama.write_modelfile(tmp, plan.modelfile) if plan.modelfile is not None else None


def _verify(ws: Workspace, plan: _Plan, main: Path, settings: ExportSettings, timings: dict):
    if not settings.verify:
        return None
    yield Log(STAGE, "Checking fidelity on the held-out pairs in llama.cpp...")
    t0 = time.monotonic()
    adapter_only = plan.quant is None
    fid = yield from fidelity_mod.check_steps(
        ws, plan.run, plan.base if adapter_only else main, base_path=plan.base, stage=STAGE,
        lora_path=main if adapter_only else None, threshold=settings.min_sign_agreement,
        threads=settings.threads, max_pairs=settings.verify_pairs, quant=plan.quant,
    )  # fmt: skip
    timings["verify_s"] = time.monotonic() - t0
    if fid is None:
        plan.warnings.append(f"Run '{plan.run.name}' has no held-out pairs; the fidelity check was skipped.")
        return None
    yield Log(STAGE, fid.summary())
    if not fid.ok:
        advice = "" if plan.label in ("q8_0", "f16", "adapter") else " Prefer --quant q8_0 or --adapter-only."
        plan.warnings.append(
            f"This export falls short: only {100 * fid.sign_agreement:.1f}% of held-out pairs keep the trained "
            f"model's preference (expected at least {100 * fid.threshold:.0f}%).{advice}"
        )
    return fid


def _record(ws: Workspace, run: runs.Run, r: ExportResult, family: str | None) -> int:
    info = {
        "directory": str(r.directory),
        "files": r.files,
        "quant": r.quant,
        "modelfile": str(r.modelfile) if r.modelfile else None,
        "template_family": family,
        "fidelity": r.fidelity,
        "timings": {k: round(v, 3) for k, v in r.timings.items()},
        "ollama": r.ollama,
        "warnings": r.warnings,
    }
    with ws.transaction() as conn:
        # A forced re-export replaced the files an older row pointed at: that row goes with them.
        prefix = str(r.directory) + "/"
        conn.execute("DELETE FROM exports WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
        cur = conn.execute(
            "INSERT INTO exports(run_id, kind, quant, path, size, info, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run.id, r.kind, r.quant, str(r.path), r.size, json.dumps(info), time.time()),
        )
    return int(cur.lastrowid)


@dataclass
class ExportRow:
    """One row of the `exports` table, with its run's name."""

    id: int
    run: str | None
    kind: str
    quant: str | None
    path: str
    size: int
    info: dict
    created_at: float

    def as_dict(self) -> dict:
        return asdict(self)


def list_exports(ws: Workspace) -> list[ExportRow]:
    rows = ws.query(
        "SELECT e.*, r.name AS run_name FROM exports e LEFT JOIN runs r ON r.id = e.run_id ORDER BY e.id"
    )
    keys = ("id", "run_name", "kind", "quant", "path", "size")
    return [ExportRow(*(r[k] for k in keys), json.loads(r["info"]), r["created_at"]) for r in rows]
