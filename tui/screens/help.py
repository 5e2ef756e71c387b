"""HelpScreen: the journey and the keys, in one page."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Markdown

from ..sections import SECTIONS

HELP = """\
# mipo-local

Personalize a small local model with **MIPO**: your contexts and prompts become preference pairs
(an answer written with your context against one written for someone else), a LoRA is trained on
them with DPO, and the result is exported as a GGUF for llama.cpp or Ollama. Nothing leaves this machine.

## Sections

{sections}

## Keys

| key | what it does |
|---|---|
| `1`..`{last}` | go to a section |
| `?` / `f1` | this help |
| `ctrl+p` | command palette (every section and action by name) |
| `ctrl+q` | quit: a running job stops after its current step and is offered again next time |
| `escape` | close a dialog |

Each section lists its own keys in the footer. Long work (pairs, training) runs in the background;
the app stays usable, and cancelling keeps what is finished.
"""

WHAT = {
    "profile": "who you are: your contexts, and the base model",
    "prompts": "the questions you ask: add, import a file, synthesize, search",
    "pairs": "generate preference pairs, inspect their PMI scores; review them: k keep, x drop, s swap, e edit",
    "train": "LoRA DPO training with live loss, reward margin and accuracy",
    "evaluate": "before/after numbers and a blind A/B test of your own (each pick trains the next run)",
    "export": "a personalized GGUF, an adapter, an Ollama Modelfile",
    "chat": "talk to the exported model, side by side with the base; ctrl+g / ctrl+b: a good / bad answer",
}


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        sections = "\n".join(f"- `{key}` **{title}**: {WHAT.get(mode, '')}" for key, mode, title in SECTIONS)
        with VerticalScroll(id="help"):
            yield Markdown(HELP.format(sections=sections, last=SECTIONS[-1][0]))
        yield Footer()
