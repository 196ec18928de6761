"""What the device can do fast: native bf16 (CUDA compute capability >= 8.0; on CPUs AVX512-BF16 or AMX, without
which torch emulates bf16 and it is slower than fp32: results/bench/cpu_dtype.md) and TF32 matmuls on CUDA."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores


def bf16_supported(device) -> bool:
    """True on a CUDA device with native bf16 (compute capability >= 8.0). torch.cuda.is_bf16_supported() is also
    true on T4/V100 through emulation, where fp16 tensor cores are the fast path."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def low_precision_dtype(device) -> torch.dtype:
    """The 16-bit dtype that is fast on `device`: bf16 where native, else fp16."""
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def enable_tf32(device) -> bool:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (what stays fp32 outside autocast: an
    upcast LM head, fp32 weights without mixed precision). No-op elsewhere; -> whether it was enabled."""
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


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
        return "AMX" in torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return False


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cpu_threads(device, requested: int = 0, local_processes: int = 1, env=None) -> int:
    """On a CPU, run `requested` torch threads, or with 0 undo `accelerate launch`'s default of one -> threads in use.
    The launcher sets OMP_NUM_THREADS=1 unless its config says use_cpu: true, which the shipped config cannot (it
    would keep GPU machines on the CPU), so a CPU run would leave every other core idle; there 0 means usable
    cores / local processes. A run started without the launcher keeps OMP_NUM_THREADS / torch's default."""
    env = os.environ if env is None else env
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    if requested < 0:
        raise ValueError(f"--cpu-threads must be >= 0, got {requested}")
    launched = "ACCELERATE_DYNAMO_BACKEND" in env  # set by every `accelerate launch`, with OMP_NUM_THREADS
    if requested:
        torch.set_num_threads(requested)
    elif launched and env.get("OMP_NUM_THREADS") == "1":  # the launcher's default (or a user's 1: --cpu-threads 1)
        torch.set_num_threads(max(1, usable_cores() // max(1, local_processes)))
    return torch.get_num_threads()
