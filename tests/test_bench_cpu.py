"""Smoke runs of the CPU step benchmarks (bench_trainable_tokens.py, bench_cpu_dtype.py): they measure nothing on a
tiny model, but every variant must run and their numbers must be consistent."""
import json
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(LAUNCH))
    import bench_cpu_dtype
    import bench_trainable_tokens

    return bench_trainable_tokens, bench_cpu_dtype


def test_trainable_tokens_bench_trains_the_same_model_both_ways(scripts, tmp_path):
    tokens, _ = scripts
    tokens.main(["--quick", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "trainable_tokens.json").read_text())
    v = data["results"]["variants"]
    assert list(v) == ["lora", "lora+tokens-peft", "lora+tokens-indexed"]
    assert v["lora+tokens-peft"]["trainable"] == v["lora+tokens-indexed"]["trainable"] > v["lora"]["trainable"]
    # same init, same batch, same maths: PEFT's forward and the indexed one train identically
    assert v["lora+tokens-peft"]["losses"] == pytest.approx(v["lora+tokens-indexed"]["losses"], rel=1e-5)
    assert all(r["step_cpu_s"]["n"] == 1 and r["forward_s"]["median"] > 0 for r in v.values())
    assert "| lora+tokens-indexed |" in (tmp_path / "trainable_tokens.md").read_text()


def test_cpu_dtype_bench_keeps_adapters_fp32_and_compares_losses(scripts, tmp_path):
    _, dtype = scripts
    dtype.main(["--quick", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_dtype.json").read_text())["results"]
    v = data["variants"]
    assert list(v) == ["fp32", "bf16-autocast", "bf16-weights"]
    assert all(r["trainable_dtypes"] == ["torch.float32"] for r in v.values())
    assert v["fp32"]["max_rel_loss_gap"] == 0 and len(v["bf16-weights"]["losses"]) == 2
    assert data["fastest_matching"] in v and v[data["fastest_matching"]]["matches_fp32"]
    assert isinstance(data["cpu_bf16"], bool)
