"""Resume checks what it continues: the flags that fix the data position or the trained tensors must match the run.

A checkpoint stores its place in the epoch in per-rank batches, so a resume with another batch size, data set, packing
or number of processes would silently skip the wrong examples; another method or model trains other tensors. Those
flags are compared with the run's config.json (before any model is loaded). Other flags (steps, epochs, cadences,
reporting) may change; the changes are recorded as a `resumed` event in metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from hwtools.errors import UserError
from hwtools.train.checkpoint import LOOP_STATE

COMMON_FIXED = ("batch_size", "grad_accum", "seed")
FIXED_BY_TASK = {
    "llm": ("method", "model", "data", "max_length", "packing", "val_frac", "test_frac", "max_train_examples",
            "num_virtual_tokens", "lora_r", "target_modules", "trainable_tokens", "unfreeze_first", "unfreeze_last"),
    "caption": ("arch", "data", "encoder", "pretrained", "encoder_weights", "finetune_blocks", "max_len",
                "max_train_images", "embed_dim", "hidden_dim", "attention_dim", "num_layers", "d_model", "heads",
                "ff_dim", "image_as_first_input"),
}
# where the run is and how it was started: never worth a word
NOT_COMPARED = ("resume", "overwrite", "output_dir", "cache_dir")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def saved_num_processes(ckpt: Path) -> int:
    """How many processes wrote the checkpoint (older checkpoints: one RNG state file per rank)."""
    state = json.loads((Path(ckpt) / LOOP_STATE).read_text(encoding="utf-8"))
    return int(state.get("num_processes") or len(list(Path(ckpt).glob("random_states_*.pkl"))) or 1)


def check_resume(cfg, task: str, run_dir: Path, ckpt: Path, num_processes: int) -> dict:
    """Raise a one-line UserError naming every fixed flag that differs from the run's config.json (and the number of
    processes); return {flag: [run's value, new value]} for the other flags that changed."""
    ckpt = Path(ckpt)
    # the config of the run that wrote the checkpoint (`--resume PATH` may name another run's checkpoint)
    source = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else Path(run_dir)
    saved = _read_config(source / "config.json")
    now = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # as config.json holds them
    fixed = COMMON_FIXED + FIXED_BY_TASK.get(task, ())
    wrong, changed = [], {}
    for name in sorted(set(saved) & set(now)):
        if name in NOT_COMPARED or saved[name] == now[name]:
            continue
        if name in fixed:
            wrong.append(f"{flag(name)} {_show(saved[name])} -> {_show(now[name])}")
        else:
            changed[flag(name)] = [saved[name], now[name]]
    before = saved_num_processes(ckpt)
    if before != num_processes:
        wrong.append(f"number of processes {before} -> {num_processes}")
    if wrong:
        raise UserError(f"--resume {cfg.resume}: {ckpt} was trained with other settings: {'; '.join(wrong)} (the run's "
                        f"values are in {source / 'config.json'}; start a new --output-dir to change them)")
    return changed


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable run config; cannot check what --resume continues") from None


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) or value is None else str(value)


def resume_event(ckpt: Path, changed: dict) -> dict:
    """The metrics.jsonl line that records a resume and the flags it changed."""
    step: Optional[int] = json.loads((Path(ckpt) / LOOP_STATE).read_text(encoding="utf-8")).get("step")
    return {"step": step, "split": "event", "event": "resumed", "checkpoint": str(ckpt), "changed": changed}
