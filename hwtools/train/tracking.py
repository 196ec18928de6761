"""Run directory, metrics.jsonl, config.json/summary.json and W&B through accelerate's trackers."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

from hwtools.errors import EXIT_USER_ERROR, RunStopped, UserError
from hwtools.train.checkpoint import resolve_resume, write_text_atomic
from hwtools.train.lock import acquire_run_lock, check_run_lock
from hwtools.train.resume_check import check_resume, resume_event

RUN_MARKERS = ("config.json", "summary.json", "metrics.jsonl")
# a run's outputs that --overwrite removes with the markers: an old run's checkpoints would otherwise outrank (and
# get the new run's own checkpoints pruned) and an old final/ would pass for the new run's
RUN_OUTPUT_DIRS = ("checkpoints", "final")


def prepare_run_dir(cfg, task: str, name: str, accelerator) -> Path:
    """Resolve and validate the output dir (same path on every rank); refuse to clobber a run without --overwrite."""
    if cfg.output_dir:
        run_dir = Path(cfg.output_dir)
    else:
        if cfg.resume == "latest":
            raise UserError("--resume latest needs --output-dir (the run to resume)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("results") / "runs" / f"{task}-{name}-{stamp}"
        if accelerator.num_processes > 1:  # ranks could straddle a second: take rank 0's name
            from accelerate.utils import broadcast_object_list

            run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    # another live process on this folder is refused before anything is read or removed
    _on_main(accelerator, lambda: check_run_lock(run_dir))
    config_file = run_dir / "config.json"
    if config_file.is_file():
        try:
            other = json.loads(config_file.read_text(encoding="utf-8")).get("task")
        except (json.JSONDecodeError, OSError):
            other = None
        if other is not None and other != task:
            raise UserError(f"{run_dir} holds a '{other}' run, not a '{task}' run; choose another --output-dir")
    resumed = None
    if cfg.resume:  # a bad --resume fails here, before any model is loaded or any file written
        ckpt = resolve_resume(cfg.resume, run_dir)
        changed = _on_main(accelerator, lambda: check_resume(cfg, task, run_dir, ckpt, accelerator.num_processes))
        resumed = resume_event(ckpt, changed) if accelerator.is_main_process else None
    holds_run = any((run_dir / m).exists() for m in RUN_MARKERS)
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise UserError(f"{run_dir} already holds a run; pass --resume latest to continue it or --overwrite")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    _on_main(accelerator, lambda: acquire_run_lock(run_dir))  # only the main process holds it
    if accelerator.is_main_process:
        if resumed is not None:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(to_jsonable(resumed), ensure_ascii=False) + "\n")
        if holds_run and cfg.overwrite and not cfg.resume:
            for m in RUN_MARKERS:
                (run_dir / m).unlink(missing_ok=True)
            for d in RUN_OUTPUT_DIRS:
                shutil.rmtree(run_dir / d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return run_dir


def _on_main(accelerator, fn):
    """fn() on the main process only; a UserError there stops every rank (one line, from the main process)."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = broadcast_object_list([result, error])
    if error is not None:
        raise UserError(error) if accelerator.is_main_process else RunStopped("", EXIT_USER_ERROR)
    return result


def to_jsonable(obj):
    """Dataclasses, paths and non-finite floats into plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    return obj


def write_json(path: Path, obj) -> None:
    write_text_atomic(Path(path), json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False))


class Tracker:
    """Logs events to metrics.jsonl (always) and to accelerate's trackers (W&B when --report-to wandb)."""

    def __init__(self, accelerator, run_dir: Path, cfg, config_dict: dict):
        self.accelerator = accelerator
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.use_wandb = cfg.report_to == "wandb"
        if cfg.report_to not in ("wandb", "none"):
            raise UserError(f"--report-to {cfg.report_to}: choose wandb or none")
        if self.use_wandb:
            _wandb_offline_fallback(run_dir, accelerator.is_main_process)
            # runs grouped by task and named by method or arch, so the runs table reads as the comparison table
            name = cfg.run_name or config_dict.get("method") or config_dict.get("arch") or Path(run_dir).name
            accelerator.init_trackers(
                cfg.wandb_project,
                config=to_jsonable(config_dict),
                init_kwargs={"wandb": {"name": name, "group": config_dict.get("task"), "dir": str(run_dir),
                                       "notes": str(run_dir)}},
            )

    def truncate_after(self, step: int) -> None:
        """On resume, drop events logged after the checkpoint so the file reads like one uninterrupted run."""
        if not self.accelerator.is_main_process or not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        record = to_jsonable(record)
        if not self.accelerator.is_main_process:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.use_wandb:
            split = record.get("split", "train")
            flat = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(flat, step=record.get("step"))

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. generations before/after) on W&B; a no-op without W&B."""
        if not (self.use_wandb and self.accelerator.is_main_process):
            return
        import wandb

        self.accelerator.log({key: wandb.Table(columns=columns, data=rows)})

    def log_images(self, key: str, paths: list[Path], step: int | None = None) -> None:
        if not (self.use_wandb and self.accelerator.is_main_process):
            return
        import wandb

        self.accelerator.log({key: [wandb.Image(str(p)) for p in paths]}, step=step)

    def summarize(self, summary: dict) -> None:
        """summary.json, flattened to dotted keys ("params.trainable", "test.chrf"), into the W&B run's summary: the
        comparison columns of the runs table. A no-op without W&B."""
        if not (self.use_wandb and self.accelerator.is_main_process):
            return
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        run.summary.update(flatten(to_jsonable(summary)))

    def finish(self) -> None:
        if self.use_wandb:
            self.accelerator.end_training()


def flatten(obj: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: nested dicts to dotted keys, lists to text."""
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, ensure_ascii=False)
        else:
            out[key] = v
    return out


def _wandb_offline_fallback(run_dir: Path, main: bool) -> None:
    # wandb.init fails at once without a key; a run should not die for want of a dashboard
    has_key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file()
    if not has_key and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
        if main:
            print(
                f"wandb: no API key, logging offline to {run_dir}/wandb; browse it with `wandb leet {run_dir}/wandb`, "
                f"upload later with `wandb sync {run_dir}/wandb/offline-run-*`",
                flush=True,
            )


def read_metrics(run_dir: Path) -> list[dict]:
    """All events of a run's metrics.jsonl (bad lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def write_summary(run_dir: Path, **blocks) -> dict:
    """summary.json with the contract's blocks (the README's "Every run writes the same files"); missing blocks are
    written as null/{}."""
    keys = ("task", "method", "arch", "model", "data", "params", "resources", "train", "eval", "test", "data_report")
    summary = {k: blocks.pop(k, None) for k in keys}
    summary.update(blocks)
    write_json(Path(run_dir) / "summary.json", summary)
    return summary
