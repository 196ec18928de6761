"""compare.py builds tables and plots from summary.json files only; missing values print as '-'."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_run(root: Path, name: str, summary: dict, losses=(3.0, 2.0, 1.5)):
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": i + 1, "split": "train", "loss": v} for i, v in enumerate(losses)]
    lines.append({"step": len(losses), "split": "eval", "loss": losses[-1] + 0.1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_compare_writes_sorted_tables_with_dashes(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "lora", {"task": "llm", "method": "lora", "model": "m", "params": {"trainable": 737280,
             "total": 268835456, "trainable_pct": 0.27}, "resources": {"peak_memory_mb": 7800.0,
             "train_time_s": 61.5, "throughput": 120.0}, "train": {"steps": 3, "final_loss": 1.5},
             "eval": {"loss": 1.6}, "test": {"perplexity": 5.0, "chrf": 30.0, "base_chrf": 20.0}})
    fake_run(runs, "prompt", {"task": "llm", "method": "prompt-tuning", "model": "m",
             "params": {"trainable": 12800, "total": 268110976, "trainable_pct": 0.005}, "test": None})
    # the same method with its turn tokens trained is another row, not a duplicate of lora
    fake_run(runs, "lora-chat", {"task": "llm", "method": "lora", "model": "m", "trainable_tokens": "chat",
             "params": {"trainable": 738560}})
    fake_run(runs, "att", {"task": "caption", "arch": "attention", "model": "enc", "params": {"trainable": 10,
             "total": 20}, "test": {"bleu1": 0.7, "bleu4": 0.3, "meteor": None}})
    (runs / "broken").mkdir()  # no summary: skipped, not a crash
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/compare.py"), *map(str, sorted(runs.iterdir())),
                           "--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(open(out / "llm_comparison.csv")))
    header = rows[0]
    # fewest trainable parameters first
    assert [r[0] for r in rows[1:]] == ["prompt-tuning", "lora", "lora +tokens(chat)"]
    lora = dict(zip(header, rows[2]))
    assert lora["trainable params"] == "737,280" and lora["chrF before"] == "20.00" and lora["chrF after"] == "30.00"
    prompt = dict(zip(header, rows[1]))
    assert prompt["eval loss"] == "-" and prompt["peak memory (MB)"] == "-"
    cap = dict(zip(*list(csv.reader(open(out / "caption_comparison.csv")))))
    assert cap["BLEU-1"] == "0.7000" and cap["METEOR"] == "-"
    for png in ("llm_loss_curves.png", "llm_resources.png", "caption_loss_curves.png"):
        assert (out / png).stat().st_size > 5000
    assert "| prompt-tuning |" in (out / "llm_comparison.md").read_text()


def test_compare_with_nothing_to_compare_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/compare.py"), str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: none of the 1 directories")


def test_compare_rebuilds_the_committed_tables_from_the_committed_summaries(tmp_path):
    """The tables under results/ are exactly what compare.py makes of results/reference/*: nobody edited them."""
    refs = sorted(p for p in (ROOT / "results/reference").iterdir() if (p / "summary.json").is_file())
    assert {p.name for p in refs} >= {"llm-lora", "llm-qlora", "llm-full", "caption-attention"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch/compare.py"), *map(str, refs), "--output-dir",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in ("llm_comparison.md", "llm_comparison.csv", "caption_comparison.md", "caption_comparison.csv"):
        assert (tmp_path / name).read_text() == (ROOT / "results" / name).read_text(), name
