"""Resource meters: parameter counts, wall time, throughput and peak memory (CUDA or process RSS)."""
from __future__ import annotations

import resource
import sys
import time

import torch


def count_parameters(model: torch.nn.Module) -> dict:
    """Total and trainable parameter counts (shared tensors counted once), as summary.json's `params` block."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}


def _numel(p: torch.Tensor) -> int:
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
        if self._start is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.elapsed += time.perf_counter() - self._start
            self._start = None

    def add(self, n: int) -> None:
        self.items += int(n)

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb()

    def as_dict(self, throughput_unit: str, num_processes: int = 1, total_items: int | None = None) -> dict:
        """summary.json's `resources` block; `total_items` is the count over all ranks (default: this rank's)."""
        items = self.items if total_items is None else total_items
        return {
            "train_time_s": round(self.elapsed, 3),
            "peak_memory_mb": round(self.peak_memory_mb(), 1),
            "memory_kind": self.memory_kind,
            "throughput": round(items / self.elapsed, 3) if self.elapsed > 0 else 0.0,
            "throughput_unit": throughput_unit,
            "device": str(self.device),
            "num_processes": num_processes,
        }
