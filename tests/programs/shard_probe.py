"""Run under torchrun by test_two_processes.py (argument: a spec.json): build each recipe's train and validation
loaders as the recipe does, prepare them as the loop does, and record which examples each rank gets (train: one
epoch; validation: through hwtools' evaluate()) in the spec's "out" file."""
import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import AutoTokenizer

from hwtools.caption import pipeline as cap
from hwtools.caption.vocab import Vocab
from hwtools.config import LoopConfig
from hwtools.data_report import DataReport
from hwtools.llm import pipeline as llm_pipeline
from hwtools.train.loop import evaluate, make_accelerator

spec = json.loads(Path(sys.argv[1]).read_text())
acc = make_accelerator(LoopConfig(seed=42))
probe = acc.prepare(torch.nn.Linear(1, 1))  # DDP-wrapped, as the model is when the loop evaluates


def record(loader, key_fn, key_index, train):
    seen = []
    if train:
        loader.set_epoch(0)
        for batch in loader:
            seen += [key_index[k] for k in key_fn(batch)]
    else:
        def loss_fn(model, batch):
            keys = key_fn(batch)
            seen.extend(key_index[k] for k in keys)
            return torch.zeros((), device=acc.device), float(len(keys))
        evaluate(acc, probe, loader, loss_fn)
    return gather_object([seen])


def probe_loaders(name, datasets, loaders, key_of_item, key_fn):
    for split, train in (("train", True), ("validation", False)):
        keys = [key_of_item(item) for item in datasets[split]]
        key_index = {}
        for k in keys:
            key_index.setdefault(k, len(key_index))
        result = record(acc.prepare(loaders[split]), key_fn, key_index, train)
        out[f"{name}/{split}"] = {"dataset": [key_index[k] for k in keys], "ranks": result,
                                 "batch_size": loaders[split].batch_size}


out = {}
# LLM: packed blocks, as the recipe builds them; a larger validation split than the default, so that its batches
# reach both ranks
tok = AutoTokenizer.from_pretrained(spec["model"])
splits = llm_pipeline.load_splits(spec["data"], DataReport(), val_frac=0.2, seed=42)
loaders = llm_pipeline.build_loaders(tok, splits, DataReport(), max_length=96, batch_size=spec["llm_batch"], seed=42,
                                     packing=True)
pad = tok.pad_token_id


def block_keys(batch):
    rows = batch["input_ids"].tolist()
    while any(r and r[-1] == pad for r in rows):
        rows = [r[:-1] if r and r[-1] == pad else r for r in rows]
    return [tuple(r) for r in rows]


probe_loaders("llm", {s: loaders[s].dataset for s in loaders}, loaders, lambda b: tuple(b["input_ids"]), block_keys)

# captions: the recipe's datasets and loaders over the embedded set (features stubbed: only the order matters here)
csplits = cap.load_splits("embedded", spec["cache"], 42, DataReport(), 32, 6)
vocab = Vocab.build([c for caps in csplits["train"].values() for c in caps], 5)
feats = {p: torch.zeros(1) for items in csplits.values() for p in items}
inputs = cap.ImageInputs(feats, None, None, "stub")
cdata = {s: cap.make_dataset(csplits[s], vocab, 20, inputs, train=s == "train") for s in ("train", "validation")}
cloaders = {"train": cap.make_loader(cdata["train"], spec["caption_batch"], shuffle=True),
            "validation": cap.make_loader(cdata["validation"], 4, shuffle=False)}


def caption_keys(batch):
    return [(img, tuple(ids)) for img, ids in zip(batch["image_id"], batch["caption_ids"].tolist())]


probe_loaders("caption", cdata, cloaders, lambda it: (it["image_id"], tuple(it["caption_ids"].tolist())), caption_keys)
if acc.is_main_process:
    Path(spec["out"]).write_text(json.dumps(out))
