"""Training curves and evaluation numbers as a PNG file (matplotlib) and as terminal text (plotext)."""

from __future__ import annotations

from pathlib import Path

from .fsutil import atomic_path


def _series(log: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(x["step"], x[key]) for x in log if x["kind"] == kind and key in x]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_plot_png(log: list[dict], report, target: Path) -> Path:
    """Loss, reward margin and accuracy per step (train and held-out), plus the evaluation bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in zip(
        axes[:3],
        ("loss", "margin", "accuracy"),
        ("DPO loss", "reward margin", "reward accuracy"),
        strict=True,
    ):
        for kind, style in (("train", "-"), ("eval", "o-")):
            xs, ys = _series(log, kind, key)
            if xs:
                ax.plot(xs, ys, style, label=kind if kind == "train" else "held-out", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:  # a run without metrics yet has no lines to name
            ax.legend(fontsize=8)
    if report is not None:
        ax = axes[3]
        names = ["context PMI\n(base)", "context PMI\n(personalized)"]
        ax.bar(names, [report.base.pmi, report.personalized.pmi], color=["#999999", "#3b7dd8"])
        ax.set_title(f"pair acc {report.pair_accuracy:.2f}, drift {report.drift * 100:+.1f}%")
    fig.tight_layout()
    with atomic_path(Path(target)) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(target)


def training_plot_text(log: list[dict], width: int = 80, height: int = 16) -> str:
    """The loss curve drawn with plotext for the terminal."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    for kind, label in (("train", "train loss"), ("eval", "held-out loss")):
        xs, ys = _series(log, kind, "loss")
        if xs:
            plt.plot(xs, ys, label=label)
    plt.title("DPO loss")
    plt.theme("clear")
    return plt.build()
