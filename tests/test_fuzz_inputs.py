"""Property-based fuzzing (Hypothesis) of every importer and every numeric or name flag: whatever the input,
the CLI exits 0 or prints one `Error: ...` line, never a traceback, and an error leaves the workspace's
content as it was.

The workspaces are the same two for every example (built once): `empty` (the tiny model, nothing else), on
which a valid flag value stops early with "no contexts/pairs/export yet", and `full` (contexts, prompts,
pairs), where importers add what they accept.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mipo_local import modelsource
from mipo_local.workspace import Workspace
from tests import exporthelp
from tests.clihelp import run_cli
from tests.faulthelp import checksum

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_gguf):
    root = tmp_path_factory.mktemp("fuzz")
    empty = Workspace.open(root / "empty", create=True)
    modelsource.set_base_model(empty, str(tiny_gguf))
    empty.close()
    full = Workspace.open(root / "full", create=True)
    modelsource.set_base_model(full, str(tiny_gguf))
    full.add_context("I am Ana, a vegan chef in Lisbon.")
    full.add_prompts(["How do I cook rice?", "What is a good tea?"])
    exporthelp.insert_pairs(full, 3)
    full.close()
    scratch = Workspace.open(root / "scratch", create=True)
    modelsource.set_base_model(scratch, str(tiny_gguf))
    scratch.close()
    return {"root": root, **{k: root / k for k in ("empty", "full", "scratch")}}


def _check(r, before: str, place) -> None:
    assert "Traceback" not in r.output, r.output
    if r.exit_code != 0:
        assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
        assert checksum(place) == before, "a refused input changed the workspace"


# -- importers -----------------------------------------------------------------------------------------

# Text with everything a file can hold: control characters, NULs, invisible characters, long lines.
_texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | _texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_texts, children, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "author": st.one_of(
            _json, st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", 3])})
        ),
        "content": st.one_of(
            _json, st.fixed_dictionaries({"parts": st.one_of(_json, st.lists(_texts, max_size=3))})
        ),
        "create_time": st.one_of(st.none(), st.floats(allow_nan=True), st.integers(), _texts),
    },
)
_chatgpt = st.lists(
    st.one_of(_json, st.fixed_dictionaries({"mapping": st.dictionaries(_texts, st.fixed_dictionaries({"message": st.one_of(_message, _json)}), max_size=4)})),
    max_size=3,
)  # fmt: skip
_pair_line = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(_texts, _json), "chosen": st.one_of(_texts, _json),
        "rejected": st.one_of(_texts, _json), "system": st.one_of(_texts, _json),
        "mipo": st.one_of(_json, st.dictionaries(st.sampled_from(["seed", "pmi_margin", "pair_key", "settings", "scores", "source"]), _json)),
    },
)  # fmt: skip


def _import(places, tmp_path_factory, command: str, name: str, data: bytes) -> None:
    f = tmp_path_factory.mktemp("in") / name
    f.write_bytes(data)
    before = checksum(places["full"])
    _check(run_cli("--workspace", str(places["full"]), command, "import", str(f)), before, places["full"])


@FUZZ
@given(text=_texts, name=st.sampled_from(["p.txt", "p.md", "p.jsonl", "p"]))
def test_prompt_import_of_any_text(places, tmp_path_factory, text, name):
    _import(places, tmp_path_factory, "prompts", name, text.encode("utf-8"))


@FUZZ
@given(data=st.binary(max_size=400))
def test_prompt_import_of_any_bytes(places, tmp_path_factory, data):
    _import(places, tmp_path_factory, "prompts", "p.txt", data)


@FUZZ
@given(lines=st.lists(st.one_of(_json, st.fixed_dictionaries({"prompt": _json})), max_size=4))
def test_prompt_import_of_any_jsonl(places, tmp_path_factory, lines):
    data = "\n".join(json.dumps(x) for x in lines).encode()
    _import(places, tmp_path_factory, "prompts", "p.jsonl", data)


@FUZZ
@given(conversations=_chatgpt)
def test_prompt_import_of_any_chatgpt_export(places, tmp_path_factory, conversations):
    _import(places, tmp_path_factory, "prompts", "conversations.json", json.dumps(conversations).encode())


@FUZZ
@given(lines=st.lists(st.one_of(_pair_line, _json), min_size=1, max_size=3))
def test_pairs_import_of_any_jsonl(places, tmp_path_factory, lines):
    data = "\n".join(json.dumps(x) for x in lines).encode()
    _import(places, tmp_path_factory, "pairs", "pairs.jsonl", data)


# -- flags ---------------------------------------------------------------------------------------------

_numbers = st.one_of(
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-0", "1.5", " 3", "", "0x10", "1_000"]),
).map(
    lambda v: (
        v if isinstance(v, str) else (repr(v) if isinstance(v, float) and not math.isfinite(v) else str(v))
    )
)
_names = st.one_of(_texts, st.sampled_from(["", " ", "a/b", "..", "-x", "r" * 300, "run\n2", "ok-name"]))

# (command words, flag, kind): every numeric or name flag of every command.
FLAGS = [
    *[(("pairs",), f, "n") for f in ("--per-prompt", "--candidates", "--guidance", "--temperature", "--top-p",
                                     "--max-tokens", "--seed", "--min-pmi")],
    *[(("train",), f, "n") for f in ("--epochs", "--lr", "--beta", "--sft-weight", "--other-context-kl", "--rank",
                                     "--alpha", "--batch-size", "--grad-accum", "--max-len", "--threads",
                                     "--checkpoint-every", "--eval-every", "--seed")],
    (("train",), "--run", "s"),
    (("export",), "--threads", "n"), (("export",), "--run", "s"), (("export",), "--ollama", "s"),
    *[(("eval",), f, "n") for f in ("--export", "--n", "--seed", "--max-tokens")],
    (("eval",), "--run", "s"),
    *[(("prompts", "synth"), f, "n") for f in ("--n", "--seed")],
    *[(("run",), f, "n") for f in ("--prompts", "--max-tokens")],
    *[(("chat", "--model", "base"), f, "n") for f in ("--temperature", "--max-tokens")],
    (("pairs", "regenerate", "999"), "--seed", "n"),
    (("context", "rm"), None, "n"), (("prompts", "rm"), None, "n"), (("pairs", "show"), None, "n"),
    (("runs", "show"), None, "s"), (("context", "add", "I am Bo."), "--label", "s", "scratch"),
]  # fmt: skip


@pytest.mark.parametrize("case", FLAGS, ids=[" ".join([*c[0], c[1] or "ARG"]) for c in FLAGS])
def test_any_value_of_a_flag_is_one_error_line_or_works(places, case):
    """On `empty` a valid value stops at "no contexts / pairs / export yet"; commands that would succeed
    and write (context add) run on a workspace of their own."""
    words, flag, kind, *where = case
    place = places[where[0] if where else "empty"]

    @FUZZ
    @given(value=_numbers if kind == "n" else _names)
    def run(value):
        before = checksum(place)
        args = [*words, *([flag] if flag else []), value]
        _check(run_cli("--workspace", str(place), *args, input=""), before, place)

    run()
