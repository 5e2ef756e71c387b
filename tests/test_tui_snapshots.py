"""Snapshots of the main screens at 80x24 (pytest-textual-snapshot). Deterministic: fixed data, no jobs
running (so no spinners or timings), no paths of the temporary workspace on screen.

Update after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from mipo_local import modelsource
from mipo_local.workspace import Workspace
from tests.trainhelp import insert_pairs, signal_pairs
from tui.app import make_app


@pytest.fixture(scope="module")
def filled_ws(tmp_path_factory, tiny_gguf):
    """One workspace for every snapshot of this module (the screens only read it)."""
    ws = Workspace.open(tmp_path_factory.mktemp("snapshots") / "ws", create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    ws.add_context("I am Ana, a vegan chef in Lisbon. I like short answers.", label="me")
    ws.add_context("I cycle to work and read science fiction.")
    ws.add_prompts(["What should I cook tonight?", "Which bike lights should I buy?"])
    ws.add_prompts(["How do I keep basil alive?"], source="import")
    insert_pairs(ws, signal_pairs(3))
    yield ws
    ws.close()


def test_onboarding(snap_compare, tiny_workspace):
    assert snap_compare(make_app(tiny_workspace.root))


@pytest.mark.parametrize("key", ["1", "2", "3", "4", "5", "6", "7"])
def test_section(snap_compare, filled_ws, key):
    assert snap_compare(make_app(filled_ws.root), press=[key])


def test_help(snap_compare, filled_ws):
    assert snap_compare(make_app(filled_ws.root), press=["question_mark"])


def test_pair_detail(snap_compare, filled_ws):
    assert snap_compare(make_app(filled_ws.root), press=["3", "enter"])
