"""CPU bf16 detection (AVX512-BF16 / AMX from /proc/cpuinfo), what --dtype auto makes of it, CPU threads."""
import pytest
import torch

from hwtools.device import cpu_flags, cpu_has_bf16

SAPPHIRE_RAPIDS = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: avx512_bf16\n"


def test_bf16_instructions_are_read_from_the_first_cpus_flags():
    assert {"avx512_bf16", "amx_tile"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_has_bf16(SAPPHIRE_RAPIDS)
    assert cpu_flags(ZEN3) == {"fpu", "sse", "avx", "avx2", "fma"} and not cpu_has_bf16(ZEN3)
    assert cpu_has_bf16("flags\t: avx512f amx_bf16\n") and not cpu_has_bf16("flags\t: avx512f avx512bw\n")
    assert cpu_has_bf16() == any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16")) or not cpu_flags()


def test_dtype_auto_picks_bf16_only_on_a_bf16_cpu(monkeypatch):
    import hwtools.device as device
    from hwtools.llm.models import weights_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert weights_dtype("auto", cpu, "lora") == torch.bfloat16
    assert weights_dtype("auto", cpu, "full") == torch.float32  # every weight trains: fp32 master weights
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert weights_dtype("auto", cpu, "lora") == torch.float32
    assert weights_dtype("bf16", cpu) == torch.bfloat16  # an explicit choice stays


def test_cpu_runs_use_every_usable_core_unless_told_otherwise():
    """accelerate launch leaves OMP_NUM_THREADS=1 (use_cpu: false); the loop spreads the cores over the processes."""
    from hwtools.device import usable_cores, use_cpu_threads

    launched = {"ACCELERATE_DYNAMO_BACKEND": "no", "OMP_NUM_THREADS": "1"}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert use_cpu_threads("cpu", 0, 1, launched) == usable_cores()
        assert use_cpu_threads("cpu", 0, usable_cores() * 4, launched) == 1
        assert use_cpu_threads("cpu", 1, 1, launched) == 1  # --cpu-threads 1
        torch.set_num_threads(1)
        assert use_cpu_threads("cpu", 0, 1, {"OMP_NUM_THREADS": "1"}) == 1  # plain python: OMP_NUM_THREADS holds
        assert use_cpu_threads("cpu", 0, 1, {**launched, "OMP_NUM_THREADS": "3"}) == 1  # a user's own value holds
        assert use_cpu_threads("cuda", 0, 1, launched) == 1  # a GPU run keeps accelerate's setting
        with pytest.raises(ValueError):
            use_cpu_threads("cpu", -1, 1)
    finally:
        torch.set_num_threads(before)
