"""Build the comparison tables and plots from run directories' summary.json files.

    python launch/compare.py                       # every run under results/runs/
    python launch/compare.py results/reference/*   # the committed reference runs
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hwtools.config import parse_config
from hwtools.errors import UserError, cli_main
from hwtools.report import load_runs, write_caption_comparison, write_llm_comparison


@dataclass
class CompareConfig:
    run_dirs: list[str] = field(default_factory=list, metadata={"help": "Run dirs (default: results/runs/*)."})
    output_dir: str = field(default="results", metadata={"help": "Where the tables and plots go."})


@cli_main
def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    # positional run dirs are the common case: `compare.py DIR DIR ...`
    positional = []
    while argv and not argv[0].startswith("-"):
        positional.append(argv.pop(0))
    cfg = parse_config(CompareConfig, argv)
    dirs = [Path(d) for d in (positional or cfg.run_dirs)]
    if not dirs:
        dirs = sorted(p for p in Path("results/runs").glob("*") if p.is_dir())
    if not dirs:
        raise UserError("no run directories given and none under results/runs/")
    runs = load_runs(dirs)
    if not runs:
        raise UserError(f"none of the {len(dirs)} directories holds a summary.json")
    out = Path(cfg.output_dir)
    written = [p for p in (write_llm_comparison(runs, out), write_caption_comparison(runs, out)) if p]
    for p in written:
        print(f"wrote {p}")
        print(p.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
