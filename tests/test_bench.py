"""hwtools.bench helpers, and launch/bench_caption.py end to end in --quick mode (tiny sizes, all three archs)."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hwtools import bench

ROOT = Path(__file__).resolve().parents[1]


def test_interleaved_runs_rotate_the_order_and_warm_up_untimed():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name.upper()) for name in ("a", "b", "c")}
    warm = {name: (lambda name=name: calls.append("warm-" + name)) for name in fns}
    runs = bench.interleaved_runs(fns, repeats=3, warmup=1, warmup_fns=warm)
    assert calls == ["warm-a", "warm-b", "warm-c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in runs.items()} == {"a": 3, "b": 3, "c": 3}
    assert runs["b"][0].value == "B"
    with pytest.raises(ValueError):
        bench.interleaved_runs(fns, repeats=0)


def test_timed_measures_wall_and_cpu_time():
    run = bench.timed(lambda: time.sleep(0.05) or 7)
    assert run.value == 7
    assert 0.045 <= run.seconds < 1.0
    assert run.cpu_seconds < run.seconds  # sleeping costs no CPU
    busy = bench.timed(lambda: sum(i * i for i in range(300_000)))
    assert busy.cpu_seconds > 0


def test_summarize_and_rate():
    s = bench.summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert bench.rate(64, 2.0) == 32.0
    assert bench.rate(1, 0.0) == float("inf")


def test_markdown_table_formats_numbers():
    table = bench.markdown_table(["arch", "images/s"], [["attention", 12.3456], ["transformer", 12345.6], ["x", None]])
    lines = table.splitlines()
    assert lines[0] == "| arch | images/s |" and lines[1] == "|---|---|"
    assert lines[2] == "| attention | 12.3 |" and lines[3] == "| transformer | 12346 |" and lines[4] == "| x |  |"


def test_write_results_records_machine_versions_and_command(tmp_path):
    machine = bench.machine_info("cpu")
    assert machine["cpu"] and machine["cpu_cores_logical"] >= 1 and machine["torch_threads"] >= 1
    md, js = bench.write_results(tmp_path / "out", "demo", "Demo benchmark", {"ratio": 2.5}, "## Body\n\nhello",
                                 settings={"repeats": 3}, notes=["shared machine"], machine=machine,
                                 started_at=time.time() - 2)
    payload = json.loads(js.read_text())
    assert payload["results"] == {"ratio": 2.5} and payload["settings"] == {"repeats": 3}
    assert payload["command"] == bench.command_line() and "pytest" in payload["command"]
    assert payload["machine"]["cpu"] == machine["cpu"] and "load_average_1m_end" in payload["machine"]
    assert payload["versions"]["torch"] and payload["versions"]["transformers"] and payload["versions"]["timm"]
    assert payload["duration_s"] >= 2
    text = md.read_text()
    assert text.startswith("# Demo benchmark")
    assert payload["command"] in text and machine["cpu"] in text and "torch " + payload["versions"]["torch"] in text
    assert "- shared machine" in text and text.rstrip().endswith("hello")


def run_bench(args):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "bench_caption.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_bench_caption_quick_writes_every_measurement(tmp_path):
    out = tmp_path / "bench"
    proc = run_bench(["--quick", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out),
                      "--threads", "1", "--notes", "smoke test"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "caption.json").read_text())
    assert "--quick" in payload["command"] and "bench_caption.py" in payload["command"]
    assert payload["machine"]["torch_threads"] == 1 and payload["machine"]["device"] == "cpu"
    assert payload["settings"]["batch_size"] == 2 and payload["settings"]["quick"] is True
    assert payload["notes"][0] == "smoke test"
    archs = payload["results"]["archs"]
    assert list(archs) == ["cnn-rnn", "attention", "transformer"]
    for arch, r in archs.items():
        t, d = r["train"], r["decode"]
        assert r["feature_kind"] == ("pooled" if arch == "cnn-rnn" else "spatial")
        assert r["feature_shape"] == ([1280] if arch == "cnn-rnn" else [49, 1280])
        for variant in ("live", "cached"):
            assert t[variant]["seconds"]["n"] == 2 and t[variant]["images_per_s"] > 0
            assert set(t[variant]["ms_per_batch"]) == {"load", "encode", "decoder"}
        assert t["cached"]["ms_per_batch"]["encode"] < t["live"]["ms_per_batch"]["encode"]
        assert t["speedup"] == pytest.approx(t["live"]["seconds"]["median"] / t["cached"]["seconds"]["median"])
        assert t["speedup"] > 1  # even at batch 2 the encoder forward dwarfs a tiny decoder step
        assert t["meets_target"] == (t["speedup"] >= 5.0)
        assert d["images"] == 2 and d["beam_size"] == 3
        for mode in ("greedy_batched", "beam3_batched", "greedy_single"):
            assert d[mode]["images_per_s"] > 0 and 0 <= d[mode]["mean_words"] <= 20
        assert d["batched_over_single"] == pytest.approx(
            d["greedy_batched"]["images_per_s"] / d["greedy_single"]["images_per_s"])
        assert d["single_matches_batched"] == 1.0  # batching must not change a caption
    text = (out / "caption.md").read_text()
    assert payload["command"] in text
    for arch in archs:
        assert f"| {arch} | live |" in text and f"| {arch} | cached |" in text
    assert "## Decoding" in text and "smoke test" in text


def load_bench_caption():
    spec = importlib.util.spec_from_file_location("bench_caption", ROOT / "launch" / "bench_caption.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_caption"] = module  # dataclasses resolve string annotations through the module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--archs", "lstm"], "error: --archs lstm: choose from cnn-rnn, attention, transformer"),
    (["--batches", "0"], "error: --batches 0: must be >= 1"),
    (["--precision", "fp8"], "error: --precision fp8: choose auto, fp32 or bf16"),
])
def test_bench_caption_bad_flags_are_one_line_user_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        load_bench_caption().main(argv + ["--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def test_bench_gpu_script_refuses_without_cuda_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine would run the benchmarks")
    proc = subprocess.run(["bash", str(ROOT / "launch/bench_gpu.sh"), str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: bench_gpu.sh needs a CUDA device (torch.cuda.is_available() is False); the CPU benchmarks are "
        "launch/bench_*.py"]
    assert not any(tmp_path.iterdir())
