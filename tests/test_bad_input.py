"""Every bad input gets one `Error: ...` line naming what is wrong, a non-zero exit, and leaves the workspace
exactly as it was (a checksum of its files and database rows before and after).

The workspaces are built once for the module: `main` has the tiny model, two contexts, prompts, held-out
pairs, a finished run `run-1` (no export yet) and an unfinished run `half`; `bare` is initialised and
empty; `ctxonly` has one context and no prompts; `none` does not exist.

Disk full is not simulated here: a small tmpfs or loop mount needs root, and faking the free-space probe
would test a mock. `fsutil.require_free_space` is exercised by the export tests' real paths only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import gguf
import numpy as np
import pytest

from mipo_local import modelsource
from mipo_local.settings import TrainSettings
from mipo_local.train import runs
from mipo_local.workspace import Workspace
from tests import exporthelp
from tests.clihelp import run_cli
from tests.faulthelp import checksum

F = "{f}"  # the folder of prepared input files

# (id, workspace, args, a piece of the one-line message that names the file, field or value)
CASES = [
    # -- init and models: model files, catalog names, Ollama manifests, the Hugging Face cache
    ("init-missing-file", "main", ("init", "--model", f"{F}/missing.gguf"), "missing.gguf"),
    ("init-not-gguf", "main", ("init", "--model", f"{F}/x.gguf"), "x.gguf is not a GGUF file"),
    ("init-truncated-gguf", "main", ("init", "--model", f"{F}/trunc.gguf"), "trunc.gguf is a damaged or truncated"),
    ("init-header-only-gguf", "main", ("init", "--model", f"{F}/header.gguf"), "header.gguf"),
    ("init-unsupported-arch", "main", ("init", "--model", f"{F}/bert.gguf"), "bert"),
    ("init-no-chat-template", "none", ("init", "--model", f"{F}/notemplate.gguf"), "has no chat template"),
    ("init-tensor-missing", "none", ("init", "--model", f"{F}/notensor.gguf"), "llama.cpp could not load"),
    ("init-fresh-dir-bad-model", "none", ("init", "--model", f"{F}/x.gguf"), "not a GGUF file"),
    ("init-unknown-catalog-name", "main", ("init", "--model", "no-such-model"), "Unknown model 'no-such-model'"),
    ("init-ollama-unknown", "main", ("init", "--model", "ollama:unknown-model"), "Ollama has no model 'unknown-model'"),
    ("init-ollama-manifest-not-json", "main", ("init", "--model", "ollama:broken"), "manifest"),
    ("init-ollama-manifest-no-model-layer", "main", ("init", "--model", "ollama:nolayer"), "lists no model layer"),
    ("init-ollama-missing-blob", "main", ("init", "--model", "ollama:noblob"), "sha256:abcd"),
    ("init-hf-not-cached", "main", ("init", "--model", "hf:someone/repo/m.gguf"), "not in the Hugging Face cache"),
    ("init-hf-bad-spec", "main", ("init", "--model", "hf:nope"), "hf:OWNER/REPO/FILE.gguf"),
    ("models-info-truncated", "main", ("models", "info", f"{F}/trunc.gguf"), "trunc.gguf"),
    ("models-info-unknown", "main", ("models", "info", "no-such-model"), "no-such-model"),
    ("models-pull-offline", "main", ("models", "pull", "someone/repo", "--file", "m.gguf"), "Cannot download"),
    ("models-pull-not-gguf", "main", ("models", "pull", "someone/repo", "--file", "m.bin"), "--file m.bin"),
    ("status-no-workspace", "none", ("status",), "No workspace at"),
    # -- contexts
    ("context-empty", "main", ("context", "add", "   "), "context is empty"),
    ("context-no-text", "main", ("context", "add"), "one of the two"),
    ("context-file-missing", "main", ("context", "add", "--file", f"{F}/missing.txt"), "missing.txt"),
    ("context-file-bad-utf8", "main", ("context", "add", "--file", f"{F}/bad.txt"), "bad.txt: line 2 is not valid UTF-8"),
    ("context-file-empty", "main", ("context", "add", "--file", f"{F}/empty.txt"), "empty.txt is empty"),
    ("context-edit-unknown-id", "main", ("context", "edit", "99", "x"), "no context with id 99"),
    ("context-edit-empty", "main", ("context", "edit", "1", "  "), "context is empty"),
    ("context-rm-unknown-id", "main", ("context", "rm", "99"), "no context with id 99"),
    ("context-add-no-workspace", "none", ("context", "add", "I am Ana."), "mipo-local init"),
    ("context-add-invisible", "main", ("context", "add", "\u200b \u200d"), "invisible characters"),
    ("context-add-escape-char", "main", ("context", "add", "I am \x1b[31mAna"), "control character (U+001B)"),
    ("context-add-too-many-tokens", "main", ("context", "add", " ".join(f"w{i}" for i in range(1500))), "limit is 1,024 tokens"),
    ("context-edit-control-char", "main", ("context", "edit", "1", "I am\x00 Ana"), "control character"),
    ("context-label-control-char", "main", ("context", "add", "I am Bo.", "--label", "a\x1bb"), "--label"),
    ("context-rm-huge-id", "main", ("context", "rm", str(2**70)), "is not in the range"),
    ("workspace-is-a-file-init", "file", ("init",), "is a file"),
    ("workspace-is-a-file-status", "file", ("status",), "is a file"),
    ("workspace-under-a-file", "underfile", ("context", "list"), "which is a file"),
    # -- prompts
    ("prompts-empty", "main", ("prompts", "add", "  "), "prompt is empty"),
    ("prompts-one-of-many-empty", "main", ("prompts", "add", "Fine?", " "), "(item 2)"),
    ("prompts-import-bad-utf8", "main", ("prompts", "import", f"{F}/bad.txt"), "bad.txt: line 2 is not valid UTF-8"),
    ("prompts-import-bad-json-line", "main", ("prompts", "import", f"{F}/bad.jsonl"), "bad.jsonl: line 2 is not valid JSON"),
    ("prompts-import-no-prompt-field", "main", ("prompts", "import", f"{F}/noprompt.jsonl"), "line 2 has no string field 'prompt'"),
    ("prompts-import-missing-file", "main", ("prompts", "import", f"{F}/none.txt"), "File not found"),
    ("prompts-import-empty-file", "main", ("prompts", "import", f"{F}/empty.txt"), "empty.txt contains no prompts"),
    ("prompts-import-directory", "main", ("prompts", "import", F), "is a directory"),
    ("prompts-import-broken-chatgpt", "main", ("prompts", "import", f"{F}/conversations.json"), "conversations.json"),
    ("prompts-rm-unknown-id", "main", ("prompts", "rm", "99"), "no prompt with id 99"),
    ("prompts-rm-not-a-number", "main", ("prompts", "rm", "abc"), "'abc' is not a prompt id"),
    ("prompts-rm-nothing-named", "main", ("prompts", "rm"), "Say which prompts to delete"),
    ("prompts-rm-backwards-range", "main", ("prompts", "rm", "9-3"), "not a valid id or range"),
    ("prompts-rm-ids-and-source", "main", ("prompts", "rm", "1", "--source", "import"), "not both"),
    ("prompts-add-control-char", "main", ("prompts", "add", "Hi\x07there?"), "control character (U+0007)"),
    ("prompts-add-nul", "main", ("prompts", "add", "a\x00b?"), "control character (U+0000)"),
    ("prompts-add-invisible", "main", ("prompts", "add", "\u200b\u2060\ufeff"), "invisible characters"),
    ("prompts-add-too-long", "main", ("prompts", "add", "Why? " * 3000), "characters long; the limit is 8,000"),
    ("prompts-add-too-many-tokens", "main", ("prompts", "add", " ".join(f"w{i}" for i in range(1300))), "tokens long; the limit is 1,024"),
    ("prompts-import-too-many", "main", ("prompts", "import", f"{F}/many.txt"), "holds 1,500 prompts, more than the 1,000"),
    ("prompts-import-over-limit", "main", ("prompts", "import", f"{F}/twenty.txt", "--limit", "10"), "more than the 10 one import"),
    ("prompts-import-utf16-no-bom", "main", ("prompts", "import", f"{F}/utf16.txt"), "looks like UTF-16"),
    ("prompts-import-one-huge-prompt", "main", ("prompts", "import", f"{F}/huge.txt"), "characters long"),
    ("prompts-import-control-chars", "main", ("prompts", "import", f"{F}/controls.jsonl"), "control character"),
    ("prompts-synth-n-zero", "main", ("prompts", "synth", "--n", "0"), "--n must be between"),
    ("prompts-synth-no-contexts", "bare", ("prompts", "synth", "--n", "2"), "no contexts yet"),
    # -- pairs: flags, missing inputs, the pairs store and JSONL import
    ("pairs-negative-temperature", "main", ("pairs", "--temperature", "-1"), "--temperature must be"),
    ("pairs-per-prompt-zero", "main", ("pairs", "--per-prompt", "0"), "--per-prompt must be"),
    ("pairs-top-p-above-one", "main", ("pairs", "--top-p", "1.5"), "--top-p must be"),
    ("pairs-max-tokens-zero", "main", ("pairs", "--max-tokens", "0"), "--max-tokens must be"),
    ("pairs-candidates-zero", "main", ("pairs", "--candidates", "0"), "--candidates must be"),
    ("pairs-unknown-strategy", "main", ("pairs", "--strategy", "bogus"), "--strategy"),
    ("pairs-min-pmi-without-score", "main", ("pairs", "--min-pmi", "1", "--no-score"), "--min-pmi needs scoring"),
    ("pairs-min-pmi-nan", "main", ("pairs", "--min-pmi", "nan"), "--min-pmi must be a number"),
    ("pairs-min-pmi-inf", "main", ("pairs", "--min-pmi", "inf"), "--min-pmi must be a number"),
    ("pairs-guidance-inf", "main", ("pairs", "--guidance", "inf"), "--guidance must be"),
    ("pairs-temperature-nan", "main", ("pairs", "--temperature", "nan"), "--temperature must be"),
    ("pairs-seed-huge", "main", ("pairs", "--seed", str(2**70)), "--seed must be a whole number"),
    ("pairs-import-seed-beyond-sqlite", "main", ("pairs", "import", f"{F}/pairs_seed.jsonl"), "'mipo.seed' outside"),
    ("pairs-import-nan-margin", "main", ("pairs", "import", f"{F}/pairs_nan.jsonl"), "'mipo.pmi_margin'"),
    ("pairs-import-control-chars", "main", ("pairs", "import", f"{F}/pairs_ctrl.jsonl"), "line 1: 'chosen' contains a control character"),
    ("pairs-show-huge-id", "main", ("pairs", "show", str(2**64)), "is not in the range"),
    ("pairs-regenerate-huge-seed", "main", ("pairs", "regenerate", "1", "--seed", str(2**40)), "--seed must be a whole number"),
    ("pairs-no-contexts", "bare", ("pairs",), "no contexts yet"),
    ("pairs-no-prompts", "ctxonly", ("pairs",), "no prompts yet"),
    ("pairs-import-bad-json-line", "main", ("pairs", "import", f"{F}/pairs_bad.jsonl"), "pairs_bad.jsonl: line 2 is not valid JSON"),
    ("pairs-import-missing-field", "main", ("pairs", "import", f"{F}/pairs_nofield.jsonl"), "line 2 has no non-empty string field 'rejected'"),
    ("pairs-import-not-an-object", "main", ("pairs", "import", f"{F}/pairs_list.jsonl"), "pairs_list.jsonl: line 1"),
    ("pairs-import-missing-file", "main", ("pairs", "import", f"{F}/none.jsonl"), "File not found"),
    ("pairs-show-unknown-id", "main", ("pairs", "show", "999"), "no pair with id 999"),
    ("pairs-rm-unknown-id", "main", ("pairs", "rm", "999"), "no pair with id 999"),
    ("pairs-regenerate-unknown-id", "main", ("pairs", "regenerate", "999"), "no pair with id 999"),
    ("pairs-export-to-directory", "main", ("pairs", "export", F), "is a directory"),
    # -- train
    ("train-no-pairs", "bare", ("train",), "no pairs to train on"),
    ("train-run-name-exists", "main", ("train", "--run", "run-1"), "A run named 'run-1' already exists"),
    ("train-rank-zero", "main", ("train", "--rank", "0"), "--rank must be at least 1"),
    ("train-lr-zero", "main", ("train", "--lr", "0"), "--lr must be between 0 and 1"),
    ("train-lr-too-high", "main", ("train", "--lr", "5"), "--lr must be between 0 and 1"),
    ("train-unknown-targets", "main", ("train", "--targets", "q,foo"), "--targets has unknown names foo"),
    ("train-max-len-too-small", "main", ("train", "--max-len", "8"), "--max-len must be at least 32"),
    ("train-negative-beta", "main", ("train", "--beta", "-1"), "--beta must be positive"),
    ("train-negative-sft", "main", ("train", "--sft-weight", "-1"), "--sft-weight must be between 0 and 10"),
    ("train-resume-unknown-run", "main", ("train", "--resume", "--run", "nope"), "no run named 'nope'"),
    ("train-resume-finished-run", "main", ("train", "--resume", "--run", "run-1"), "'run-1' has already finished"),
    ("train-bad-run-name", "main", ("train", "--run", "a/b"), "'a/b' is not a valid run name"),
    ("train-unknown-precision", "main", ("train", "--precision", "fp8"), "--precision"),
    ("train-run-name-empty", "main", ("train", "--run", ""), "--run is empty"),
    ("train-run-name-too-long", "main", ("train", "--run", "r" * 300), "too long"),
    ("train-run-name-newline", "main", ("train", "--run", "run\n2"), "not a valid run name"),
    ("train-run-name-space", "main", ("train", "--run", "my run"), "not a valid run name"),
    ("train-rank-huge", "main", ("train", "--rank", "100000000"), "--rank must be a whole number from 1 to 1024"),
    ("train-rank-beyond-model", "main", ("train", "--rank", "64"), "smallest adapted matrix side (32)"),
    ("train-epochs-huge", "main", ("train", "--epochs", "1000000"), "--epochs must be a whole number from 1 to 100"),
    ("train-beta-inf", "main", ("train", "--beta", "inf"), "--beta must be"),
    ("train-beta-nan", "main", ("train", "--beta", "nan"), "--beta must be"),
    ("train-alpha-inf", "main", ("train", "--alpha", "inf"), "--alpha must be"),
    ("train-lr-nan", "main", ("train", "--lr", "nan"), "--lr must be"),
    ("train-kl-inf", "main", ("train", "--other-context-kl", "inf"), "--other-context-kl must be"),
    ("train-seed-huge", "main", ("train", "--seed", str(2**70)), "--seed must be a whole number"),
    ("train-threads-huge", "main", ("train", "--threads", "100000"), "--threads must be a whole number"),
    ("train-grad-accum-huge", "main", ("train", "--grad-accum", "10000000"), "--grad-accum must be"),
    # -- export
    ("export-unknown-run", "main", ("export", "--run", "nope"), "no run named 'nope'"),
    ("export-unfinished-run", "main", ("export", "--run", "half"), "'half' has no finished checkpoint"),
    ("export-no-finished-run", "bare", ("export",), "no finished training run"),
    ("export-unsupported-quant", "main", ("export", "--quant", "q3_k"), "'q3_k' is not one of 'auto', 'f16', 'q8_0'"),
    ("export-out-exists", "main", ("export", "--out", f"{F}/outdir"), "outdir already exists. Pass --force"),
    ("export-out-is-a-file", "main", ("export", "--out", f"{F}/outfile"), "outfile"),
    ("export-ollama-name-with-spaces", "main", ("export", "--ollama", "bad name with spaces"), "not a name Ollama accepts"),
    ("export-ollama-name-empty-tag", "main", ("export", "--ollama", "name:"), "not a name Ollama accepts"),
    ("export-threads-huge", "main", ("export", "--threads", "100000"), "--threads must be"),
    ("export-out-under-proc", "main", ("export", "--no-verify", "--out", "/proc/mipo-x"), "/proc"),
    ("export-context-with-triple-quotes", "quotes", ("export", "--no-verify"), 'Context 1 contains """'),
    ("export-context-with-special-token", "special", ("export", "--no-verify"), "'<|im_end|>', a special token"),
    # -- eval and chat
    ("eval-before-any-export", "main", ("eval",), "no export to evaluate yet"),
    ("eval-judge-not-gguf", "main", ("eval", "--judge", f"{F}/x.gguf"), "x.gguf is not a GGUF file"),
    ("eval-judge-truncated", "main", ("eval", "--judge", f"{F}/trunc.gguf"), "trunc.gguf"),
    ("eval-unknown-export-id", "main", ("eval", "--export", "99"), "no export with id 99"),
    ("eval-run-without-export", "main", ("eval", "--run", "run-1"), "'run-1' has no export yet"),
    ("eval-unknown-run", "main", ("eval", "--run", "nope"), "no run named 'nope'"),
    ("eval-n-zero", "main", ("eval", "--n", "0"), "--n must be at least 1"),
    ("eval-n-huge", "main", ("eval", "--n", "100000"), "--n must be a whole number from 1 to 1000"),
    ("eval-seed-huge", "main", ("eval", "--seed", str(2**70)), "--seed must be a whole number"),
    ("chat-temperature-nan", "main", ("chat", "--model", "base", "--temperature", "nan"), "--temperature must be"),
    ("chat-max-tokens-huge", "main", ("chat", "--model", "base", "--max-tokens", "10000000"), "--max-tokens must be"),
    ("chat-before-any-export", "main", ("chat",), "no export to chat with yet"),
    ("chat-missing-model-file", "main", ("chat", "--model", f"{F}/missing.gguf"), "missing.gguf does not exist"),
    ("runs-show-unknown", "main", ("runs", "show", "nope"), "no run named 'nope'"),
    # -- run (the whole pipeline)
    ("run-no-contexts", "bare", ("run",), "no contexts yet"),
    ("run-negative-prompts", "main", ("run", "--prompts", "-1"), "--prompts must be 0 or more"),
    ("run-max-tokens-zero", "main", ("run", "--max-tokens", "0"), "--max-tokens must be"),
    ("run-prompts-huge", "main", ("run", "--prompts", "100000"), "--prompts must be a whole number"),
    ("prompts-synth-seed-huge", "main", ("prompts", "synth", "--n", "2", "--seed", str(2**70)), "--seed must be"),
    ("unknown-command", "main", ("fly",), "No such command 'fly'"),
]  # fmt: skip


def _write_bert_gguf(path):
    """A valid GGUF of an architecture mipo-local does not support."""
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("tiny-bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_tiny_variant(source, target, *, drop_key: str | None = None, drop_tensor: str | None = None):
    """A copy of the tiny model without one metadata key or one tensor: a header gguf-py reads, a model
    mipo-local must refuse."""
    from mipo_local import gguf_io

    reader = gguf_io.open_reader(source)
    arch = gguf_io.field_value(reader, gguf.Keys.General.ARCHITECTURE)
    w = gguf.GGUFWriter(str(target), arch)
    gguf_io.copy_metadata(reader, w, skip={drop_key} if drop_key else ())
    for t in reader.tensors:
        if t.name != drop_tensor:
            w.add_tensor(
                t.name,
                np.array(t.data),
                raw_shape=tuple(reversed([int(x) for x in t.shape])),
                raw_dtype=t.tensor_type,
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_gguf):
    root = tmp_path_factory.mktemp("bad-input")
    mp = pytest.MonkeyPatch()
    mp.setenv("OLLAMA_MODELS", str(root / "ollama"))
    mp.delenv("MIPO_LOCAL_HOME", raising=False)

    main = Workspace.open(root / "ws" / "main", create=True)
    model = modelsource.set_base_model(main, str(tiny_gguf))
    main.add_context("I am Ana, a vegan chef in Lisbon.")
    main.add_context("I like short answers.")
    main.add_prompts([f"How do I cook dish {i}?" for i in range(6)])
    exporthelp.make_finished_run(main, "run-1", n_pairs=4)
    half = runs.create_run(main, "half", "torch", asdict(TrainSettings()), {**model.__dict__})
    runs.set_status(main, half.id, "running")
    main.close()
    for name, text in (("quotes", 'Answer like this: """short""".'), ("special", "I am Ana.<|im_end|> Hi")):
        hostile = Workspace.open(root / "ws" / name, create=True)
        modelsource.set_base_model(hostile, str(tiny_gguf))
        hostile.add_context(text)
        exporthelp.make_finished_run(hostile, "run-1", n_pairs=4)
        hostile.close()
    bare = Workspace.open(root / "ws" / "bare", create=True)
    modelsource.set_base_model(bare, str(tiny_gguf))
    bare.close()
    ctxonly = Workspace.open(root / "ws" / "ctxonly", create=True)
    modelsource.set_base_model(ctxonly, str(tiny_gguf))
    ctxonly.add_context("I am Bo.")
    ctxonly.close()

    f = root / "files"
    f.mkdir()
    (f / "x.gguf").write_text("nope")
    data = tiny_gguf.read_bytes()
    (f / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (f / "header.gguf").write_bytes(data[:24])
    _write_bert_gguf(f / "bert.gguf")
    (f / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    (f / "bad.jsonl").write_text('{"prompt": "fine"}\n{oops}\n')
    (f / "noprompt.jsonl").write_text('{"prompt": "fine"}\n{"text": "x"}\n')
    (f / "empty.txt").write_text("")
    (f / "conversations.json").write_text('[{"title": "a", "mapping": {')
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    (f / "pairs_bad.jsonl").write_text(f"{good}\nnot json\n")
    (f / "pairs_nofield.jsonl").write_text(f'{good}\n{{"prompt": "a", "chosen": "b"}}\n')
    (f / "pairs_list.jsonl").write_text('["a", "b", "c"]\n')
    (f / "outdir").mkdir()
    (f / "outfile").write_text("x")
    (f / "many.txt").write_text("".join(f"Question number {i}?\n" for i in range(1500)))
    (f / "twenty.txt").write_text("".join(f"Question {i}?\n" for i in range(20)))
    (f / "utf16.txt").write_bytes("How do I cook rice?\nWhat is tea?\n".encode("utf-16-le"))
    (f / "huge.txt").write_text("Why " * 20000 + "?\n")
    (f / "controls.jsonl").write_text(json.dumps({"prompt": "Hi\u0008 there?"}) + "\n")
    (f / "pairs_seed.jsonl").write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "mipo": {"seed": 2**70}}) + "\n"
    )
    (f / "pairs_nan.jsonl").write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c", "mipo": {"pmi_margin": NaN}}\n'
    )
    (f / "pairs_ctrl.jsonl").write_text(
        json.dumps({"prompt": "a", "chosen": "b\u0000", "rejected": "c"}) + "\n"
    )
    _write_tiny_variant(tiny_gguf, f / "notemplate.gguf", drop_key="tokenizer.chat_template")
    _write_tiny_variant(tiny_gguf, f / "notensor.gguf", drop_tensor="blk.0.attn_q.weight")
    manifests = root / "ollama" / "manifests" / "registry.ollama.ai" / "library"
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:abcd"}
    for name, text in (
        ("broken", "{not json"),
        ("nolayer", json.dumps({"layers": [{**layer, "mediaType": "application/vnd.ollama.image.license"}]})),
        ("noblob", json.dumps({"layers": [layer]})),
    ):
        (manifests / name).mkdir(parents=True)
        (manifests / name / "latest").write_text(text)
    yield {
        "root": root,
        "files": f,
        "file": f / "outfile",
        "underfile": f / "outfile" / "ws",
        **{k: root / "ws" / k for k in ("main", "bare", "ctxonly", "none", "quotes", "special")},
    }
    mp.undo()


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    from mipo_local.cli.main import cli

    covered = {c[2][0] for c in CASES}
    long_jobs = {"init", "context", "prompts", "pairs", "train", "export", "eval", "chat", "run", "models"}
    assert long_jobs <= covered <= set(cli.commands) | {"fly"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(corpus, case):
    _, where, args, message = case
    args = [a.replace(F, str(corpus["files"])) for a in args]
    before = checksum(corpus["root"])
    r = run_cli("--workspace", str(corpus[where]), *args)
    assert r.exit_code not in (0, None), r.output
    assert "Traceback" not in r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert checksum(corpus["root"]) == before, "the bad input changed a file or a row"
    if where == "none":
        assert not os.path.exists(corpus["none"])
