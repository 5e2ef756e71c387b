"""The export job: a trained run -> a personalized GGUF (or a GGUF LoRA adapter) + an Ollama Modelfile.

merged:  merge LoRA into the base -> F16 GGUF -> llama.cpp quantizer -> Modelfile -> fidelity check
adapter: GGUF LoRA adapter -> Modelfile (FROM base, ADAPTER) -> fidelity check (base + adapter)

Everything is written into a private temporary folder beside the output folder, which replaces the output
in one rename at the end: an interrupted export leaves nothing behind, a finished one is complete. The
intermediate F16 file of a quantized export is deleted before the rename.
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
from .adapter_io import ADAPTER_FILE, load_adapter
from .errors import ExportError, ModelError, UserInputError
from .fsutil import atomic_dir, require_free_space, sha256_file
from .progress import EtaClock, Log, Progress
from .settings import ExportSettings
from .train import runs
from .workspace import Workspace

STAGE = "export"


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def default_out_dir(ws: Workspace, run_name: str, label: str) -> Path:
    return ws.root / "exports" / f"{run_name}-{label}"


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserInputError(f"The output path {out} is a file; give a folder path with --out.")
    if out.exists() and not force:
        raise UserInputError(f"The output folder {out} already exists.", hint="Pass --force to replace it.")


def _system_text(ws: Workspace, settings: ExportSettings) -> str | None:
    if not settings.system_from_contexts:
        return None
    texts = [c.text for c in ws.contexts()]
    return "\n\n".join(texts) if texts else None


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
        ExportError: the adapter does not fit the base, quantizing failed, untranslatable chat template.
    """
    started = time.monotonic()
    run = runs.require_run(ws, run_name, finished=True)
    base_path = Path(run.base_model["path"])
    if not base_path.is_file():
        raise ModelError(f"The base model of run '{run.name}', {base_path}, is missing; run `mipo-local init` again.")
    # One reader for the whole job: gguf-py takes a second or more to open a file with a large vocabulary.
    reader = gguf_io.open_reader(base_path)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    quant = None if settings.adapter_only else quantize.resolve_quant(settings.quant, n_params)
    adapter = load_adapter(runs.final_dir(ws, run.name) / ADAPTER_FILE)
    out = Path(out_dir).expanduser().resolve() if out_dir else default_out_dir(ws, run.name, quant or "adapter")
    _check_out_dir(out, force)

    # The Ollama template is derived before any heavy work, so an untranslatable template fails fast.
    warnings: list[str] = []
    try:
        template, add_bos = ollama.template_from_reader(reader, base_path)
        go_template, turns = ollama.translate(template, add_bos=add_bos)
    except ExportError as err:
        if ollama_name:
            raise
        go_template, turns = None, None
        warnings.append(f"No Modelfile written: {err}")

    if settings.adapter_only:
        needed = adapter_bytes(adapter) + (4 << 20)
    else:
        needed = merge.merged_f16_bytes(reader) + (16 << 20)
        if quant != "f16":
            needed += quantize.estimated_bytes(quant, n_params)
    require_free_space(out.parent, needed, f"exporting run '{run.name}'")

    label = "adapter" if settings.adapter_only else quant
    with ws.job("export", f"mipo-local export {run.name} ({label})"):
        yield Log(STAGE, f"Exporting run '{run.name}' ({label}) to {out}...")
        sha = sha256_file(base_path)
        if adapter.base_sha256 and adapter.base_sha256 != sha:
            raise ExportError(
                f"The base model {base_path} changed since run '{run.name}' was trained "
                f"(sha256 {sha[:12]}, trained on {adapter.base_sha256[:12]}); export needs the same file."
            )
        meta = merge.provenance(base_sha256=sha, run_name=run.name, run_settings=run.settings)
        model_name = run.base_model.get("name") or gguf_io.field_value(reader, gguf.Keys.General.NAME) or base_path.stem
        stem = f"{_slug(model_name)}-{_slug(run.name)}"
        timings: dict[str, float] = {}
        with atomic_dir(out) as tmp:
            if settings.adapter_only:
                t0 = time.monotonic()
                main = write_adapter_gguf(
                    base_path, tmp / f"{stem}-lora.gguf", adapter, metadata=meta, reader=reader
                )
                timings["adapter_s"] = time.monotonic() - t0
                yield Progress(STAGE, 1, 1, "adapter written", unit="steps")
                from_, adapter_ref, verify_model, verify_lora = str(base_path), f"./{main.name}", base_path, main
            else:
                main = yield from _merged(tmp, stem, base_path, reader, adapter, meta, quant, settings, timings)
                from_, adapter_ref, verify_model, verify_lora = f"./{main.name}", None, main, None

            modelfile = None
            if go_template is not None:
                text = ollama.modelfile_text(
                    from_=from_, adapter=adapter_ref, template=go_template, stops=turns.stops,
                    system=_system_text(ws, settings),
                )  # fmt: skip
                modelfile = ollama.write_modelfile(tmp, text)

            fid = None
            if settings.verify:
                yield Log(STAGE, "Checking fidelity on the held-out pairs in llama.cpp...")
                t0 = time.monotonic()
                fid = fidelity_mod.check(
                    ws, run, verify_model, base_path=base_path, lora_path=verify_lora,
                    threshold=settings.min_sign_agreement, threads=settings.threads,
                    max_pairs=settings.verify_pairs,
                )  # fmt: skip
                timings["verify_s"] = time.monotonic() - t0
                if fid is None:
                    warnings.append(f"Run '{run.name}' has no held-out pairs; the fidelity check was skipped.")
                else:
                    yield Log(STAGE, fid.summary())
                    if not fid.ok:
                        warnings.append(_shortfall(fid, label))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        timings["total_s"] = time.monotonic() - started

        for w in warnings:
            yield Log(STAGE, w, "warning")
        modelfile_path = out / ollama.MODELFILE if modelfile else None
        ollama_msg = None
        if ollama_name:
            created, ollama_msg = ollama.create(ollama_name, modelfile_path)
            yield Log(STAGE, ollama_msg, "info" if created else "warning")
        result = ExportResult(
            id=0, run=run.name, kind="adapter" if settings.adapter_only else "merged", quant=quant,
            directory=out, path=out / main.name, size=sum(files.values()), files=files,
            modelfile=modelfile_path, fidelity=fid.as_dict() if fid else None, timings=timings,
            ollama=ollama_msg, warnings=warnings,
        )  # fmt: skip
        result.id = _record(ws, run, result, turns.family if turns else None)
        return result


def _merged(tmp, stem, base_path, reader, adapter, meta, quant, settings, timings):
    """Merge into F16, then quantize (unless f16); yields progress, returns the final file."""
    f16_path = tmp / (f"{stem}-F16.gguf" if quant == "f16" else f".{stem}-F16.tmp.gguf")
    t0 = time.monotonic()
    clock = None
    for done, total in merge.merge_steps(base_path, f16_path, adapter.tensors, metadata=meta, reader=reader):
        clock = clock or EtaClock(total + 1)
        if done == total or done % 8 == 0:
            yield clock.event(STAGE, done, "merging LoRA into F16", unit="tensors")
    timings["merge_f16_s"] = time.monotonic() - t0
    if quant == "f16":
        return f16_path
    yield Log(STAGE, f"Quantizing to {quant.upper()} with llama.cpp...")
    t0 = time.monotonic()
    target = quantize.quantize(f16_path, tmp / f"{stem}-{quant.upper()}.gguf", quant, threads=settings.threads)
    f16_path.unlink()  # the intermediate F16 is not part of the export
    timings["quantize_s"] = time.monotonic() - t0
    yield clock.event(STAGE, clock.total, f"quantized to {quant.upper()}", unit="tensors")
    return target


def _shortfall(fid: fidelity_mod.Fidelity, label: str) -> str:
    advice = " Prefer --quant q8_0 or --adapter-only." if label not in ("q8_0", "f16", "adapter") else ""
    return (
        f"This export falls short: only {100 * fid.sign_agreement:.1f}% of held-out pairs keep the trained "
        f"model's preference (expected at least {100 * fid.threshold:.0f}%).{advice}"
    )


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
        # A forced re-export replaced the files an older row pointed at: that row is gone with them.
        prefix = str(r.directory) + "/"
        conn.execute("DELETE FROM exports WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
        cur = conn.execute(
            "INSERT INTO exports(run_id, kind, quant, path, size, info, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run.id, r.kind, r.quant, str(r.path), r.size, json.dumps(info), time.time()),
        )
    return int(cur.lastrowid)


@dataclass
class ExportRow:
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
    return [
        ExportRow(r["id"], r["run_name"], r["kind"], r["quant"], r["path"], r["size"], json.loads(r["info"]), r["created_at"])
        for r in rows
    ]
