"""EvalPlot: an evaluation drawn in the terminal: the run's held-out accuracy per step, and context PMI."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual_plotext import PlotextPlot


class EvalPlot(Horizontal):
    def compose(self) -> ComposeResult:
        yield PlotextPlot(id="eval-curve", classes="eval-plot")
        yield PlotextPlot(id="eval-bars", classes="eval-plot")

    def show(self, log: list[dict], report: dict) -> None:
        """`log`: the run's log lines; `report`: the evaluation (as stored) of an export of that run."""
        curve = self.query_one("#eval-curve", PlotextPlot).plt
        curve.clear_data()
        curve.clear_figure()
        drawn = 0
        for kind, label in (("train", "train"), ("eval", "held-out")):
            points = [(x["step"], x["accuracy"]) for x in log if x["kind"] == kind and "accuracy" in x]
            if points:
                curve.plot(*zip(*points, strict=True), label=label, marker="braille")
                drawn += 1
        curve.title("reward accuracy per step" if drawn else "reward accuracy: the run logged no steps")
        bars = self.query_one("#eval-bars", PlotextPlot).plt
        bars.clear_data()
        bars.clear_figure()
        bars.title("context sensitivity (PMI, nats)")
        values = [report["base"]["pmi"], report["personalized"]["pmi"]]
        names = [f"{name} {value:+.2f}" for name, value in zip(("base", "personalized"), values, strict=True)]
        bars.bar(names, values, width=0.4)
        for plot in self.query(PlotextPlot):
            plot.refresh()
