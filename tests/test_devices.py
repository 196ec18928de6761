"""CPU bf16 detection (AVX512-BF16 / AMX from /proc/cpuinfo) and what --dtype auto makes of it."""
import sys
from pathlib import Path

import torch

from hwtools.devices import cpu_flags, cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]
SAPPHIRE_RAPIDS = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: avx512_bf16\n"


def test_bf16_instructions_are_read_from_the_first_cpus_flags():
    assert {"avx512_bf16", "amx_tile"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_has_bf16(SAPPHIRE_RAPIDS)
    assert cpu_flags(ZEN3) == {"fpu", "sse", "avx", "avx2", "fma"} and not cpu_has_bf16(ZEN3)
    assert cpu_has_bf16("flags\t: avx512f amx_bf16\n") and not cpu_has_bf16("flags\t: avx512f avx512bw\n")
    assert cpu_has_bf16() == any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16")) or not cpu_flags()


def test_dtype_auto_picks_bf16_only_on_a_bf16_cpu(monkeypatch):
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train_llm
    finally:
        sys.path.pop(0)
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_llm, "cpu_has_bf16", lambda: True)
    assert train_llm.weights_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(train_llm, "cpu_has_bf16", lambda: False)
    assert train_llm.weights_dtype("auto", cpu) == torch.float32
    assert train_llm.weights_dtype("bf16", cpu) == torch.bfloat16  # an explicit choice stays
