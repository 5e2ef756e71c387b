"""The user's choices in the app: reviewing pairs in the Pairs section (keep, drop, swap, edit in a TextArea)
and marking chat answers good or bad, each checked in the stored rows."""

from __future__ import annotations

from textual.widgets import DataTable, TextArea

from mipo_local import pairs_store, user_pairs
from mipo_local.settings import PairSettings
from tests.test_pairs import _run
from tests.test_tui_core import drive, settle
from tests.test_tui_pairs import _fill
from tests.tuihelp import chat_hello

WARM = PairSettings(max_tokens=8, temperature=0.8, batch_size=8, per_prompt=1)


def _rows(ws):
    return {r["id"]: dict(r) for r in ws.query("SELECT * FROM pairs ORDER BY id")}


def test_review_swap_edit_keep_and_drop_in_the_pairs_section(tiny_workspace):
    _fill(tiny_workspace, n_prompts=2)
    _run(tiny_workspace, WARM)
    before = _rows(tiny_workspace)
    assert sorted(before) == [1, 2, 3, 4]
    better = "Ahoy Ana!\nA chickpea stew, slow and simple."

    async def scenario(app, pilot):
        await pilot.press("3")
        table = app.screen.query_one("#pairs", DataTable)
        await pilot.press("s")  # pair 1: swap
        await pilot.press("down", "e")  # pair 2: edit its chosen answer
        assert type(app.screen).__name__ == "EditTextScreen"
        editor = app.screen.query_one("#text", TextArea)
        assert editor.text == before[2]["chosen"]
        editor.text = better
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert type(app.screen).__name__ == "PairsScreen"
        await pilot.press("down", "k")  # pair 3: keep
        await pilot.press("down", "x")  # pair 4: drop
        await pilot.pause()
        assert table.row_count == 3
        assert [table.get_row_at(i)[1] for i in range(3)] == ["you", "you", "you"]

    notes = drive(tiny_workspace.root, scenario)
    after = _rows(tiny_workspace)
    assert (after[1]["chosen"], after[1]["rejected"]) == (before[1]["rejected"], before[1]["chosen"])
    assert after[2]["chosen"] == better and after[2]["rejected"] == before[2]["rejected"]
    assert after[2]["scores"] is None
    assert after[3] == {**before[3], "source": "user", "origin": "review"}
    assert 4 not in after and all(
        after[i]["source"] == "user" and after[i]["origin"] == "review" for i in after
    )
    assert {"Swapped pair 1. It is yours now.", "Dropped pair 4."} <= {n.message for n in notes}
    # The dropped pair stays dropped on a rerun; the reviewed ones keep the user's answers.
    _run(tiny_workspace, WARM)
    assert _rows(tiny_workspace) == after


def test_chat_keys_mark_the_last_answer_good_or_bad(tiny_workspace):
    _fill(tiny_workspace, n_prompts=1)
    _run(tiny_workspace, WARM)  # the pairs recipe the sampled answers follow
    better = "Ahoy! Here is what I wanted."

    async def scenario(app, pilot):
        await chat_hello(app, pilot, max_tokens=6)
        await pilot.press("ctrl+g")
        await settle(app, pilot)
        await pilot.press("ctrl+b")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "EditTextScreen"  # a fresh answer under the user's context
        editor = app.screen.query_one("#text", TextArea)
        assert editor.text.strip()
        editor.text = better
        await pilot.press("ctrl+s")
        await pilot.pause()
        return app.screen.sessions["personalized"].history[-1]["content"]

    answers = []

    async def run(app, pilot):
        answers.append(await scenario(app, pilot))

    notes = drive(tiny_workspace.root, run)
    (answer,) = answers
    good, bad = user_pairs.list_user_pairs(tiny_workspace)
    assert (good.prompt, good.chosen, good.origin, good.strategy) == (
        "hello",
        answer,
        "chat",
        "random-context",
    )
    assert good.rejected and good.neg_context
    assert (bad.prompt, bad.chosen, bad.rejected, bad.origin) == ("hello", better, answer, "chat")
    assert pairs_store.get_pair(tiny_workspace, bad.id).context == user_pairs.user_context(tiny_workspace)
    assert any(f"Saved pair {bad.id}" in n.message for n in notes)
