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


# ---------------------------------------------------------------------------------------------------- REPORT.md
# An independent reader of the selectors documented in hwtools/report_sources.py: the report's numbers are checked
# against the files by code that does not share the builder's.
import re  # noqa: E402


def _ptr(doc, ptr):
    for part in [p for p in ptr.split("/") if p]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _read(root: Path, source: str):
    text = (root / source).read_text(encoding="utf-8")
    if source.endswith(".jsonl"):
        return [json.loads(x) for x in text.splitlines() if x.strip()]
    return text if source.endswith(".md") else json.loads(text)


def _reread(root: Path, rec: dict):
    kind, _, rest = rec["selector"].partition(":")
    if kind == "argmax-key":
        counts = _ptr(_read(root, rec["source"][0]), rest)
        return max(counts, key=counts.get)
    if kind in ("argmin", "argmax"):
        scored = [(_ptr(_read(root, s), rest), s.split("/")[-2]) for s in rec["source"]]
        return (min if kind == "argmin" else max)(scored)[1]
    doc = _read(root, rec["source"])
    if kind == "json":
        parts = rest.split()
        if len(parts) == 3:
            a, op, b = parts
            a = _ptr(doc, a) if a.startswith("/") else float(a)
            b = _ptr(doc, b) if b.startswith("/") else float(b)
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        return _ptr(doc, rest)
    if kind == "jsonl":
        split, field, agg, *key = rest.split(":")
        seen = {}
        for e in doc:
            if e.get("split") == split and e.get(field) is not None:
                seen[(e.get("step"), e.get("epoch"))] = e
        events = list(seen.values())
        vals = [e[field] for e in events]
        q = max(1, len(vals) // 4)
        if agg == "argmin":
            return min(events, key=lambda e: e[field])[key[0]]
        if agg == "q4std":
            import statistics
            return statistics.pstdev(vals[-q:])
        return {"first": vals[0], "last": vals[-1], "min": min(vals), "max": max(vals), "count": len(vals),
                "mean": sum(vals) / len(vals), "q1mean": sum(vals[:q]) / q, "q4mean": sum(vals[-q:]) / q}[agg]
    if kind in ("chrf", "chrfwins"):
        import sacrebleu

        def score(row, side):
            return sacrebleu.sentence_chrf(row[side] or "", [row["reference"]]).score
        if kind == "chrfwins":
            return sum(score(r, "after") > score(r, "before") for r in doc)
        pid, side = rest.split(":")
        return score(next(r for r in doc if r["id"] == pid), side)
    if kind == "errorsmd":
        image, what = rest.split(":")
        m = re.search(rf"^### \d+\. {re.escape(image)} \(BLEU-4 ([0-9.]+)\)\n\n- generated: (.*)$", doc, re.M)
        return float(m.group(1)) if what == "bleu4" else m.group(2).strip()
    raise AssertionError(f"unknown selector {rec['selector']}")


def _fmt(value, fmt):
    if fmt == "s":
        return str(value)
    if fmt == "k":
        return f"{value / 1000:.1f} k"
    return format(value, fmt)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """results/REPORT.md rebuilt into a temporary folder from the committed runs (once for the tests below)."""
    from hwtools.report_build import build_report

    out_dir = tmp_path_factory.mktemp("report")
    return out_dir, build_report(ROOT, out_dir).read_text(encoding="utf-8")


def test_report_rebuilds_with_every_link_present_and_every_number_from_its_source(rebuilt):
    tmp_path, text = rebuilt
    records = json.loads((tmp_path / "REPORT.sources.json").read_text(encoding="utf-8"))
    assert len(records) > 300, len(records)
    assert "{{" not in text and "(not run)" not in text
    # every assignment part has its section
    for part in ("1-1", "1-2", "1-3", "1-4", "1-5", "2-2", "2-3", "2-4", "2-5", "2-6"):
        assert f"### {part} " in text, part
    # figures and tables are numbered in order, each once
    figs = [int(n) for n in re.findall(r"^\*Figure (\d+)\.", text, re.M)]
    tabs = [int(n) for n in re.findall(r"^\*Table (\d+)\.", text, re.M)]
    assert figs == list(range(1, len(figs) + 1)) and len(figs) >= 12
    assert tabs == list(range(1, len(tabs) + 1)) and len(tabs) >= 10
    # every relative link resolves from the report's folder
    links = [l for l in re.findall(r"\]\(([^)\s]+)\)", text) if not l.startswith(("http", "#"))]
    assert links
    missing = [l for l in links if not (tmp_path / l).exists()]
    assert not missing, missing
    # every quoted number is what its source holds, and appears in the text
    for rec in records:
        sources = rec["source"] if isinstance(rec["source"], list) else [rec["source"]]
        assert all((ROOT / s).is_file() for s in sources), rec
        value = _reread(ROOT, rec)
        if isinstance(rec["source"], list):  # a ranking: the winner's run folder
            assert value == rec["value"], rec
        else:
            assert _fmt(value, rec["fmt"]) == rec["text"], rec
        assert rec["text"] in text, rec


def test_committed_report_is_what_the_builder_makes(rebuilt):
    """results/REPORT.md is generated: nobody edited it by hand."""
    import os

    tmp_path, rebuilt = rebuilt
    # links from tmp point back into the checkout: make them relative to results/ as in the committed copy
    up = os.path.relpath(ROOT, tmp_path).replace(os.sep, "/")
    rebuilt = rebuilt.replace(f"]({up}/results/", "](").replace(f"]({up}/", "](../")
    assert rebuilt == (ROOT / "results/REPORT.md").read_text(encoding="utf-8")
