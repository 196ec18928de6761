"""Every number results/REPORT.md quotes is read through `Quotes.get`, which records where it came from (file and
selector) beside the value and the text printed, so a test can re-read each source and compare.

Selectors (sources are paths relative to the repository root):
  json:/a/b/0              a JSON value by pointer (list indices are numbers)
  json:/a/b * /c/d         two pointers (or a pointer and a number) joined by one of + - * /
  jsonl:SPLIT:FIELD:AGG    over a metrics.jsonl's events of that split (an event logged twice at one step counts
                           once): first, last, min, max, count, mean, q1mean / q4mean (mean of the first / last
                           quarter of the points), q4std (their standard deviation in the last quarter), and
                           argmin:KEY (the KEY, e.g. step or epoch, of the lowest value)
  chrfwins:                the number of generations.json prompts whose answer's chrF rose (after > before)
  errorsmd:IMAGE:bleu4|generated   an image's entry in a caption run's errors.md
  chrf:ID:before|after     sentence chrF of a generations.json answer against its reference (sacrebleu)
Rankings are recorded by the builder with a list of sources: argmin:/a/b, argmax:/a/b (the run folder whose JSON
value is lowest / highest) and argmax-key:/a (the key of the largest count in one JSON object).
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def pointer(doc, ptr: str):
    """doc at a JSON pointer such as /test/chrf (KeyError / IndexError when absent)."""
    cur = doc
    for part in [p for p in ptr.split("/") if p]:
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


class Quotes:
    """Reads sources under `root` (cached) and records every quoted value."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.records: list[dict] = []
        self._cache: dict[str, Any] = {}

    def load(self, source: str):
        if source not in self._cache:
            path = self.root / source
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".jsonl":
                self._cache[source] = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                self._cache[source] = json.loads(text)
        return self._cache[source]

    def value(self, source: str, selector: str):
        kind, _, rest = selector.partition(":")
        if kind == "json":
            doc = self.load(source)
            parts = rest.split()
            if len(parts) == 3:
                left, op, right = parts
                lv = pointer(doc, left) if left.startswith("/") else float(left)
                rv = pointer(doc, right) if right.startswith("/") else float(right)
                return OPS[op](lv, rv)
            return pointer(doc, rest)
        if kind == "jsonl":
            split, field, agg, *key = rest.split(":")
            events = list({(e.get("step"), e.get("epoch")): e for e in self.load(source)
                           if e.get("split") == split and e.get(field) is not None}.values())
            values = [e[field] for e in events]
            if agg == "argmin":
                return min(events, key=lambda e: e[field])[key[0]]
            quarter = max(1, len(values) // 4)
            if agg == "q4std":
                tail = values[-quarter:]
                mean = sum(tail) / len(tail)
                return (sum((v - mean) ** 2 for v in tail) / len(tail)) ** 0.5
            return {"first": lambda v: v[0], "last": lambda v: v[-1], "min": min, "max": max, "count": len,
                    "mean": lambda v: sum(v) / len(v), "q1mean": lambda v: sum(v[:quarter]) / quarter,
                    "q4mean": lambda v: sum(v[-quarter:]) / quarter}[agg](values)
        if kind == "chrfwins":
            rows = self.load(source)
            return sum(self.value(source, f"chrf:{r['id']}:after") > self.value(source, f"chrf:{r['id']}:before")
                       for r in rows)
        if kind == "errorsmd":
            image, what = rest.split(":")
            entry = errors_md_entries((self.root / source).read_text(encoding="utf-8")).get(image)
            if entry is None:
                raise KeyError(f"{image} not in {source}")
            return entry[what]
        if kind == "chrf":
            import sacrebleu

            pid, side = rest.split(":")
            row = next(r for r in self.load(source) if r["id"] == pid)
            return sacrebleu.sentence_chrf(row[side] or "", [row["reference"]]).score
        raise ValueError(f"unknown selector {selector!r}")

    def get(self, source: str, selector: str, fmt: str = "s") -> str:
        """The formatted value, recorded with its source."""
        value = self.value(source, selector)
        text = format_value(value, fmt)
        self.records.append({"source": source, "selector": selector, "fmt": fmt, "value": value, "text": text})
        return text


def errors_md_entries(text: str) -> dict:
    """{image: {"bleu4": float, "generated": str}} from the "Lowest sentence BLEU-4" list of an errors.md."""
    import re

    entries = {}
    for m in re.finditer(r"^### \d+\. (\S+) \(BLEU-4 ([0-9.]+)\)\n\n- generated: (.*)$", text, re.M):
        entries[m.group(1)] = {"bleu4": float(m.group(2)), "generated": m.group(3).strip()}
    return entries


def format_value(value, fmt: str) -> str:
    """format(value, fmt); `s` is str(), `k` thousands with one decimal (7.5 k)."""
    if fmt == "s":
        return str(value)
    if fmt == "k":
        return f"{value / 1000:.1f} k"
    return format(value, fmt)
