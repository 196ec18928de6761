"""Rebuild results/REPORT.md, the assignment's answers, from the committed runs and explore outputs.

    python launch/report.py                          # results/REPORT.md (+ REPORT.sources.json, report_figures/)
    python launch/report.py --output-dir /tmp/rep    # somewhere else (links still point at this checkout)

Reads results/reference/*/ (summary.json, metrics.jsonl, generations.json, errors.md, figures) and results/explore/
(see launch/explore_*.py), first rebuilding the comparison tables and plots under results/ (launch/compare.py) unless
--no-compare. The prose is hwtools/assets/report_template.md; every number is read from a file and listed with its
source in REPORT.sources.json.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hwtools.config import parse_config
from hwtools.errors import UserError, cli_main

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ReportConfig:
    output_dir: str = field(default="results", metadata={"help": "Where REPORT.md goes (relative to the repo root)."})
    compare: bool = field(default=True, metadata={
        "help": "Rebuild results/llm_comparison.* and caption_comparison.* first (--no-compare to skip)."})


@cli_main
def main(argv=None):
    from hwtools.report import load_runs, write_caption_comparison, write_llm_comparison
    from hwtools.report_build import REF, build_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    cfg = parse_config(ReportConfig, argv)
    refs = sorted(p for p in (ROOT / REF).glob("*") if (p / "summary.json").is_file())
    if not refs:
        raise UserError(f"{ROOT / REF}: no run folder with a summary.json to report on")
    if cfg.compare:
        runs = load_runs(refs)
        write_llm_comparison(runs, ROOT / "results")
        write_caption_comparison(runs, ROOT / "results")
    out = build_report(ROOT, ROOT / cfg.output_dir if not Path(cfg.output_dir).is_absolute() else Path(cfg.output_dir))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
