"""SampleAnswers: a few held-out prompts with the base's and the personalized model's answers side by side."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static


class SampleAnswers(Vertical):
    def show(self, samples: list[dict]) -> None:
        """`samples`: report samples ({"prompt", "base", "personalized", ...}), shown in this order."""
        self.remove_children()
        self.mount_all(self._sample(i, s) for i, s in enumerate(samples, start=1))

    def _sample(self, number: int, sample: dict) -> Vertical:
        prompt = Static(f"{number}. {sample['prompt']}", classes="sample-prompt", markup=False)
        sides = Horizontal(
            *(
                Vertical(
                    Static(title, classes="sample-title"),
                    Static(sample[key].strip() or "(empty answer)", classes="pair-text", markup=False),
                    classes="pair-side",
                )
                for key, title in (("base", "base"), ("personalized", "personalized"))
            ),
            classes="sample-sides",
        )
        return Vertical(prompt, sides, classes="sample")

    def compose(self) -> ComposeResult:
        yield from ()
