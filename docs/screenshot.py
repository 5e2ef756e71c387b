"""Draw docs/screenshot.svg: the real app (Textual's own SVG screenshot) on a workspace with the embedded
default model, two contexts and a few prompts, at 100x32.

    python docs/screenshot.py            # writes docs/screenshot.svg
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mipo_local import modelsource  # noqa: E402
from mipo_local.workspace import Workspace  # noqa: E402
from tui.app import MipoApp  # noqa: E402
from tui.screens.onboarding import ONBOARDED_KEY  # noqa: E402

CONTEXTS = [
    ("me", "I am Ana, a vegan chef in Lisbon. I like short, practical answers."),
    ("style", "Answer as a bulleted list, and end with one idea I could try this week."),
]
PROMPTS = [
    "What should I cook tonight?",
    "How do I plan a week of lunches?",
    "Which knife should I buy first?",
    "How do I keep basil alive on a balcony?",
]


async def _shoot(ws: Workspace, out: Path) -> None:
    app = MipoApp(ws)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        await pilot.press("1")
        await pilot.pause(0.5)
        app.save_screenshot(filename=out.name, path=str(out.parent))


def main() -> None:
    out = ROOT / "docs" / "screenshot.svg"
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(Path(tmp) / "ws", create=True)
        modelsource.set_base_model(ws, None)  # the embedded default model
        for label, text in CONTEXTS:
            ws.add_context(text, label=label)
        ws.add_prompts(PROMPTS)
        ws.set_config(ONBOARDED_KEY, True)
        try:
            asyncio.run(_shoot(ws, out))
        finally:
            ws.close()
    print(f"wrote {out}")  # noqa: T201


if __name__ == "__main__":
    main()
