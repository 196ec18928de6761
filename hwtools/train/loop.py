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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from hwtools.device import enable_tf32, use_cpu_threads
from hwtools.errors import RunStopped, UserError
from hwtools.train.checkpoint import LoopState, load_checkpoint, resolve_resume, save_checkpoint
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
    # ------------------------------------------------------------------------------------------------ set up
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

    # ------------------------------------------------------------------------------------------------ resume
    state = LoopState(num_processes=accelerator.num_processes)
    if cfg.resume:
        path = resolve_resume(cfg.resume, run_dir)
        # the resume check made sure the processes are as many as the checkpoint's (older ones do not say)
        state = replace(load_checkpoint(accelerator, path), num_processes=accelerator.num_processes)
        tracker.truncate_after(state.step)
        accelerator.print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch "
                          f"{state.batches_in_epoch})")
    # a signal only sets a flag: the step and the save in progress complete
    signals = StopSignals()
    run = _Run(accelerator, model, cfg, tracker, run_dir, state, n_steps, steps_per_epoch, eval_loader, loss_fn,
               signals)

    # ------------------------------------------------------------------------------------------------ train
    model.train()
    run.meter.start()
    with signals, _closed_on_stop(accelerator, run.bar, tracker):
        while state.step < n_steps and not run.ended:
            epoch = _Epoch(accelerator, train_loader, state.epoch, skip=state.batches_in_epoch)
            for batch in epoch:
                if state.step >= n_steps:  # checked before a batch, so an epoch that ends on the last step still ends
                    break
                # forward and backward; every grad_accum-th micro-batch (and an epoch's last) also steps the optimizer
                state.batches_in_epoch += 1
                with accelerator.accumulate(model):
                    with accelerator.autocast():  # the loss may run part of the model (llm: the LM head) itself
                        loss, _ = _split_loss(loss_fn(model, batch))
                    run.health.add_micro(loss, state.step + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if run.stops_before_update(ends_epoch=state.batches_in_epoch == epoch.length):
                            break
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                run.meter.add(count_fn(batch))
                if not accelerator.sync_gradients:  # mid accumulation: the optimizer did not step
                    continue
                lr = scheduler.get_last_lr()[0]  # the rate this step was taken with
                scheduler.step()
                state.step += 1
                run.bar.update(1)
                # after the optimizer step: log, evaluate, save where due; agree on a stop signal
                run.after_step(lr)
                if run.ended:
                    break
            # the epoch ran to its end, or the loop left it (last step, stop signal, non-finite loss)
            if epoch.finished:
                run.end_of_epoch(on_epoch_end)
            else:
                run.left_epoch_early()
        if not run.ended:  # a signal during the last step: training is done, evaluation is not
            run.preempted = signals.agreed(accelerator)
        if run.preempted is not None:
            _stop_on_signal(accelerator, tracker, run.ckpt_root, state.step, run.preempted)
    run.meter.stop()
    run.bar.close()

    # ------------------------------------------------------------------------------------------------ finish
    run.finish()
    total_items = int(accelerator.reduce(torch.tensor(run.meter.items, device=accelerator.device), "sum").item())
    return TrainResult(
        model=accelerator.unwrap_model(model),
        steps=state.step,
        final_loss=state.last_logged,
        eval_loss=run.eval_loss,
        resources=run.meter.as_dict(throughput_unit, accelerator.num_processes, total_items,
                                    rank_peaks=run.meter.peaks_of_all_ranks(accelerator)),
        stopped_reason=run.stopped,
        prepared_model=model,
    )


class _Epoch:
    """One epoch's batches in (seed, epoch) order, minus the `skip` first ones (trained on before a resume);
    `finished` turns True when the loader runs out, so it stays False when the loop breaks off."""

    def __init__(self, accelerator: Accelerator, loader, epoch: int, skip: int):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        self.length = _length(loader)  # batches of a whole epoch
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
        self.loader, self.finished = loader, False

    def __iter__(self):
        yield from _rng_neutral_batches(self.loader)
        self.finished = True


def _length(loader) -> int:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length: its last batch is not known in advance
        return -1


class _Run:
    """The stages of the loop and what they share: the run's parts, its LoopState (what a checkpoint holds) and what
    no checkpoint holds: the steps last saved and evaluated, and why the run ended early if it did."""

    def __init__(self, accelerator: Accelerator, model, cfg, tracker: Tracker, run_dir: Path, state: LoopState,
                 n_steps: int, steps_per_epoch: int, eval_loader, loss_fn: LossFn, signals: StopSignals):
        self.accelerator, self.model, self.cfg, self.tracker = accelerator, model, cfg, tracker
        self.ckpt_root = Path(run_dir) / "checkpoints"
        self.state, self.n_steps, self.steps_per_epoch = state, n_steps, steps_per_epoch
        self.eval_loader, self.loss_fn, self.signals = eval_loader, loss_fn, signals
        # the step losses not yet read into state.window, and the first step with a non-finite loss
        self.health = _DeviceHealth(accelerator)
        self.meter = ResourceMeter(accelerator.device)
        self.meter.reset_peak()
        self.bar = tqdm(total=n_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
        self.saved_at, self.eval_done_at, self.eval_loss = state.step, -1, None
        self.stopped: Optional[str] = None  # a non-finite loss ended the run: why
        self.preempted: Optional[int] = None  # a stop signal ended the run: its number

    @property
    def ended(self) -> bool:
        """A non-finite loss or a stop signal ended the run."""
        return self.stopped is not None or self.preempted is not None

    def logs_at(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.n_steps

    def saves_at(self, step: int) -> bool:
        return self.cfg.save_every > 0 and step % self.cfg.save_every == 0

    def evaluates_at(self, step: int) -> bool:
        return (self.eval_loader is not None and self.cfg.eval_every > 0
                and (step % self.cfg.eval_every == 0 or step == self.n_steps))

    def stops_before_update(self, ends_epoch: bool) -> bool:
        """Before the update of a step whose state may be logged or saved: whether a non-finite loss stops the run
        (that update is then not taken). Other steps do not read the flag: no host sync."""
        step = self.state.step + 1
        if self.logs_at(step) or self.saves_at(step) or ends_epoch:
            self.stopped = self.health.non_finite()
        return self.stopped is not None

    def after_step(self, lr: float) -> None:
        """After an optimizer step: log, evaluate and save where due, then agree on a stop signal."""
        self.health.end_step()
        self.state.window["steps"] += 1
        step = self.state.step
        logs, evals, saves = self.logs_at(step), self.evaluates_at(step), self.saves_at(step)
        if logs or evals or saves:  # the clock stops (and waits for the device) only where the host waits anyway
            with self.meter.paused():
                if logs:
                    self.log_train_loss(lr)
                if evals:
                    self.evaluate_and_log()
                if saves:
                    self.stopped = self.health.non_finite()
                    if self.stopped is not None:
                        return
                    self.save()
        self.preempted = self.signals.agreed(self.accelerator)  # the same on every rank: all stop after the same step

    def end_of_epoch(self, on_epoch_end) -> None:
        """The epoch ran to its end: evaluate (when evaluation is per epoch), run the task's hook, agree on a stop
        signal and save, unless a non-finite loss stops the run first."""
        state, cfg = self.state, self.cfg
        with self.meter.paused():
            self.stopped = self.health.non_finite()
            if self.stopped is not None:
                return
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if cfg.eval_every == 0 and self.eval_loader is not None and self.eval_done_at != state.step:
                self.evaluate_and_log()
            if on_epoch_end is not None:
                on_epoch_end(self.model, state.epoch, state.step)
            self.preempted = self.signals.agreed(self.accelerator)
            # the epoch-end state supersedes a save of this step; a stop needs it saved
            if (cfg.save_every == 0 or state.step >= self.n_steps or self.saved_at == state.step
                    or self.preempted is not None):
                self.save()

    def left_epoch_early(self) -> None:
        """The loop left the epoch at its last step or on a stop signal: save where it stands, unless a non-finite
        loss stopped it (then the last good checkpoint stays latest)."""
        with self.meter.paused():
            if self.stopped is None:
                self.stopped = self.health.non_finite()
            if self.stopped is None and self.saved_at != self.state.step:
                self.save()

    def finish(self) -> None:
        """After training: report a non-finite stop; else evaluate the final model (unless done at this step) and
        make the steps since the last log line the final train loss."""
        state = self.state
        if self.stopped is not None:
            self.accelerator.print(f"stopped: {self.stopped}; the last good checkpoint is kept in {self.ckpt_root}")
            self.tracker.log({"step": state.step, "split": "train", "event": "stopped", "reason": self.stopped})
            return
        if self.eval_loader is not None and self.eval_done_at != state.step:
            self.evaluate_and_log()
        if state.window["steps"]:
            self.read_losses()
            state.last_logged = state.window["loss_sum"] / state.window["steps"]

    def read_losses(self) -> None:
        """Add the step losses still on the device to state.window (a host sync)."""
        self.state.window["loss_sum"] += self.health.take_loss_sum()

    def log_train_loss(self, lr: float) -> None:
        """Log the mean train loss since the last log line and start a new window."""
        state = self.state
        self.read_losses()
        state.last_logged = state.window["loss_sum"] / state.window["steps"]
        self.tracker.log({"step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4), "split": "train",
                          "loss": state.last_logged, "lr": lr})
        self.bar.set_postfix(loss=f"{state.last_logged:.4f}")
        state.window = {"loss_sum": 0.0, "steps": 0}

    def evaluate_and_log(self) -> None:
        self.eval_loss = evaluate(self.accelerator, self.model, self.eval_loader, self.loss_fn)
        self.eval_done_at = self.state.step
        if self.eval_loss is not None:
            self.tracker.log({"step": self.state.step, "epoch": round(self.state.step / self.steps_per_epoch, 4),
                              "split": "eval", "loss": self.eval_loss})

    def save(self) -> None:
        self.read_losses()  # the checkpoint holds the losses of its steps
        save_checkpoint(self.accelerator, self.ckpt_root, self.state, self.cfg.save_total_limit)
        self.saved_at = self.state.step


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
