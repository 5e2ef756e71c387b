"""The user's own choices as pairs, through the real CLI: `pairs review`, `feedback list|rm`, `status`, chat
thumbs (/good, /bad, /better), JSONL round trip, and that no rerun or regenerate overwrites them."""

import json

from mipo_local import pairs_store, user_pairs
from mipo_local.workspace import Workspace
from tests.clihelp import run_cli
from tests.test_pairs_cli import FAST, _setup


def _rows(ws_dir):
    ws = Workspace.open(ws_dir)
    return {r["id"]: dict(r) for r in ws.query("SELECT * FROM pairs ORDER BY id")}


def test_review_keep_swap_edit_drop_and_nothing_overwrites_them(ws_dir, tiny_gguf, tmp_path):
    _setup(tiny_gguf, prompts=("What should I cook?", "Any dessert idea?", "How do I plan my week?", "Tea?"))
    assert run_cli("pairs", *FAST, "--seed", "3").exit_code == 0
    before = _rows(ws_dir)
    ws = Workspace.open(ws_dir)
    # Reference log-probs cached for pair 2 describe its answers; a swap must forget them.
    with ws.transaction() as conn:
        conn.execute("INSERT INTO ref_logps VALUES (2, 'sha', 'torch', 96, -1.0, -2.0)")

    r = run_cli("pairs", "review", "1", "--keep")
    assert r.exit_code == 0 and "Kept pair 1; it is yours now (source user)." in r.stdout
    r = run_cli("pairs", "review", "2", "--swap")
    assert r.exit_code == 0 and "Swapped chosen and rejected of pair 2" in r.stdout
    answer = tmp_path / "better.txt"
    answer.write_text("Ahoy! Try a chickpea stew.\r\n")
    assert run_cli("pairs", "review", "3", "--chosen-file", str(answer)).exit_code == 0
    r = run_cli("pairs", "review", "4", "--drop")
    assert r.exit_code == 0 and "Dropped pair 4" in r.stdout

    after = _rows(ws_dir)
    assert after[1] == {**before[1], "source": "user", "origin": "review"}
    assert (after[2]["chosen"], after[2]["rejected"]) == (before[2]["rejected"], before[2]["chosen"])
    assert after[2]["pmi_margin"] == -before[2]["pmi_margin"]
    swapped = json.loads(after[2]["scores"])
    assert swapped["pmi_chosen"] == json.loads(before[2]["scores"])["pmi_rejected"]
    assert ws.query("SELECT COUNT(*) FROM ref_logps WHERE pair_id = 2")[0][0] == 0
    assert (
        after[3]["chosen"] == "Ahoy! Try a chickpea stew." and after[3]["rejected"] == before[3]["rejected"]
    )
    assert after[3]["scores"] is None and after[3]["pmi_margin"] is None  # they measured the old answer
    assert 4 not in after and all(after[i]["source"] == "user" for i in (1, 2, 3))

    # A rerun of the same pairs neither overwrites a reviewed pair nor samples the dropped one again.
    r = run_cli("pairs", *FAST, "--seed", "3")
    assert r.exit_code == 0 and "0 new pairs (4 already done" in r.stdout, r.output
    assert _rows(ws_dir) == after
    r = run_cli("pairs", "regenerate", "2")
    assert r.exit_code == 2 and "Pair 2 was made by you; only generated pairs can be regenerated." in r.stderr

    listing = run_cli("feedback", "list").stdout
    assert listing.splitlines()[0].split() == ["id", "from", "prompt", "chosen", "rejected"]
    assert len(listing.splitlines()) == 4 and "review" in listing and "chickpea" in listing
    assert "Pairs:      3 (3 yours)" in run_cli("status").stdout
    sources = [line.split()[1] for line in run_cli("pairs", "list").stdout.splitlines()[1:]]
    assert sources == ["user"] * 3
    assert "Pair 3 (random-context, seed " in (shown := run_cli("pairs", "show", "3").stdout)
    assert ", yours from review)" in shown and "chickpea" in shown

    # JSONL keeps them the user's, and an import into another workspace reads them back as such.
    out = tmp_path / "pairs.jsonl"
    assert run_cli("pairs", "export", str(out)).exit_code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(rec["mipo"]["source"], rec["mipo"]["origin"]) for rec in records] == [("user", "review")] * 3
    other = tmp_path / "other"
    assert run_cli("--workspace", str(other), "init", "--model", str(tiny_gguf)).exit_code == 0
    assert run_cli("--workspace", str(other), "pairs", "import", str(out)).exit_code == 0
    imported = user_pairs.list_user_pairs(Workspace.open(other))
    assert [(p.chosen, p.origin) for p in imported] == [(after[i]["chosen"], "review") for i in (1, 2, 3)]

    r = run_cli("feedback", "rm", "2")
    assert r.exit_code == 0 and "Removed your pair 2." in r.stdout
    assert sorted(_rows(ws_dir)) == [1, 3]


def test_review_refuses_bad_input_and_changes_nothing(ws_dir, tiny_gguf, tmp_path):
    _setup(tiny_gguf, prompts=("What should I cook?",))
    assert run_cli("pairs", *FAST).exit_code == 0
    before = _rows(ws_dir)
    cases = [
        (("1",), "Give exactly one of --keep, --drop, --swap, --chosen or --chosen-file."),
        (
            ("1", "--keep", "--chosen", "Hi"),
            "Give exactly one of --keep, --drop, --swap, --chosen or --chosen-file.",
        ),
        (("1", "--chosen", "   "), "The chosen answer is empty: write the answer you want."),
        (("1", "--chosen", "a\x00b"), "The chosen answer contains a control character (U+0000)"),
        (("1", "--chosen", before[1]["rejected"]), "The chosen answer is the same as the rejected one"),
        (
            ("1", "--chosen-file", str(tmp_path / "missing.txt")),
            f"File not found: {tmp_path / 'missing.txt'}.",
        ),
        (("9", "--keep"), "There is no pair with id 9."),
    ]
    for args, message in cases:
        r = run_cli("pairs", "review", *args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
        assert r.stderr.count("Error:") == 1
    r = run_cli("feedback", "rm", "1")  # a generated pair is not the user's to remove here
    assert r.exit_code == 2 and "There is no pair of yours with id 1" in r.stderr
    assert _rows(ws_dir) == before
    assert "No pairs of yours yet" in run_cli("feedback", "list").stdout


def _setup_chat(tiny_gguf):
    """A workspace whose pairs recipe (short, warm answers) the chat's sampled answers follow."""
    _setup(tiny_gguf, prompts=("What should I cook?",))
    assert run_cli("pairs", *FAST).exit_code == 0


def test_chat_bad_then_better_stores_a_pair(ws_dir, tiny_gguf):
    _setup_chat(tiny_gguf)
    r = run_cli(
        "chat",
        "--model",
        "base",
        "--max-tokens",
        "6",
        input="/good\nHello?\n/bad\nn\n/better Ahoy, Ana!\n/quit\n",
    )
    assert r.exit_code == 0, r.output
    assert "There is no answer to mark yet" in r.stdout  # /good before any answer stores nothing
    assert "--- sampled ---" in r.stdout and "Nothing saved." in r.stdout  # /bad: sampled, declined
    mine = user_pairs.list_user_pairs(Workspace.open(ws_dir))
    assert len(mine) == 1 and f"Saved pair {mine[0].id} (yours)" in r.stdout
    p = mine[0]
    assert (p.source, p.origin, p.prompt, p.chosen) == ("user", "chat", "Hello?", "Ahoy, Ana!")
    assert p.context == "I am Ana, a vegan chef in Lisbon." and p.rejected.strip() and p.rejected != p.chosen


def test_chat_bad_accepted_and_good_sample_the_other_side(ws_dir, tiny_gguf):
    _setup_chat(tiny_gguf)
    r = run_cli(
        "chat", "--model", "base", "--max-tokens", "6", input="Hello?\n/bad\ny\nAnd then?\n/good\n/quit\n"
    )
    assert r.exit_code == 0, r.output
    ws = Workspace.open(ws_dir)
    bad, good = user_pairs.list_user_pairs(ws)
    sampled = r.stdout.split("--- sampled ---\n")[1].split("\n---")[0]
    assert bad.prompt == "Hello?" and bad.chosen == sampled.strip() and bad.rejected != bad.chosen
    # /good: the answer is the chosen one; the rejected one was sampled under a random other persona.
    assert good.prompt == "And then?" and good.strategy == "random-context"
    assert good.neg_context and good.neg_context != good.context and good.settings["max_tokens"] == 8
    assert good.chosen in r.stdout
    assert pairs_store.get_pair(ws, good.id).origin == "chat"
