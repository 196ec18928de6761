"""What the CPU can do fast: bf16 matmuls need AVX512-BF16 or AMX; without them torch emulates bf16 and it is slower
than fp32 (launch/bench_cpu_dtype.py, results/bench/cpu_dtype.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Optional[str] = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (or the given text); empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.split(":", 1)[0].strip() in ("flags", "Features"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16(cpuinfo: Optional[str] = None) -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), where bf16 beats fp32."""
    flags = cpu_flags(cpuinfo)
    if flags:
        return any(f in flags for f in BF16_CPU_FLAGS)
    try:  # no /proc/cpuinfo (not Linux): torch's own dispatch level, AMX implies bf16
        import torch

        return "AMX" in torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        return False
