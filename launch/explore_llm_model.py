"""Look at a model's architecture before training, offline and without weights (meta device).

    python launch/explore_llm_model.py --model gemma-2-2b --output-dir results/explore/llm

Writes modules_<model>.txt (the printed module tree), and architecture_<model>.json: the config facts (layers, grouped
query attention, sliding-window / global layers, soft-capping, activation, norm, tied embedding), exactly which
parameters partial fine-tuning trains, and the planner's parameter counts and memory for every method (the numbers of
`launch/plan_llm.py` at the same settings). results/REPORT.md reads the committed copy under results/explore/llm.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hwtools.config import default_cache_dir
from hwtools.errors import cli_main


@dataclass
class ExploreModelArgs:
    model: str = field(default="gemma-2-2b", metadata={
        "help": "gemma-2-2b, llama-3.2-3b, embedded (Gemma-3-270M), a hub id in the local HF cache, or a local dir"})
    output_dir: str = field(default="results/explore/llm", metadata={"help": "where the two files go"})
    batch_size: int = field(default=1, metadata={"help": "planner: micro-batch size"})
    seq_len: int = field(default=512, metadata={"help": "planner: tokens per row"})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={
        "help": "where the converted embedded model lives (its config is read from there when present)"})


@cli_main
def main(argv=None):
    from transformers import HfArgumentParser

    from hwtools.llm.plan import resolve_config
    from hwtools.report_model import explore_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    (args,) = HfArgumentParser(ExploreModelArgs).parse_args_into_dataclasses(args=argv)
    config = resolve_config(args.model, args.cache_dir)
    found = explore_model(config, batch_size=args.batch_size, seq_len=args.seq_len)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name
    (out / f"modules_{name}.txt").write_text(found["tree"] + "\n", encoding="utf-8")
    record = {"model": args.model, "facts": found["facts"], "partial": found["partial"], "plan": found["plan"]}
    (out / f"architecture_{name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(found["tree"])
    print(json.dumps(found["facts"], indent=1))
    print(f"partial fine-tuning trains {found['partial']['trainable']:,} parameters in "
          f"{', '.join(found['partial']['groups'])}")
    print(f"wrote {out / f'modules_{name}.txt'} and {out / f'architecture_{name}.json'}")


if __name__ == "__main__":
    main()
