"""What the analyses' figures and tables share: matplotlib without a display, a figure written to a PNG, and a
``mean ± std`` table cell over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["mean_std", "mean_std_cell", "pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    from hopfield.plot import plt

    return plt


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` (`hopfield.plot.save_figure`: a PNG unless the suffix says otherwise, parent
    folders made, whole or not at all), close it and return the path."""
    from hopfield import plot

    fig.tight_layout()
    return plot.save_figure(fig, path, dpi=110, bbox_inches="tight")  # keeps a legend beside the axes


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std) of the seeds' values; the std of one value is 0."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std_cell(values: Sequence[float], fmt: str = ".2f", std_fmt: str | None = None) -> str:
    """A table cell ``mean ± std`` over seeds; one seed has no spread, so its cell is the value alone (a
    "± 0" would read as a measured zero spread)."""
    mean, std = mean_std(values)
    return f"{mean:{fmt}}" + (f" ± {std:{std_fmt or fmt}}" if len(values) > 1 else "")
