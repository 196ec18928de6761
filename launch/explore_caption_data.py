"""Look at a captioning data set before training: sample images, caption lengths, frequent words, vocabulary size.

    python launch/explore_caption_data.py --data embedded --output-dir results/runs/explore --min-freq 2

Writes samples.png, caption_lengths.png, caption_length_hist.png, top_words.png, top_words_no_stop.png and
stats.json to --output-dir, and prints the images and captions read (and skipped, by reason), the split, the
vocabulary size, its coverage at --min-freq and the length percentiles that justify --max-len. The vocabulary is built
on the train split only, as training does; the most frequent words are counted over all captions (the assignment's
figure). --split official uses Flickr8k's own lists. `--output-dir results/explore/caption` is the committed copy
that results/REPORT.md reads.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

from hwtools import plots
from hwtools.caption.data import SPLIT_CHOICES, load_captions, make_splits, official_lists, open_rgb
from hwtools.caption.vocab import Vocab, clean_caption, coverage, word_counts
from hwtools.data_report import DataReport
from hwtools.errors import UserError, cli_main

# A short English stop-word list: nltk's needs a download, which this tool cannot assume.
STOP_WORDS = frozenset(
    "a an the and or but of in on at to for from by with without into onto over under above below near next is are "
    "was were be been being it its this that these those there here some all his her their they he she them as "
    "while who which what up down out off".split())
PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class ExploreArgs:
    data: str = field(default="embedded", metadata={
        "help": "`embedded`, a Flickr8k folder (original or Kaggle layout), a datasets folder, or a hub id"})
    output_dir: str = field(default="", metadata={"help": "default results/runs/caption-explore-<timestamp>"})
    min_freq: int = field(default=2, metadata={"help": "words seen fewer times in train become <unk>"})
    seed: int = field(default=42, metadata={"help": "seed of the split and of the sample images"})
    split: str = field(default="random", metadata={
        "help": "random: 80/10/10 by image with --seed; official: Flickr8k's Flickr_8k.{train,dev,test}Images.txt"})
    cache_dir: str = field(default_factory=lambda: os.environ.get("HWTOOLS_CACHE", "~/.cache/hwtools"),
                           metadata={"help": "where the embedded set and converted images live"})


def explore(args: ExploreArgs) -> dict:
    """Write the figures and stats.json for args.data; return the stats."""
    out = Path(args.output_dir or f"results/runs/caption-explore-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.split == "official":
        official_lists(args.data, args.cache_dir)  # absent: stop before reading every image
    report = DataReport()
    items = load_captions(args.data, report, args.cache_dir)
    splits = make_splits(items, args.split, args.data, args.cache_dir, args.seed)
    train_caps = [c for caps in splits["train"].values() for c in caps]
    val_caps = [c for caps in splits["validation"].values() for c in caps]
    vocab = Vocab.build(train_caps, args.min_freq)
    counts = word_counts(train_caps)
    cov = coverage(counts, args.min_freq)
    val_counts = word_counts(val_caps)
    val_total = sum(val_counts.values())
    val_oov = sum(n for w, n in val_counts.items() if w not in vocab.stoi) / val_total if val_total else 0.0

    all_caps = [c for caps in items.values() for c in caps]
    # Length as the decoder sees it: cleaned words plus <start> and <end>.
    lengths = np.array([len(clean_caption(c)) + 2 for c in all_caps])
    pct = {f"p{p}": int(np.percentile(lengths, p)) for p in PERCENTILES}

    rng = random.Random(args.seed)
    sample = rng.sample(sorted(items), min(5, len(items)))
    images = []
    for path in sample:
        images.append(open_rgb(path))
    shown = [rng.choice(items[p]) for p in sample]
    plots.image_grid(images, shown, out / "samples.png", title=args.data)
    # Token counts are integers: a little vertical jitter shows how many captions sit on each length.
    jitter = np.random.default_rng(args.seed).uniform(-0.25, 0.25, len(lengths))
    plots.scatter([len(c) for c in all_caps], lengths + jitter, out / "caption_lengths.png",
                  title="caption lengths", xlabel="raw caption length (characters)",
                  ylabel="tokens incl. <start>/<end> (jittered)", alpha=0.15)
    plots.histogram(lengths, out / "caption_length_hist.png", title="caption lengths",
                    xlabel="tokens incl. <start>/<end>", bins=int(lengths.max() - lengths.min() + 1))
    # the assignment asks for the most frequent words over all captions (the vocabulary above stays train-only)
    all_counts = word_counts(all_caps)
    top = all_counts.most_common(20)
    plots.bar_chart([w for w, _ in top], [n for _, n in top], out / "top_words.png",
                    title="20 most frequent words (all captions)", ylabel="count", horizontal=True)
    top_content = Counter({w: n for w, n in all_counts.items() if w not in STOP_WORDS}).most_common(20)
    plots.bar_chart([w for w, _ in top_content], [n for _, n in top_content], out / "top_words_no_stop.png",
                    title="20 most frequent words without stop words (all captions)", ylabel="count",
                    horizontal=True)

    stats = {
        "data": args.data, "images": len(items), "captions": len(all_caps),
        "split": args.split, "split_images": {k: len(v) for k, v in splits.items()},
        "images_in_no_split": len(items) - sum(len(v) for v in splits.values()),
        "min_freq": args.min_freq, "vocab_size": len(vocab), "word_types_train": cov["types"],
        "train_token_coverage": cov["token_coverage"], "validation_oov_rate": val_oov,
        "length_percentiles": pct, "suggested_max_len": pct["p99"],
        "truncated_at_suggested": float((lengths > pct["p99"]).mean()),
        "mean_length": float(lengths.mean()), "word_tokens_all": int(sum(all_counts.values())),
        "word_types_all": len(all_counts), "top_words": top, "top_words_no_stop": top_content,
        "samples": [{"image": Path(p).name, "caption": c} for p, c in zip(sample, shown)],
        "data_report": report.as_dict(), "args": asdict(args),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats | {"output_dir": str(out)}


@cli_main
def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(ExploreArgs).parse_args_into_dataclasses(args=argv)
    if args.min_freq < 1:
        raise UserError(f"--min-freq must be >= 1, got {args.min_freq}")
    if args.split not in SPLIT_CHOICES:
        raise UserError(f"--split {args.split}: choose one of {', '.join(SPLIT_CHOICES)}")
    s = explore(args)
    pct = s["length_percentiles"]
    dr = s["data_report"]
    print(f"images {s['images']}, captions {s['captions']} ({dr['rows_read']} caption lines read, "
          f"{dr['rows_skipped']} skipped{': ' if dr['rows_skipped'] else ''}"
          + ", ".join(f"{r} {n}" for r, n in dr["skipped_by_reason"].items()) + ")")
    print(f"split ({s['split']}) {s['split_images']}"
          + (f"; {s['images_in_no_split']} image(s) in no list" if s["images_in_no_split"] else ""))
    print(f"vocabulary size {s['vocab_size']} (incl. 4 specials) at --min-freq {s['min_freq']}: "
          f"{s['vocab_size'] - 4} of {s['word_types_train']} train word types, "
          f"covering {100 * s['train_token_coverage']:.2f}% of train tokens; "
          f"validation OOV rate {100 * s['validation_oov_rate']:.2f}%")
    print("caption length (tokens incl. <start>/<end>): "
          + ", ".join(f"{k} {v}" for k, v in pct.items())
          + f" -> --max-len {s['suggested_max_len']} truncates {100 * s['truncated_at_suggested']:.2f}% of captions")
    print(f"wrote {s['output_dir']}")


if __name__ == "__main__":
    main()
