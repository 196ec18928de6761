"""The one accelerate training loop that both tasks use.

The task supplies the model, data loaders and `loss_fn(model, batch)`; the loop supplies gradient accumulation,
clipping, mixed precision (accelerate), LR warmup + schedule, periodic evaluation, atomic checkpoints, exact resume,
early stop on a non-finite loss, progress bar, logging and resource meters.

The host waits for the device only at log, eval and save steps (on a GPU each wait drains the queue): losses and a
non-finite flag accumulate on the device and are read there. A non-finite loss is therefore found at the next log or
save step, before that step's optimizer update; up to log_every - 1 updates may follow it (and the model in memory
may be corrupt), but the flag is read before every checkpoint save, so none of them is ever saved and the last good
checkpoint stays latest.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from hwtools.device import enable_tf32, use_cpu_threads
from hwtools.errors import RunStopped, UserError
from hwtools.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from hwtools.train.meters import ResourceMeter
from hwtools.train.preempt import StopSignals, signal_name
from hwtools.train.tracking import Tracker

LossFn = Callable[[torch.nn.Module, dict], "torch.Tensor | tuple[torch.Tensor, float]"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    model: torch.nn.Module
    steps: int
    final_loss: Optional[float]
    eval_loss: Optional[float]
    resources: dict
    stopped_reason: Optional[str] = None
    history: list = field(default_factory=list)
    prepared_model: Optional[torch.nn.Module] = None  # as accelerate wrapped it (DDP/FSDP): for get_state_dict


def make_accelerator(cfg, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator configured from the loop fields; seeds everything with cfg.seed."""
    kwargs = {}
    if cfg.mixed_precision:
        kwargs["mixed_precision"] = cfg.mixed_precision
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="wandb" if cfg.report_to == "wandb" else None,
        # data order depends only on (seed, epoch): the same on every rank and after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        **kwargs,
    )
    set_seed(cfg.seed)
    enable_tf32(accelerator.device)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = use_cpu_threads(accelerator.device, cfg.cpu_threads, local_processes)
    if accelerator.device.type == "cpu":
        accelerator.print(f"CPU: {threads} torch threads per process (--cpu-threads to change)")
    return accelerator


def build_optimizer(model: torch.nn.Module, cfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors); `fused`: one
    kernel for all parameters (CUDA; see use_fused_adamw)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters (check the method / freezing options)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused or None)


def use_fused_adamw(accelerator: Accelerator) -> bool:
    """Fused AdamW on CUDA without parameter sharding (FSDP and DeepSpeed swap in their own parameters)."""
    from accelerate.utils import DistributedType

    return accelerator.device.type == "cuda" and accelerator.distributed_type in (DistributedType.NO,
                                                                                  DistributedType.MULTI_GPU)


def build_scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup then cosine / linear decay / constant, via transformers' schedulers."""
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if cfg.lr_schedule not in names:
        raise UserError(f"--lr-schedule {cfg.lr_schedule}: choose one of {', '.join(names)}")
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_ratio * total_steps))
    return get_scheduler(names[cfg.lr_schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def total_steps(cfg, batches_per_epoch: int) -> int:
    """Optimiser steps the run will take: max_steps, or epochs x ceil(batches / grad_accum)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if batches_per_epoch == 0:
        raise UserError("the training split is empty (no batch to train on)")
    return max(1, int(math.ceil(cfg.epochs * math.ceil(batches_per_epoch / cfg.grad_accum))))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (HF models, PEFT-wrapped or not)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):  # frozen embeddings would otherwise cut the graph
        model.enable_input_require_grads()


def _split_loss(out) -> tuple[torch.Tensor, float]:
    if isinstance(out, tuple):
        return out[0], float(out[1])
    return out, 1.0


def _default_count(batch) -> int:
    for v in batch.values() if isinstance(batch, dict) else batch:
        if torch.is_tensor(v):
            return int(v.shape[0])
    return 1


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader, loss_fn: LossFn) -> Optional[float]:
    """Weighted mean of loss_fn over a prepared loader, averaged over all ranks (weights from loss_fn); each example
    counts once, however many processes share the loader."""
    if loader is None:
        return None
    was_training = model.training
    model.eval()
    net, sampler = _uneven_eval(accelerator, model, loader)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    try:
        for batch in loader:
            with accelerator.autocast():  # the loss may run part of the model (llm: the LM head) itself
                loss, weight = _split_loss(loss_fn(net, batch))
            if torch.isfinite(loss):
                total += torch.tensor([loss.item() * weight, weight], dtype=torch.float64, device=accelerator.device)
    finally:
        if sampler is not None:
            sampler.even_batches = True
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def _uneven_eval(accelerator: Accelerator, model, loader):
    """(module to call, batch sampler to restore) for an evaluation pass without accelerate's even-batches padding.

    With several processes accelerate repeats a few examples to give every rank as many batches (what DDP training
    needs); an evaluation would count them twice, so a 2-rank eval loss differed from a 1-rank one. A forward through
    the module under DDP needs no collective, so ranks may run different numbers of batches. FSDP and DeepSpeed
    forwards gather parameters across ranks: there the padding stays."""
    from accelerate.utils import DistributedType
    from torch.nn.parallel import DistributedDataParallel

    sampler = getattr(loader, "batch_sampler", None)
    if accelerator.num_processes == 1 or not getattr(sampler, "even_batches", False):
        return model, None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return model, None
    sampler.even_batches = False
    return (model.module if isinstance(model, DistributedDataParallel) else model), sampler


def _rng_neutral_batches(loader):
    """Iterate a loader without letting iterator creation draw from the global RNG, so dropout after a resume
    sees the same random stream as an uninterrupted run (torch's DataLoader draws a base seed on every iter)."""
    it = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(it, None)
    if first is None:
        return
    yield first
    yield from it


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_loader,
    loss_fn: LossFn,
    cfg,
    run_dir: Path,
    tracker: Tracker,
    *,
    eval_loader=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    count_fn: Optional[Callable[[dict], int]] = None,
    throughput_unit: str = "items/s",
    on_epoch_end: Optional[Callable[[torch.nn.Module, int, int], None]] = None,
) -> TrainResult:
    """Train `model` on `train_loader` with `loss_fn` for cfg.max_steps or cfg.epochs; see the module docstring.

    `loss_fn(model, batch)` returns a mean loss, or (mean loss, weight) where weight (e.g. label tokens) makes the
    evaluation loss a proper weighted mean. `count_fn(batch)` counts items for throughput (default: batch size).
    `on_epoch_end(model, epoch, step)` runs on every rank after each epoch (e.g. caption a validation image).
    """
    count_fn = count_fn or _default_count
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = optimizer or build_optimizer(model, cfg, fused=use_fused_adamw(accelerator))
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # listed once: model.parameters() walks every submodule (~2 ms a step for Gemma-2-2B with LoRA), and frozen
    # weights have no gradient to clip anyway
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.grad_accum))
    n_steps = total_steps(cfg, len(train_loader))
    # not prepared: accelerate would step a prepared scheduler once per process per step
    scheduler = build_scheduler(optimizer, cfg, n_steps)
    accelerator.register_for_checkpointing(scheduler)
    ckpt_root = Path(run_dir) / "checkpoints"

    step, epoch, skip, preempted = 0, 0, 0, None
    # train loss averaged over the steps since the last log line: loss_sum holds what was read from the device so
    # far, `health` the rest (and the first step with a non-finite loss)
    window = {"loss_sum": 0.0, "steps": 0}
    health = _DeviceHealth(accelerator)
    last_logged = None
    if cfg.resume:
        path = resolve_resume(cfg.resume, run_dir)
        state = load_checkpoint(accelerator, path)
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        window, last_logged = state["window"], state.get("last_logged")
        tracker.truncate_after(step)
        accelerator.print(f"resumed from {path} at step {step} (epoch {epoch}, batch {skip})")

    def loop_state(ep, batches):
        window["loss_sum"] += health.take_loss_sum()
        return {"step": step, "epoch": ep, "batches_in_epoch": batches, "window": window, "last_logged": last_logged,
                "num_processes": accelerator.num_processes}

    meter = ResourceMeter(accelerator.device)
    meter.reset_peak()
    eval_loss, stopped, eval_done_at, saved_at = None, None, -1, step
    bar = tqdm(total=n_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    model.train()
    meter.start()
    # a signal only sets a flag: the step and the save in progress complete
    with StopSignals() as stop, _closed_on_stop(accelerator, bar, tracker):
        while step < n_steps and stopped is None and preempted is None:
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            loader = train_loader
            if skip:  # resume mid-epoch: same (seed, epoch) order, minus the batches already trained on
                loader = accelerator.skip_first_batches(train_loader, skip)
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
            batches, skip = skip, 0
            n_batches = _length(train_loader)
            for batch in _rng_neutral_batches(loader):
                if step >= n_steps:  # checked before a batch, so an epoch that ends on the last step still ends
                    break
                batches += 1
                with accelerator.accumulate(model):
                    with accelerator.autocast():  # the loss may run part of the model (llm: the LM head) itself
                        loss, _ = _split_loss(loss_fn(model, batch))
                    health.add_micro(loss, step + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        nxt = step + 1
                        will_log = nxt % cfg.log_every == 0 or nxt == n_steps
                        will_save = cfg.save_every > 0 and nxt % cfg.save_every == 0
                        # the steps whose state may be saved or logged read the flag before their update
                        if will_log or will_save or batches == n_batches:
                            stopped = health.non_finite()
                            if stopped is not None:
                                break
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                meter.add(count_fn(batch))
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]  # the rate this step was taken with
                scheduler.step()
                step += 1
                bar.update(1)
                health.end_step()
                window["steps"] += 1
                will_eval = (cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == n_steps)
                             and eval_loader is not None)
                pause = will_log or will_eval or will_save
                if pause:  # the clock stops (and waits for the device) only where the host waits anyway
                    meter.stop()
                if will_log:
                    window["loss_sum"] += health.take_loss_sum()
                    last_logged = window["loss_sum"] / window["steps"]
                    tracker.log({"step": step, "epoch": round(step / steps_per_epoch, 4), "split": "train",
                                 "loss": last_logged, "lr": lr})
                    bar.set_postfix(loss=f"{last_logged:.4f}")
                    window = {"loss_sum": 0.0, "steps": 0}
                if will_eval:
                    eval_loss, eval_done_at = _eval_and_log(accelerator, model, eval_loader, loss_fn, tracker, step,
                                                            steps_per_epoch), step
                if will_save:
                    stopped = health.non_finite()
                    if stopped is not None:
                        break
                    save_checkpoint(accelerator, ckpt_root, step, loop_state(epoch, batches), cfg.save_total_limit)
                    saved_at = step
                preempted = stop.agreed(accelerator)  # the same on every rank: all stop after the same step
                if preempted is not None:
                    break
                if pause:
                    meter.start()
            else:  # the epoch ran to its end
                meter.stop()
                stopped = health.non_finite()
                if stopped is not None:
                    break
                epoch += 1
                if cfg.eval_every == 0 and eval_loader is not None and eval_done_at != step:
                    eval_loss, eval_done_at = _eval_and_log(accelerator, model, eval_loader, loss_fn, tracker, step,
                                                            steps_per_epoch), step
                if on_epoch_end is not None:
                    on_epoch_end(model, epoch, step)
                preempted = stop.agreed(accelerator)
                # the epoch-end state supersedes a save of this step; a stop needs it saved
                if cfg.save_every == 0 or step >= n_steps or saved_at == step or preempted is not None:
                    save_checkpoint(accelerator, ckpt_root, step, loop_state(epoch, 0), cfg.save_total_limit)
                    saved_at = step
                meter.start()
                continue
            # left the epoch early (max steps reached, a stop signal, or a non-finite loss: then the last good
            # checkpoint stays latest)
            meter.stop()
            if stopped is None:
                stopped = health.non_finite()
            if stopped is None and saved_at != step:
                save_checkpoint(accelerator, ckpt_root, step, loop_state(epoch, batches), cfg.save_total_limit)
                saved_at = step
        if preempted is None and stopped is None:  # a signal during the last step: training is done, evaluation is not
            preempted = stop.agreed(accelerator)
        if preempted is not None:
            meter.stop()
            _stop_on_signal(accelerator, tracker, ckpt_root, step, preempted)
    meter.stop()
    bar.close()

    if stopped is not None:
        accelerator.print(f"stopped: {stopped}; the last good checkpoint is kept in {ckpt_root}")
        tracker.log({"step": step, "split": "train", "event": "stopped", "reason": stopped})
    elif eval_loader is not None and eval_done_at != step:
        eval_loss = _eval_and_log(accelerator, model, eval_loader, loss_fn, tracker, step, steps_per_epoch)
    if window["steps"] and stopped is None:
        window["loss_sum"] += health.take_loss_sum()
        last_logged = window["loss_sum"] / window["steps"]
    total_items = int(accelerator.reduce(torch.tensor(meter.items, device=accelerator.device), "sum").item())
    return TrainResult(
        model=accelerator.unwrap_model(model),
        steps=step,
        final_loss=last_logged,
        eval_loss=eval_loss,
        resources=meter.as_dict(throughput_unit, accelerator.num_processes, total_items,
                                rank_peaks=meter.peaks_of_all_ranks(accelerator)),
        stopped_reason=stopped,
        prepared_model=model,
    )


def _length(loader) -> int:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length: its last batch is not known in advance
        return -1


class _DeviceHealth:
    """Train losses and the first non-finite one, kept on the device between log steps so that a micro-step needs
    no host sync; each read is one small collective over the ranks."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        device = accelerator.device
        self.micro_sum = torch.zeros((), dtype=torch.float32, device=device)  # this step's micro-batch losses
        self.micro_n = 0
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # this rank's step losses, not yet read
        self.bad_at = torch.zeros((), dtype=torch.int64, device=device)  # first step with a non-finite loss; 0: none
        self.unread = False

    def add_micro(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        self.micro_sum = self.micro_sum + loss
        self.micro_n += 1
        self.bad_at = torch.where((self.bad_at == 0) & ~torch.isfinite(loss), step, self.bad_at)
        self.unread = True

    def end_step(self) -> None:
        self.loss_sum = self.loss_sum + self.micro_sum / max(self.micro_n, 1)
        self.micro_sum = torch.zeros_like(self.micro_sum)
        self.micro_n = 0

    def take_loss_sum(self) -> float:
        """The step losses (each the mean over ranks of its micro-batch mean) added up since the last take."""
        total = self.accelerator.reduce(self.loss_sum.clone(), reduction="mean").item()
        self.loss_sum = torch.zeros_like(self.loss_sum)
        return total

    def non_finite(self) -> Optional[str]:
        """The stop reason if any rank has seen a non-finite loss, the same on every rank; reads the device only when
        a micro-step ran since the last read (a clean flag stays clean)."""
        if not self.unread:
            return None
        self.unread = False
        seen = self.accelerator.gather(self.bad_at[None]).tolist()
        bad = [s for s in seen if s > 0]
        if not bad:
            return None
        self.unread = True  # stays bad: every later read stops too
        return f"non-finite loss at step {min(bad)}"


@contextmanager
def _closed_on_stop(accelerator, bar, tracker):
    """A stop (signal, failed save; every rank raises it) ends the progress line and flushes the tracker before its
    one line prints; no rank exits before the main process has flushed (torchrun would SIGTERM the others)."""
    try:
        yield
    except RunStopped:
        bar.close()
        tracker.finish()
        accelerator.wait_for_everyone()
        raise


def _stop_on_signal(accelerator, tracker, ckpt_root: Path, step: int, signum: int) -> None:
    """Log the stop and raise RunStopped (exit 128 + signal) naming the checkpoint to resume."""
    from hwtools.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(ckpt_root) if accelerator.is_main_process else None
    name = signal_name(signum)
    tracker.log({"step": step, "split": "event", "event": "stopped", "signal": name, "checkpoint": ckpt})
    line = (f"stopped by {name} after step {step}; checkpoint {ckpt}; continue with the same flags and "
            f"--resume latest" if accelerator.is_main_process else "")
    raise RunStopped(line, 128 + signum)


def _eval_and_log(accelerator, model, loader, loss_fn, tracker, step, steps_per_epoch) -> Optional[float]:
    loss = evaluate(accelerator, model, loader, loss_fn)
    if loss is not None:
        tracker.log({"step": step, "epoch": round(step / steps_per_epoch, 4), "split": "eval", "loss": loss})
    return loss
