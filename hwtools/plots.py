"""Every figure hwtools draws. Matplotlib with the Agg backend, so plots work on headless machines."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path) -> Path:
    """Lay out, write (110 dpi, parent folders made) and close `fig` -> its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, title="loss", xlabel="step"):
    """One line per named series of (x, y); names ending in 'eval' are drawn with markers."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (xs, ys) in series.items():
        if len(xs) == 0:
            continue
        style = "o--" if "eval" in name else "-"
        ax.plot(list(xs), list(ys), style, label=name, markersize=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def run_loss_curves(events: Sequence[Mapping], path, title="loss"):
    """A run's train and eval loss against the step, from its metrics.jsonl events."""
    series = {split: ([e["step"] for e in events if e.get("split") == split and "loss" in e],
                      [e["loss"] for e in events if e.get("split") == split and "loss" in e])
              for split in ("train", "eval")}
    return loss_curves(series, path, title=title)


def histogram(values: Sequence[float], path, title="", xlabel="", bins=50):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(list(values), bins=bins, color="#4472c4")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return save_figure(fig, path)


def bar_chart(labels: Sequence[str], values: Sequence[float], path, title="", ylabel="", horizontal=False):
    fig, ax = plt.subplots(figsize=(7, max(3.5, 0.28 * len(labels)) if horizontal else 4))
    if horizontal:
        ax.barh(list(labels)[::-1], list(values)[::-1], color="#4472c4")
        ax.set_xlabel(ylabel)
    else:
        ax.bar(list(labels), list(values), color="#4472c4")
        ax.set_ylabel(ylabel)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set_title(title)
    return save_figure(fig, path)


def scatter(xs: Sequence[float], ys: Sequence[float], path, title="", xlabel="", ylabel="", alpha=0.3):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(list(xs), list(ys), s=6, alpha=alpha)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_figure(fig, path)


def _image_axes(n: int, cols: int, cell: tuple[float, float]):
    """A grid of at most `cols` columns for n images, axes off, each cell `cell` inches (w, h)."""
    cols = min(cols, max(n, 1))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def image_grid(images: Sequence, captions: Sequence[str], path, cols=5, title=""):
    """Images (PIL or HxWxC arrays) with a wrapped caption under each."""
    import textwrap

    fig, axes = _image_axes(len(images), cols, (3.2, 3.6))
    for ax, img, cap in zip(axes.flat, images, captions):
        ax.imshow(img)
        ax.set_title("\n".join(textwrap.wrap(cap, 34)), fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def metric_panels(labels: Sequence[str], panels: Mapping[str, Sequence[float | None]], path, title=""):
    """One bar chart per metric side by side (e.g. memory / time / trainable params per method); None bars are 0."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items()):
        vals = [0 if v is None else v for v in values]
        ax.bar(list(labels), vals, color="#4472c4")
        ax.set_title(name, fontsize=10)
        if name.startswith("trainable"):
            ax.set_yscale("log")
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def caption_samples(images: Sequence, generated: Sequence[str], references: Sequence[Sequence[str]], path,
                    cols=5, max_refs=3, title=""):
    """Images with the generated caption (bold) above up to `max_refs` reference captions, side by side."""
    import textwrap

    fig, axes = _image_axes(len(images), cols, (3.4, 4.6))
    for ax, img, gen, refs in zip(axes.flat, images, generated, references):
        ax.imshow(img)
        ax.set_title("\n".join(textwrap.wrap(f"gen: {gen or '(empty)'}", 36)), fontsize=7.5, fontweight="bold")
        ref_text = "\n".join(textwrap.fill(f"ref: {r}", 42) for r in list(refs)[:max_refs])
        ax.text(0.0, -0.03, ref_text, transform=ax.transAxes, fontsize=6.5, va="top", ha="left")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def attention_maps(image, words: Sequence[str], maps, path, cols=5, title=""):
    """The image, then one panel per word with its attention map (h x w weights) upsampled to the image size and
    overlaid as a heat map scaled to the map's own peak; the title gives the peak weight (1/regions = uniform)."""
    import numpy as np
    from PIL import Image

    base = np.asarray(image)
    height, width = base.shape[:2]
    panels = [("(image)", None)] + list(zip(words, maps))
    cols = min(cols, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows * height / max(width, 1) + 0.4),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (word, weights) in zip(axes.flat, panels):
        ax.imshow(base)
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)
            up = np.asarray(Image.fromarray(weights).resize((width, height), Image.BILINEAR))
            peak = float(weights.max())
            ax.imshow(up, cmap="jet", alpha=0.45, vmin=0, vmax=max(peak, 1e-12))
            word = f"{word} (peak {peak:.2f})"
        ax.set_title(word, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
