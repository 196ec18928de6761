"""bench_llm.py / bench_generate.py at smoke-test sizes: every variant runs, the comparisons hold what they claim,
the real-size check runs its methods through the loop (a tiny config on the CPU), results files are written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import one_torch_thread, tiny_config  # noqa: F401

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(LAUNCH))
    try:
        import bench_generate
        import bench_llm
    finally:
        sys.path.remove(str(LAUNCH))
    return bench_llm, bench_generate


def test_every_variant_runs_and_the_comparison_is_consistent(scripts, tmp_path):
    bench_llm, _ = scripts
    results = bench_llm.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path), "--name", "llm"])
    variants = results["comparison"]["variants"]
    assert list(variants) == bench_llm.default_variants()
    assert ("trl-packed" in variants) == bench_llm.trl_available()
    # every trained model is scored on the same held-out tokens: a loss near ln(vocab) after two tiny steps
    assert all(0 < x < 20 for v in variants.values() for x in v["heldout_loss"])
    for v in variants.values():
        for clock in ("wall", "cpu"):
            assert v[clock]["tokens_per_s"]["median"] > 0 and v[clock]["step_s"]["median"] > 0
        assert v["tokens_per_run"] > 0
        assert all(loss is not None and 0 < loss < 20 for loss in v["final_loss"])  # ln(1024) = 6.9 at random
    # the bare loop trains on loop-packed's very batches; packed rows carry more real tokens than padded ones
    assert variants["bare-packed"]["tokens_per_run"] == variants["loop-packed"]["tokens_per_run"]
    assert variants["loop-packed"]["tokens_per_step"] > variants["loop-padded"]["tokens_per_step"]
    # Trainer's tokens are counted from exactly steps x batch examples, not from prefetched extra batches
    quick = bench_llm.QUICK_SIZES
    examples_seen = quick["steps"] * quick["batch_size"]
    assert variants["trainer-padded"]["tokens_per_run"] <= examples_seen * results["data"]["max_length_seen"]
    assert variants["trainer-padded"]["wall"]["vs_reference"] == pytest.approx(1.0)
    cmp_ = results["comparison"]
    assert cmp_["packed_over_reference"]["cpu"] == pytest.approx(variants["loop-packed"]["cpu"]["vs_reference"])
    loop, bare = variants["loop-packed"]["wall"]["seconds"]["median"], variants["bare-packed"]["wall"]["seconds"]["median"]
    assert cmp_["loop_overhead"]["wall"]["per_repeat"] == [pytest.approx(loop / bare - 1)]
    if "trl-packed" in variants:  # its packing keeps every example whole (none is longer than --max-length)
        packing = variants["trl-packed"]["packing"]
        assert packing["sequences"] == packing["examples"] == 48 and packing["tokens_cut"] == 0
        assert cmp_["packed_over_trl"]["cpu"] == pytest.approx(
            variants["loop-packed"]["cpu"]["tokens_per_s"]["median"] / variants["trl-packed"]["cpu"]["tokens_per_s"]["median"])
    d = results["data"]
    assert d["examples"] == 48 and 0.5 < d["block_fill"] <= 1 and d["tokens"] > d["label_tokens"] > 0
    saved = json.loads((tmp_path / "llm.json").read_text())
    assert saved["command"] and saved["machine"]["torch_threads"] == 1 and saved["settings"]["steps"] == 2
    md = (tmp_path / "llm.md").read_text()
    assert "| loop-packed |" in md and "trainer-padded" in md and "Loop overhead" in md
    assert "GPU section not run here" in md


def test_memory_probe_reports_the_rise_of_one_variant(scripts, tmp_path):
    bench_llm, _ = scripts
    out = tmp_path / "probe.json"
    bench_llm.main(["--quick", "--threads", "1", "--probe", "loop-packed", "--probe-out", str(out)])
    probe = json.loads(out.read_text())
    assert probe["variant"] == "loop-packed" and probe["tokens"] > 0
    assert probe["peak_rss_mb"] >= probe["rss_before_mb"] > 100 and probe["rise_mb"] >= 0


def test_real_size_check_runs_each_method_through_the_loop(scripts, tmp_path):
    bench_llm, _ = scripts
    args = bench_llm.BenchLLMArgs(real_size_length=48, real_size_steps=2, cache_dir=str(tmp_path),
                                  real_size_methods=["lora", "qlora", "prefix-tuning", "partial"])
    config = tiny_config("gemma2")
    out = bench_llm.real_size_check(args, torch.device("cpu"), config=config, log=lambda m: None)
    methods = out["methods"]
    assert list(methods) == ["lora", "qlora", "prefix-tuning", "partial"]
    assert out["params"] == sum(p.numel() for p in
                                __import__("transformers").AutoModelForCausalLM.from_config(config).parameters())
    for m in methods.values():
        assert m["peak_memory_mb"] > 0 and m["memory_kind"] == "rss" and m["step_s"] > 0
        assert 0 < m["trainable"] < m["total"] and m["checkpoint_mb"] > 0
    # partial trains 4 whole layers, more than LoRA's rank-8 adapters; QLoRA adapts the same modules as LoRA
    assert methods["partial"]["trainable"] > 5 * methods["lora"]["trainable"]
    assert methods["qlora"]["trainable"] == methods["lora"]["trainable"]
    md = bench_llm.real_size_markdown({"real_size": out})
    assert "| qlora |" in md and "random weights" in md


def test_real_size_on_cpu_is_refused_with_one_line(scripts, capsys):
    bench_llm, _ = scripts
    with pytest.raises(SystemExit) as e:
        bench_llm.main(["--real-size", "--device", "cpu"])
    assert e.value.code == 2
    assert "--real-size needs a CUDA GPU" in capsys.readouterr().err


def test_generation_bench_compares_batches_with_one_at_a_time(scripts, tmp_path):
    _, bench_generate = scripts
    results = bench_generate.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path),
                                   "--batch-sizes", "4"])
    g = results["generation"]
    assert list(g["batch_sizes"]) == [1, 4]  # batch 1, the baseline, is always added
    assert g["prompts"] == 15
    for v in g["batch_sizes"].values():
        assert 0 < v["tokens"] <= 15 * g["max_new_tokens"] and v["tokens_per_s"] > 0
        assert 0 <= v["same_answers_as_single"] <= 15
    assert g["batch_sizes"][1]["same_answers_as_single"] == 15 and g["batch_sizes"][1]["speedup"] == 1.0
    md = (tmp_path / "generate.md").read_text()
    assert "| batch size |" in md and "vs batch 1" in md
