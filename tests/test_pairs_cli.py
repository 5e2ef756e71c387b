"""`mipo-local pairs ...` and `mipo-local prompts synth`, run through the real CLI entry point."""

import json
import re

import pytest

from mipo_local import pairs as mipo_pairs
from mipo_local import pairs_store
from mipo_local.synth import EXAMPLES, clean_candidate, copies_context, few_shot_text
from mipo_local.workspace import Workspace
from tests.clihelp import run_cli

FAST = ("--max-tokens", "8", "--temperature", "0.8", "--per-prompt", "1")


def _setup(tiny_gguf, prompts=("What should I cook?", "Any dessert idea?", "How do I plan my week?")):
    assert run_cli("init", "--model", str(tiny_gguf)).exit_code == 0
    assert run_cli("context", "add", "I am Ana, a vegan chef in Lisbon.").exit_code == 0
    if prompts:
        assert run_cli("prompts", "add", *prompts).exit_code == 0


def test_generate_list_show_rm(ws_dir, tiny_gguf):
    _setup(tiny_gguf)
    r = run_cli("pairs", *FAST, "--seed", "3")
    assert r.exit_code == 0, r.output
    assert "3 new pairs (0 already done" in r.stdout and "3 pairs in the workspace" in r.stdout
    assert "pairs [" in r.stderr and re.search(r" ETA \d+:\d\d", r.stderr)  # the progress bar and its ETA
    r = run_cli("pairs", *FAST, "--seed", "3")
    assert "0 new pairs (3 already done" in r.stdout
    listing = run_cli("pairs", "list").stdout
    assert listing.splitlines()[0].split() == ["id", "source", "strategy", "pmi", "prompt", "chosen"]
    assert [line.split()[1] for line in listing.splitlines()[1:]] == ["generated"] * 3
    assert "Any dessert idea?" in listing and listing.count("random-context") == 3
    r = run_cli("pairs", "show", "2")
    pair = pairs_store.get_pair(Workspace.open(ws_dir), 2)
    assert r.exit_code == 0 and pair.chosen in r.stdout and pair.rejected in r.stdout
    assert f"Negative context: {pair.neg_context}" in r.stdout and '"pmi_chosen"' in r.stdout
    assert pair.settings["seed"] == 3 and pair.settings["max_tokens"] == 8
    r = run_cli("pairs", "regenerate", "2", "--seed", "11")
    assert r.exit_code == 0 and "Regenerated pair 2 with seed 11, PMI margin" in r.stdout, r.output
    again = pairs_store.get_pair(Workspace.open(ws_dir), 2)
    assert again.settings["seed"] == 11 and (again.chosen, again.rejected) != (pair.chosen, pair.rejected)
    assert run_cli("pairs", "rm", "2").exit_code == 0
    r = run_cli("pairs", "show", "2")
    assert r.exit_code != 0 and "There is no pair with id 2." in r.stderr
    assert run_cli("pairs", "rm", "2").exit_code != 0
    assert Workspace.open(ws_dir).count("pairs") == 2


def test_export_import_round_trip_and_malformed_line(ws_dir, tiny_gguf, tmp_path):
    _setup(tiny_gguf)
    assert run_cli("pairs", *FAST, "--strategy", "no-context").exit_code == 0
    out = tmp_path / "pairs.jsonl"
    r = run_cli("pairs", "export", str(out))
    assert r.exit_code == 0 and "Wrote 3 pairs" in r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["prompt"] for rec in records] == [
        "What should I cook?",
        "Any dessert idea?",
        "How do I plan my week?",
    ]
    assert all(rec["messages"]["rejected"][-1]["content"] == rec["rejected"] for rec in records)

    other = tmp_path / "other"
    assert run_cli("--workspace", str(other), "init", "--model", str(tiny_gguf)).exit_code == 0
    r = run_cli("--workspace", str(other), "pairs", "import", str(out))
    assert r.exit_code == 0 and "Imported 3 pairs (0 already present)" in r.stdout
    assert (
        "Imported 0 pairs (3 already present)"
        in run_cli("--workspace", str(other), "pairs", "import", str(out)).stdout
    )
    again = tmp_path / "again.jsonl"
    assert run_cli("--workspace", str(other), "pairs", "export", str(again)).exit_code == 0
    assert again.read_text() == out.read_text()  # byte for byte: nothing lost or changed on the way

    third = tmp_path / "third"
    assert run_cli("--workspace", str(third), "init", "--model", str(tiny_gguf)).exit_code == 0
    bad = tmp_path / "bad.jsonl"
    lines = out.read_text().splitlines()
    bad.write_text(lines[0] + "\n" + lines[1] + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    r = run_cli("--workspace", str(third), "pairs", "import", str(bad))
    assert r.exit_code != 0 and "line 3 has no non-empty string field 'rejected'" in r.stderr
    assert Workspace.open(third).count("pairs") == 0  # all or nothing


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--max-tokens", "0"), "--max-tokens must be between 1 and 4096, not 0."),
        (("--max-tokens", "5000"), "--max-tokens must be between 1 and 4096, not 5000."),
        (("--top-p", "0"), "--top-p must be in (0, 1], not 0.0."),
        (("--temperature", "-1"), "--temperature must be between 0 and 5, not -1.0."),
        (("--per-prompt", "0"), "--per-prompt must be between 1 and 64, not 0."),
        (("--candidates", "100"), "--candidates must be between 1 and 64, not 100."),
        (("--no-score", "--min-pmi", "0.5"), "--min-pmi needs scoring; drop --no-score."),
        (("--strategy", "nonsense"), "Invalid value for '--strategy'"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(ws_dir, tiny_gguf, flags, message):
    _setup(tiny_gguf)
    r = run_cli("pairs", *flags)
    assert r.exit_code == 2 and message in r.stderr
    assert Workspace.open(ws_dir).count("pairs") == 0


def test_no_contexts_or_prompts(ws_dir, tiny_gguf):
    assert run_cli("init", "--model", str(tiny_gguf)).exit_code == 0
    r = run_cli("pairs")
    assert r.exit_code == 2 and "Error: There are no contexts yet." in r.stderr
    r = run_cli("prompts", "synth", "--n", "2")
    assert r.exit_code == 2 and "There are no contexts yet: synthesis needs to know who you are." in r.stderr
    run_cli("context", "add", "I am Ana.")
    r = run_cli("pairs")
    assert r.exit_code == 2 and "Error: There are no prompts yet." in r.stderr
    r = run_cli("pairs", "--strategy", "random-prompt")
    assert r.exit_code == 2 and "no prompts" in r.stderr


def test_cancelling_keeps_finished_chunks_and_frees_the_job(tiny_workspace):
    """Closing the job generator (what Ctrl-C does through `drive`) keeps every committed chunk."""
    tiny_workspace.add_context("I am Ana.")
    tiny_workspace.add_prompts([f"Question number {i}?" for i in range(40)])
    settings = mipo_pairs.PairSettings(max_tokens=4, temperature=0.8, batch_size=8, per_prompt=1)
    gen = mipo_pairs.generate_pairs(tiny_workspace, settings)
    for event in gen:
        if getattr(event, "done", 0) > 0:
            break
    gen.close()
    assert tiny_workspace.count("pairs") == mipo_pairs.CHUNK_PAIRS
    assert tiny_workspace.running_jobs() == []
    events = list(mipo_pairs.generate_pairs(tiny_workspace, settings))
    assert any("16 of 40 pairs already done" in getattr(e, "message", "") for e in events)
    assert tiny_workspace.count("pairs") == 40


def test_clean_candidate_keeps_questions_and_drops_chatter():
    assert clean_candidate(" How can I save money on my phone bill?\n\nNote: I am 27") == (
        "How can I save money on my phone bill?"
    )
    assert clean_candidate("1. what should I cook for my kids tonight? And then") == (
        "What should I cook for my kids tonight?"
    )
    assert clean_candidate('"Suggest a weekend plan for a rainy day in Porto."') == (
        "Suggest a weekend plan for a rainy day in Porto."
    )
    for junk in (
        "What is your favorite medicine?",
        "what are you doing?",
        "Sure! Here is a question you could ask?",
        "I love the sea.",
        "Why?",
        "",
        EXAMPLES[0][2],
    ):
        assert clean_candidate(junk) is None, junk
    context = "I am Ana, a vegan chef in Lisbon who loves surfing."
    assert copies_context("I am Ana, a vegan chef in Lisbon?", context)
    assert not copies_context("Where can I surf near Lisbon in winter?", context)
    assert few_shot_text(context, "food").endswith(f"Note: {context}\nTopic: food\nQuestion:")


def test_synth_on_the_tiny_model_stores_only_clean_questions(ws_dir, tiny_gguf):
    """The random tiny model writes noise: whatever it adds must still pass the filters."""
    _setup(tiny_gguf, prompts=())
    r = run_cli("prompts", "synth", "--n", "2")
    assert r.exit_code == 0, r.output
    ws = Workspace.open(ws_dir)
    synthetic = ws.prompts(source="synthetic")
    assert f"Added {len(synthetic)} synthetic prompts." in r.stdout
    assert all(clean_candidate(p.text) == p.text for p in synthetic)
    assert (
        ws.get_config("synth.next_attempt") == 16
    )  # one batch of 16 tries (n * 8); a rerun goes on from there
    r = run_cli("prompts", "synth", "--n", "0")
    assert r.exit_code == 2 and "--n must be between 1 and 1000, not 0." in r.stderr


def test_every_command_has_help():
    for args in (["pairs"], ["pairs", "list"], ["pairs", "show"], ["pairs", "rm"], ["pairs", "regenerate"],
                 ["pairs", "export"], ["pairs", "import"], ["prompts", "synth"]):  # fmt: skip
        r = run_cli(*args, "--help")
        assert r.exit_code == 0 and len(r.stdout.split("\n\n")[1].strip()) > 20, args
    text = run_cli("pairs", "--help").stdout
    for flag in ("--strategy", "--per-prompt", "--candidates", "--temperature", "--top-p", "--max-tokens",
                 "--seed", "--score / --no-score", "--min-pmi"):  # fmt: skip
        assert flag in text


@pytest.mark.slow
def test_synth_on_the_default_model_adds_plausible_questions(ws_dir, default_f16_gguf):
    assert run_cli("init").exit_code == 0
    context = "I am Ana, a vegan chef in Lisbon. I love surfing and I always want short answers."
    run_cli("context", "add", context)
    r = run_cli("prompts", "synth", "--n", "4", "--seed", "1")
    assert r.exit_code == 0 and "Added 4 synthetic prompts." in r.stdout, r.output
    synthetic = Workspace.open(ws_dir).prompts(source="synthetic")
    assert len(synthetic) == 4 and len({p.text.casefold() for p in synthetic}) == 4
    assert all(clean_candidate(p.text) == p.text and not copies_context(p.text, context) for p in synthetic)
