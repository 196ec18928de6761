"""Atomic, resumable checkpoints: `accelerator.save_state` into a temp dir, rename, then repoint `latest`.

Layout under the run dir: checkpoints/step-00000050/ (accelerate state + loop_state.json) and checkpoints/latest (a
text file naming the newest complete checkpoint). A kill at any moment leaves `latest` naming a complete checkpoint.
Model files hold the trained tensors only (plus buffers): a frozen base is reloaded from the model itself on resume,
so a LoRA checkpoint of a 2B model is megabytes, not gigabytes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hwtools.errors import EXIT_SAVE_FAILED, RunStopped, UserError

LATEST = "latest"
LOOP_STATE = "loop_state.json"
# Test hook: seconds to sleep inside a save, before the rename, so a test can kill a run mid-save.
SLOW_SAVE_ENV = "HWTOOLS_TEST_SLOW_SAVE"


@dataclass
class LoopState:
    """Where a run stands: exactly what a checkpoint's loop_state.json holds (these keys, in this order)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # batches of that epoch trained on, per process: a resume skips them
    # the train loss since the last log line: step losses read from the device so far (summed), and steps counted
    window: dict = field(default_factory=lambda: {"loss_sum": 0.0, "steps": 0})
    last_logged: Optional[float] = None  # the last logged train loss
    num_processes: int = 1  # batches_in_epoch counts one process's batches: a resume needs as many processes

    @classmethod
    def from_json(cls, text: str) -> "LoopState":
        """Parse loop_state.json; a key an older checkpoint lacks keeps its default."""
        saved = json.loads(text)
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(accelerator, ckpt_root: Path, state: LoopState, keep: int) -> Path:
    """Save model, optimiser, scheduler, RNG states and the loop `state` as checkpoint step-<state.step>; keep only
    the newest `keep` checkpoints.

    A save that fails on any rank (no space left, permission denied) removes what it wrote, leaves `latest` naming the
    last good checkpoint, and raises RunStopped (exit 74) on every rank, with one line naming the path and the cause.
    """
    ckpt_root, step = Path(ckpt_root), state.step
    final = ckpt_root / f"step-{step:08d}"
    n = 0
    while final.exists():  # re-saving a step (epoch end after a periodic save) never touches what `latest` names
        n += 1
        final = ckpt_root / f"step-{step:08d}.{n}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    failed = None
    if accelerator.is_main_process:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            failed = e
    _check_saved(accelerator, failed, tmp, None)
    handle = accelerator.register_save_state_pre_hook(_keep_trained_tensors)
    try:
        accelerator.save_state(str(tmp))  # every rank writes its own RNG state file
    except Exception as e:  # noqa: BLE001 - torch.save and safetensors report a full disk as their own errors
        failed = e
    finally:
        handle.remove()
    _check_saved(accelerator, failed, tmp, None)
    if accelerator.is_main_process:
        try:
            (tmp / LOOP_STATE).write_text(state.to_json(), encoding="utf-8")
            delay = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
            if delay:
                time.sleep(delay)
            os.replace(tmp, final)
            write_text_atomic(ckpt_root / LATEST, final.name)
        except OSError as e:
            failed = e
    _check_saved(accelerator, failed, tmp, final)
    if accelerator.is_main_process:
        _prune(ckpt_root, keep)
    accelerator.wait_for_everyone()
    return final


def _check_saved(accelerator, failed, tmp: Path, final) -> None:
    """Barrier that also agrees on failure: if any rank failed, clean up and raise RunStopped on every rank."""
    flag = 1 if failed is not None else 0
    if accelerator.num_processes > 1:
        import torch

        flag = int(accelerator.reduce(torch.tensor(flag, device=accelerator.device), reduction="max").item())
    if not flag:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        if final is not None and latest_checkpoint(tmp.parent) != final:  # renamed, but `latest` was not repointed
            shutil.rmtree(final, ignore_errors=True)
    name, message = tmp.name.removeprefix(".tmp-"), ""
    if failed is not None:
        good = latest_checkpoint(tmp.parent)
        message = (f"error: saving checkpoint {name} failed: {_cause(failed, tmp)}; latest stays "
                   f"{good if good else 'none (no checkpoint yet)'}")
    elif accelerator.is_main_process:
        message = f"error: saving checkpoint {name} failed on another process (its line says why)"
    raise RunStopped(message, EXIT_SAVE_FAILED)


def _cause(e: BaseException, tmp: Path) -> str:
    """`path: reason` of a failed write; torch.save says only "unexpected pos" on a full disk, so add the free space."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename or tmp}: {e.strerror}"
    try:
        free = f" ({shutil.disk_usage(tmp.parent).free / 2**20:.1f} MiB free there)"
    except OSError:
        free = ""
    return f"{tmp}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}{free}"


def _trained_names(model) -> set[str]:
    """State-dict keys a checkpoint must hold for `model`: its trainable parameters and its buffers."""
    return {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}


def _keep_trained_tensors(models, weights, output_dir) -> None:
    """save_state pre-hook: drop frozen parameters (a frozen base, 4-bit weights) from the model state dicts."""
    for i in range(min(len(models), len(weights))):  # FSDP/DeepSpeed save their models themselves (no entry)
        keep = _trained_names(models[i])
        weights[i] = {k: v for k, v in weights[i].items() if k in keep}


def _check_trained_tensors(models, input_dir) -> None:
    """load_state pre-hook: every trainable tensor must be in the checkpoint (it loads with strict=False)."""
    from safetensors import safe_open

    for i, model in enumerate(models):
        path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.is_file():
            continue
        with safe_open(str(path), "pt") as f:
            saved = set(f.keys())
        missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in saved)
        if missing:
            raise UserError(f"{input_dir}: checkpoint lacks {len(missing)} trained tensor(s) of this model (first: "
                            f"{missing[0]}); it was saved by a run with another method or options")


def _prune(ckpt_root: Path, keep: int) -> None:
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[: max(len(steps) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` points at, or None when there is none."""
    marker = Path(ckpt_root) / LATEST
    if not marker.is_file():
        return None
    path = Path(ckpt_root) / marker.read_text(encoding="utf-8").strip()
    return path if (path / LOOP_STATE).is_file() else None


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """Turn `--resume latest|PATH` into a complete checkpoint dir, or raise a one-line UserError."""
    if resume == "latest":
        found = latest_checkpoint(Path(run_dir) / "checkpoints")
        if found is None:
            raise UserError(f"--resume latest: no checkpoint in {Path(run_dir) / 'checkpoints'}")
        return found
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run dir was given
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise UserError(f"--resume {resume}: no checkpoint in {path / 'checkpoints'}")
        return found
    if not (path / LOOP_STATE).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint directory (no {LOOP_STATE})")
    return path


def load_checkpoint(accelerator, path: Path) -> LoopState:
    """Restore everything `save_checkpoint` saved; return the loop state."""
    handle = accelerator.register_load_state_pre_hook(_check_trained_tensors)
    try:  # strict=False: frozen weights are not in the checkpoint, they stay as loaded from the base model
        accelerator.load_state(str(path), strict=False)
    finally:
        handle.remove()
    return LoopState.from_json((Path(path) / LOOP_STATE).read_text(encoding="utf-8"))
