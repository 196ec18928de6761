"""Comparison figures that read at a glance: one small panel per run, shared axes, train smoothed, eval marked."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hwtools.plots import save_figure  # noqa: E402

Curve = tuple[Sequence[float], Sequence[float]]


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average over up to `window` points (shorter at the ends), so the line does not lag the data."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(len(v))
    lo = np.maximum(0, idx - window // 2)
    hi = np.minimum(len(v), idx + window // 2 + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def loss_panels(runs: Mapping[str, Mapping[str, Curve]], path, title: str = "", xlabel: str = "step",
                cols: int = 4, window: int = 0) -> Path:
    """runs: {panel title: {"train": (x, y), "eval": (x, y)}}. One panel per run with shared y: raw train loss
    faint, its moving average solid, eval as dots; the last eval value is printed in the panel."""
    n = max(1, len(runs))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.3 * rows + 0.5), sharey=True, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, curves) in zip(axes.flat, runs.items()):
        tx, ty = curves.get("train", ([], []))
        if len(tx):
            w = window or max(1, len(tx) // 8)
            ax.plot(tx, ty, color="#4472c4", alpha=0.25, linewidth=0.8)
            ax.plot(tx, smooth(ty, w), color="#4472c4", linewidth=1.6, label=f"train (mean of {w})")
        ex, ey = curves.get("eval", ([], []))
        if len(ex):
            ax.plot(ex, ey, "o-", color="#c0504d", markersize=3.5, linewidth=1, label="validation")
            ax.annotate(f"{ey[-1]:.2f}", (ex[-1], ey[-1]), textcoords="offset points", xytext=(-4, 6), ha="right",
                        fontsize=8, color="#c0504d")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(xlabel, fontsize=7)
    axes.flat[0].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
