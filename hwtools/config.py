"""Config dataclasses shared by the recipes: the loop, tracking and output fields.

Each recipe's own dataclass inherits from `LoopConfig` and is parsed with `transformers.HfArgumentParser`, so every
field is a CLI flag (`--batch-size` or `--batch_size`) and `--config x.yaml` loads the same fields.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hwtools.errors import UserError

# the value of --model, --data and --encoder that selects the offline embedded defaults
EMBEDDED = "embedded"


def default_cache_dir() -> str:
    """Where converted models, generated data sets and feature caches live (HWTOOLS_CACHE overrides)."""
    return os.environ.get("HWTOOLS_CACHE", str(Path.home() / ".cache" / "hwtools"))


@dataclass
class LoopConfig:
    """Fields of the shared training loop, checkpointing, tracking and output directory."""

    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Run directory (default results/runs/<task>-<method|arch>-<timestamp>)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Allow writing into a directory that holds a run."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training split (ignored if max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps to run; > 0 overrides epochs."})
    batch_size: int = field(default=8, metadata={"help": "Micro-batch size per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimiser step."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine | linear | constant (after warmup)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps for linear warmup."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps; > 0 overrides warmup_ratio."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N optimiser steps (0: each epoch end)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N optimiser steps (0: each epoch end)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (oldest are deleted)."})
    log_every: int = field(default=10, metadata={"help": "Log train loss every N optimiser steps."})
    seed: int = field(default=42, metadata={"help": "Seed for weights, data order and dropout."})
    mixed_precision: Optional[str] = field(
        default=None, metadata={"help": "no | fp16 | bf16; default: whatever `accelerate launch` configured."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    cpu_threads: int = field(default=0, metadata={
        "help": "Torch threads per process on a CPU (0: OMP_NUM_THREADS, but under accelerate launch, whose default "
                "is 1, the usable cores / local processes)."})
    report_to: str = field(default="wandb", metadata={
        "help": "wandb (offline into the run dir without an API key) | none (metrics.jsonl is always written)."})
    wandb_project: str = field(default="hwtools", metadata={"help": "W&B project name."})
    run_name: Optional[str] = field(default=None, metadata={"help": "Run name on W&B (default: output dir name)."})
    resume: Optional[str] = field(
        default=None, metadata={"help": "latest (newest checkpoint of --output-dir) or a checkpoint PATH."}
    )
    cache_dir: str = field(
        default_factory=default_cache_dir,
        metadata={"help": "Cache for converted models, generated data and features (env HWTOOLS_CACHE)."},
    )


def parse_config(cls, args: Optional[list[str]] = None):
    """Parse CLI flags (or `--config file.yaml|json` plus overriding flags) into the dataclass `cls`."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(cls)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a file path")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise UserError(f"--config: no such file: {path}")
        argv = argv[:i] + argv[i + 2 :]
        base = _read_config_file(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise UserError(f"{path}: unknown field(s) {', '.join(unknown)}")
        # the file replaces the dataclass defaults; flags given on the command line still win
        parser.set_defaults(**base)
    cfg, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise UserError(f"unrecognised argument(s): {' '.join(remaining)} (see --help)")
    return cfg


def _read_config_file(path: Path) -> dict:
    import json

    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"{path}: cannot parse config: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: config must be a mapping of field: value")
    return {k.replace("-", "_"): v for k, v in data.items()}
