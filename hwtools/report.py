"""Comparison tables and plots built only from runs' summary.json (and metrics.jsonl for curves)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

from hwtools import plots
from hwtools.report_plots import loss_panels
from hwtools.train.tracking import read_metrics

logger = logging.getLogger(__name__)
MISSING = "-"


def load_runs(run_dirs: Sequence[Path]) -> list[tuple[Path, dict]]:
    """(run_dir, summary) for every dir holding a readable summary.json; others are skipped with a warning."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "summary.json"
        try:
            runs.append((Path(d), json.loads(path.read_text(encoding="utf-8"))))
        except FileNotFoundError:
            logger.warning("skipping %s: no summary.json", d)
        except (json.JSONDecodeError, OSError) as e:
            logger.warning("skipping %s: unreadable summary.json (%s)", d, e)
    return runs


def _get(summary: dict, dotted: str):
    cur = summary
    for part in dotted.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return None
        cur = cur[part]
    return cur


# (column title, dotted path in summary.json or a function of the summary, format)
Column = tuple[str, "str | Callable[[dict], object]", str]

def llm_label(summary: dict) -> str:
    """The method, plus the embedding rows it also trained (--trainable-tokens) so such a run gets its own row."""
    tokens = summary.get("trainable_tokens")
    return f"{summary.get('method')} +tokens({tokens})" if tokens else str(summary.get("method"))


LLM_COLUMNS: list[Column] = [
    ("method", llm_label, "s"),
    ("model", "model", "s"),
    ("trainable params", "params.trainable", ",d"),
    ("trainable %", "params.trainable_pct", ".4f"),
    ("peak memory (MB)", "resources.peak_memory_mb", ",.0f"),
    ("memory kind", "resources.memory_kind", "s"),
    ("train time (s)", "resources.train_time_s", ",.1f"),
    ("tokens/s", "resources.throughput", ",.1f"),
    ("steps", "train.steps", "d"),
    ("final train loss", "train.final_loss", ".4f"),
    ("eval loss", "eval.loss", ".4f"),
    ("test perplexity", "test.perplexity", ",.2f"),
    ("chrF before", "test.base_chrf", ".2f"),
    ("chrF after", "test.chrf", ".2f"),
]

CAPTION_COLUMNS: list[Column] = [
    ("arch", "arch", "s"),
    ("encoder", "model", "s"),
    ("trainable params", "params.trainable", ",d"),
    ("total params", "params.total", ",d"),
    ("train time (s)", "resources.train_time_s", ",.1f"),
    ("images/s", "resources.throughput", ",.1f"),
    ("peak memory (MB)", "resources.peak_memory_mb", ",.0f"),
    ("final train loss", "train.final_loss", ".4f"),
    ("val loss", "eval.loss", ".4f"),
    ("BLEU-1", "test.bleu1", ".4f"),
    ("BLEU-2", "test.bleu2", ".4f"),
    ("BLEU-3", "test.bleu3", ".4f"),
    ("BLEU-4", "test.bleu4", ".4f"),
    ("METEOR", "test.meteor", ".4f"),
    ("ROUGE-L", "test.rouge_l", ".4f"),
    ("CIDEr", "test.cider", ".4f"),
]


def _cell(summary: dict, getter, fmt: str) -> str:
    value = getter(summary) if callable(getter) else _get(summary, getter)
    if value is None:
        return MISSING
    try:
        return format(value, fmt) if fmt != "s" else str(value)
    except (TypeError, ValueError):
        return str(value)


def newest_per_key(runs, key: Callable[[dict], tuple]):
    """Keep the newest run (by summary mtime) for each key, e.g. one row per method."""
    best: dict = {}
    for run_dir, summary in runs:
        k = key(summary)
        mtime = (run_dir / "summary.json").stat().st_mtime
        if k not in best or mtime > best[k][0]:
            best[k] = (mtime, run_dir, summary)
    return [(d, s) for _, d, s in best.values()]


def table_rows(runs, columns: list[Column], sort_key: Callable[[dict], object]) -> list[list[str]]:
    ordered = sorted(runs, key=lambda r: sort_key(r[1]))
    return [[_cell(s, getter, fmt) for _, getter, fmt in columns] for _, s in ordered]


def write_table(columns: list[Column], rows: list[list[str]], md_path: Path, csv_path: Path, title: str) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    names = [c[0] for c in columns]
    lines = [f"# {title}", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows(rows)


def loss_curve_series(runs, label: Callable[[dict], str]) -> dict:
    """{'<label> train': (steps, losses), '<label> eval': (...)} from each run's metrics.jsonl."""
    series = {}
    for run_dir, summary in runs:
        events = read_metrics(run_dir)
        for split in ("train", "eval"):
            pts = [(e["step"], e["loss"]) for e in events if e.get("split") == split and e.get("loss") is not None]
            if pts:
                series[f"{label(summary)} {split}"] = ([p[0] for p in pts], [p[1] for p in pts])
    return series


def run_curves(run_dir: Path, x: str = "step") -> dict:
    """{"train": (xs, losses), "eval": (xs, losses)} of one run; an eval logged twice at one step counts once."""
    curves = {}
    for split in ("train", "eval"):
        pts = {}
        for e in read_metrics(run_dir):
            if e.get("split") == split and e.get("loss") is not None and e.get(x) is not None:
                pts[e[x]] = e["loss"]
        curves[split] = (list(pts), list(pts.values()))
    return curves


def _trainable(summary) -> float:
    value = _get(summary, "params.trainable")
    return float("inf") if value is None else value


def write_llm_comparison(runs, out_dir: Path) -> Optional[Path]:
    """results/llm_comparison.md|csv, llm_loss_curves.png and llm_resources.png; one row per (method, model)."""
    runs = newest_per_key([r for r in runs if r[1].get("task") == "llm"], lambda s: (llm_label(s), s.get("model")))
    if not runs:
        return None
    rows = table_rows(runs, LLM_COLUMNS, sort_key=lambda s: (_trainable(s), llm_label(s)))
    md = Path(out_dir) / "llm_comparison.md"
    write_table(LLM_COLUMNS, rows, md, md.with_suffix(".csv"), "Fine-tuning methods compared")
    ordered = sorted(runs, key=lambda r: (_trainable(r[1]), llm_label(r[1])))
    loss_panels({llm_label(s): run_curves(d) for d, s in ordered}, Path(out_dir) / "llm_loss_curves.png",
                title="LLM loss per method (fewest trainable parameters first)", xlabel="optimizer step")
    plots.metric_panels(
        [llm_label(s) for _, s in ordered],
        {
            "peak memory (MB)": [_get(s, "resources.peak_memory_mb") for _, s in ordered],
            "train time (s)": [_get(s, "resources.train_time_s") for _, s in ordered],
            "trainable params (log)": [_get(s, "params.trainable") for _, s in ordered],
        },
        Path(out_dir) / "llm_resources.png",
    )
    return md


def write_caption_comparison(runs, out_dir: Path) -> Optional[Path]:
    """results/caption_comparison.md|csv and caption_loss_curves.png; one row per (arch, encoder)."""
    runs = newest_per_key(
        [r for r in runs if r[1].get("task") == "caption"], lambda s: (s.get("arch"), s.get("model"))
    )
    if not runs:
        return None
    order = {"cnn-rnn": 0, "attention": 1, "transformer": 2}
    rows = table_rows(runs, CAPTION_COLUMNS, sort_key=lambda s: (order.get(s.get("arch"), 9), str(s.get("arch"))))
    md = Path(out_dir) / "caption_comparison.md"
    write_table(CAPTION_COLUMNS, rows, md, md.with_suffix(".csv"), "Captioning architectures compared")
    ordered = sorted(runs, key=lambda r: (order.get(r[1].get("arch"), 9), str(r[1].get("arch"))))
    loss_panels({str(s.get("arch")): run_curves(d, x="epoch") for d, s in ordered},
                Path(out_dir) / "caption_loss_curves.png", title="Captioning loss per architecture",
                xlabel="epoch", cols=3)
    return md
