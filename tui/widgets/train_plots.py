"""TrainPlots: loss, reward margin and accuracy of a run, drawn from its run log (train and held-out)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual_plotext import PlotextPlot

CURVES = [("loss", "DPO loss"), ("margin", "reward margin"), ("accuracy", "accuracy")]


class TrainPlots(Vertical):
    def compose(self) -> ComposeResult:
        for key, _ in CURVES:
            yield PlotextPlot(id=f"plot-{key}", classes="train-plot")

    _log: list[dict] = []

    def on_mount(self) -> None:
        self.show(self._log)  # the screen may have shown a run before this widget mounted

    def show(self, log: list[dict]) -> None:
        """Plot the run log's `train` lines, and its held-out `eval` lines as a second series."""
        self._log = log
        train = [x for x in log if x["kind"] == "train"]
        held = [x for x in log if x["kind"] == "eval"]
        for key, title in CURVES:
            plot = self.query_one(f"#plot-{key}", PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            plt.clear_figure()
            plt.title(title)
            if train:
                plt.plot([x["step"] for x in train], [x[key] for x in train], label="train", marker="braille")
            if held:
                plt.plot(
                    [x["step"] for x in held], [x[key] for x in held], label="held-out", marker="braille"
                )
            plot.refresh()
