"""Resource meters: parameter counts, wall time, throughput and peak memory (CUDA or process RSS)."""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch


def count_parameters(model: torch.nn.Module) -> dict:
    """Total and trainable parameter counts (shared tensors counted once), as summary.json's `params` block."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = numel_of(p)
        total += n
        if p.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}


def numel_of(p: torch.Tensor) -> int:
    """Elements of `p` as the model sees them (a 4-bit bitsandbytes weight counts its unpacked shape)."""
    # bitsandbytes packs two 4-bit weights per byte; its Params4bit remembers the real shape in quant_state
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class ResourceMeter:
    """Wall time, items processed and peak memory over a training run."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.items = 0
        self._start = None
        self.elapsed = 0.0

    @property
    def memory_kind(self) -> str:
        return "cuda" if self.device.type == "cuda" else "rss"

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def start(self) -> None:
        """Start (or restart after a pause for eval/checkpointing) the training clock."""
        self._start = time.perf_counter()

    def stop(self) -> None:
        """Pause the clock, waiting for the device's queued work first (so call it only where the host waits anyway:
        the loop pauses at log, eval and save steps, not every step)."""
        if self._start is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.elapsed += time.perf_counter() - self._start
            self._start = None

    @contextmanager
    def paused(self):
        """The clock stopped for the block (logging, evaluation, checkpointing), then running again if it ran before;
        stopping waits for the device, so pause only where the host waits anyway."""
        running = self._start is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    def add(self, n: int) -> None:
        self.items += int(n)

    def peak_memory_mb(self) -> float:
        """This process's peak: tensors allocated on the GPU (CUDA), else the resident set size."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb()

    def peak_reserved_mb(self) -> float | None:
        """This process's peak of memory held by torch's CUDA caching allocator (what nvidia-smi shows, about);
        None off CUDA."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device) / 2**20
        return None

    def peaks_of_all_ranks(self, accelerator) -> list[tuple[float, float | None]]:
        """[(peak, reserved peak)] of every rank in rank order (a collective: every rank must call it)."""
        mine = (self.peak_memory_mb(), self.peak_reserved_mb())
        if accelerator.num_processes == 1:
            return [mine]
        local = torch.tensor([mine[0], -1.0 if mine[1] is None else mine[1]], dtype=torch.float64,
                             device=accelerator.device)
        rows = accelerator.gather(local[None]).view(-1, 2).tolist()
        return [(a, None if b < 0 else b) for a, b in rows]

    def as_dict(self, throughput_unit: str, num_processes: int = 1, total_items: int | None = None,
                rank_peaks: list | None = None) -> dict:
        """summary.json's `resources` block; `total_items` is the count over all ranks (default: this rank's),
        `rank_peaks` every rank's (peak, reserved peak) (default: this rank's only). peak_memory_mb is the largest
        rank's peak."""
        items = self.items if total_items is None else total_items
        rank_peaks = rank_peaks or [(self.peak_memory_mb(), self.peak_reserved_mb())]
        reserved = [r for _, r in rank_peaks if r is not None]
        return {
            "train_time_s": round(self.elapsed, 3),
            "peak_memory_mb": round(max(p for p, _ in rank_peaks), 1),
            "peak_memory_reserved_mb": round(max(reserved), 1) if reserved else None,
            "peak_memory_per_rank_mb": [round(p, 1) for p, _ in rank_peaks],
            "peak_memory_scope": (f"max over {len(rank_peaks)} processes" if len(rank_peaks) > 1
                                  else "the only process"),
            "memory_kind": self.memory_kind,
            "throughput": round(items / self.elapsed, 3) if self.elapsed > 0 else 0.0,
            "throughput_unit": throughput_unit,
            "device": str(self.device),
            "num_processes": num_processes,
        }
