"""The pieces of a captioning run, from its settings: arch settings, data splits, vocabulary, image inputs (feature
cache or live transforms), datasets and loaders, and the files the run ends with. train_caption.py assembles them;
eval_caption.py and bench_caption.py build the same inputs (hwtools.caption.final saves and rebuilds the model).

The twin of hwtools.llm.pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch.utils.data import DataLoader

from hwtools.caption.data import (SPLIT_CHOICES, CaptionDataset, collate_captions, load_captions, make_splits,
                                  official_lists)
from hwtools.caption.encoders import build_encoder
from hwtools.caption.evaluate import evaluate_and_report
from hwtools.caption.features import load_or_build_feature_cache
from hwtools.caption.final import save_final
from hwtools.caption.models import ARCHS, arch_spec, caption_loss, encoder_output_for
from hwtools.caption.transforms import build_transforms
from hwtools.caption.vocab import Vocab
from hwtools.data_report import DataReport
from hwtools.device import usable_cores
from hwtools.errors import UserError
from hwtools.train.run_end import write_run_end


def describe_arch_defaults() -> str:
    """The archs' training defaults (models.ARCHS) as one line, for --help."""
    return "; ".join(f"{a}: " + ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) for a, spec in ARCHS.items())


def apply_arch_defaults(cfg) -> None:
    """Give the config's unset (None) per-arch fields the values of its arch (an unknown arch: UserError)."""
    for name, value in arch_spec(cfg.arch).defaults.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)


def check_split(split: str) -> None:
    if split not in SPLIT_CHOICES:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLIT_CHOICES)}")


def decoder_knobs(arch: str, cfg) -> dict:
    """Constructor keywords of the arch's decoder, taken from the config fields of the same meaning."""
    return {keyword: getattr(cfg, name) for keyword, name in arch_spec(arch).knobs.items()}


# ------------------------------------------------------------------------------------------------------- data


def load_splits(data: str, cache_dir, seed: int, report: DataReport, max_train_images: int = 0,
                max_eval_images: int = 0, split: str = "random") -> dict[str, dict[str, list[str]]]:
    """train/validation/test {image path: raw captions}: `random` splits 80/10/10 by image with `seed`, `official`
    follows Flickr8k's lists; the optional limits keep the first N images of a split (quick runs and tests)."""
    if split == "official":
        official_lists(data, cache_dir)  # absent lists: stop before reading and checking every image
    splits = make_splits(load_captions(data, report, cache_dir), split, data, cache_dir, seed)
    limits = {"train": max_train_images, "validation": max_eval_images, "test": max_eval_images}
    out = {}
    for name, items in splits.items():
        n = limits[name]
        out[name] = dict(list(items.items())[:n]) if n > 0 else items
        if not out[name]:
            raise UserError(f"{data}: the {name} split is empty ({len(splits[name])} images before limits); "
                            f"use a data set with more images")
    return out


def load_or_build_vocab(train_items: Mapping[str, list[str]], min_freq: int,
                        existing: Optional[Path] = None) -> Vocab:
    """The vocabulary of the train split's captions, or the one saved at `existing` (a resumed run keeps its ids)."""
    if existing is not None and Path(existing).is_file():
        return Vocab.load(existing)
    return Vocab.build([c for caps in train_items.values() for c in caps], min_freq)


# ---------------------------------------------------------------------------------------------------- encoder


@dataclass
class ImageInputs:
    """How images reach the decoder: cached `features` {path: tensor} (frozen encoder, no augmentation) or the
    train/eval transforms for the encoder to run live."""

    features: Optional[dict]
    train_transform: Optional[Callable]
    eval_transform: Callable
    cache_note: str


def build_image_encoder(arch: str, encoder: str, pretrained: bool, weights: Optional[str], finetune_blocks: int,
                        log: Optional[Callable[[str], None]] = print):
    """The timm encoder with the output kind the arch reads -> (module, timm data config)."""
    built = build_encoder(encoder, encoder_output_for(arch), pretrained=pretrained, weights_path=weights,
                          finetune_blocks=finetune_blocks, log=log)
    return built.module, built.data_config


def prepare_image_inputs(encoder, data_config: dict, splits: Mapping[str, Mapping], use_cache: bool, cache_dir,
                         device, report: Optional[DataReport] = None, batch_size: int = 32,
                         log: Optional[Callable[[str], None]] = print) -> ImageInputs:
    """Encode every image once when the encoder is frozen and `use_cache` (on disk when the weights are known,
    keyed by encoder + weights + output + transform); otherwise return the transforms for end-to-end training, with
    augmentation only when the encoder trains."""
    eval_tf = build_transforms(data_config, train=False)
    if not encoder.frozen:
        return ImageInputs(None, build_transforms(data_config, train=True), eval_tf, "end to end (encoder trains)")
    if not use_cache:
        return ImageInputs(None, eval_tf, eval_tf, "live encoding (feature cache off)")
    paths = [p for items in splits.values() for p in items]
    encoder.to(device)
    if encoder.weights_id is None:  # random weights: features only mean something for this process's encoder
        from hwtools.caption.features import encode_images

        feats = encode_images(encoder, paths, eval_tf, batch_size, device=device, report=report)
        return ImageInputs(feats, None, eval_tf, "features in memory (random encoder weights, not cached)")
    feats = cached_features(encoder, paths, eval_tf, cache_dir, batch_size, device, report, log)
    return ImageInputs(feats, None, eval_tf, "cached features")


def cached_features(encoder, paths, eval_tf, cache_dir, batch_size: int = 32, device=None,
                    report: Optional[DataReport] = None, log: Optional[Callable[[str], None]] = print) -> dict:
    """{path: features} of a frozen encoder with known weights, from the on-disk cache every script shares (keyed
    by encoder + weights + output + transform), encoding the images it lacks."""
    # "upright": features of images read with their EXIF orientation applied (older caches did not)
    key = (encoder.name, encoder.weights_id, encoder.output, repr(eval_tf), "upright")
    return load_or_build_feature_cache(Path(cache_dir).expanduser() / "caption-features", key, encoder, paths,
                                       eval_tf, batch_size, device=device, report=report, log=log)


def make_dataset(items, vocab: Vocab, max_len: int, inputs: ImageInputs, train: bool) -> CaptionDataset:
    """A split's dataset reading cached features or transformed images (train augmentation only for train)."""
    if inputs.features is not None:
        items = {p: caps for p, caps in items.items() if p in inputs.features}  # unreadable ones were skipped
        return CaptionDataset(items, vocab, max_len, train=train, features=inputs.features)
    return CaptionDataset(items, vocab, max_len, transform=inputs.train_transform if train else inputs.eval_transform,
                          train=train)


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_captions,
                      num_workers=num_workers, pin_memory=pin_memory)


def build_loaders(cfg, splits, vocab: Vocab, inputs: ImageInputs, device, num_processes: int = 1):
    """{split: dataset} and {split: DataLoader} of the recipe: train shuffled in --batch-size captions, the others
    in --eval-batch-size images; workers as loader_workers chooses, pinned memory on a GPU."""
    data = {s: make_dataset(items, vocab, cfg.max_len, inputs, train=s == "train") for s, items in splits.items()}
    workers = loader_workers(cfg.num_workers, device, inputs, num_processes)
    loaders = {s: make_loader(ds, cfg.batch_size if s == "train" else cfg.eval_batch_size, shuffle=s == "train",
                              num_workers=workers, pin_memory=torch.device(device).type == "cuda")
               for s, ds in data.items()}
    return data, loaders


MAX_AUTO_WORKERS = 4


def loader_workers(requested: int, device, inputs: "ImageInputs", num_processes: int = 1) -> int:
    """DataLoader workers: `requested` when >= 0; auto (-1): none for cached features (tensors already in memory)
    or on a CPU (workers would take cores from the model), else up to 4 per process to decode and transform images
    while the GPU trains."""
    if requested >= 0:
        return requested
    if inputs.features is not None or torch.device(device).type != "cuda":
        return 0
    return max(0, min(MAX_AUTO_WORKERS, usable_cores() // max(num_processes, 1) - 1))


# token-weighted: the eval loss is the mean over target tokens, not over batches
weighted_caption_loss = partial(caption_loss, return_weight=True)


def count_images(batch: dict) -> int:
    """Captioned images in a batch (throughput unit)."""
    return len(batch["image_id"])


# ------------------------------------------------------------------------------------------------------ outputs


def run_spec(cfg, knobs: dict) -> dict:
    """caption_model.json: what rebuilds the trained captioner and re-evaluates it as it was trained."""
    return {"arch": cfg.arch, "encoder": cfg.encoder, "pretrained": cfg.pretrained,
            "encoder_weights": cfg.encoder_weights, "finetune_blocks": cfg.finetune_blocks, "knobs": knobs,
            "max_len": cfg.max_len, "beam_size": cfg.beam_size, "data": cfg.data, "split": cfg.split,
            "seed": cfg.seed, "max_eval_images": cfg.max_eval_images, "cache_dir": cfg.cache_dir}


def write_outputs(run_dir: Path, tracker, cfg, model, test_loader, vocab: Vocab, data_config: dict, knobs: dict,
                  result, phases, *, test: dict, params: dict, report: DataReport, encoder, inputs: ImageInputs
                  ) -> dict:
    """Main process only: for a finished run the test captions scored (greedy + beam) into `test` (which holds the
    test loss), with their figures, and final/; then loss.png and summary.json."""
    title = f"{cfg.arch} on {cfg.data} ({cfg.encoder} encoder)"
    finished = result.stopped_reason is None
    if finished:
        scores, figures = evaluate_and_report(model, test_loader, vocab, cfg.max_len, cfg.beam_size, run_dir, title,
                                              data_config["input_size"])
        test.update(scores)
    phases.begin("save")
    if finished:
        tracker.log_images("test_figures", figures, step=result.steps)
        save_final(run_dir / "final", model, vocab, run_spec(cfg, knobs))
    return write_run_end(run_dir, tracker, result, phases, test, title, task="caption", method=None, arch=cfg.arch,
                         model=cfg.encoder, data=cfg.data, params=params, data_report=report.as_dict(),
                         encoder={"timm_name": encoder.name, "weights": encoder.weights_id,
                                  "image_inputs": inputs.cache_note})


def brief(test: dict) -> str:
    """The headline test scores in one line."""
    keys = ("bleu4", "cider", "beam_bleu4", "beam_cider")
    return ", ".join(f"{k} {test[k]:.4f}" for k in keys if isinstance(test.get(k), float)) or "not evaluated"
