"""Building the pieces of a captioning run from its settings, and saving/rebuilding a trained captioner.

train_caption.py and eval_caption.py both go through here, so a saved run is rebuilt exactly as it was trained:
`final/` holds the decoder weights, `vocab.json` and `caption_model.json` (arch, encoder, knobs, data and split).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch.utils.data import DataLoader

from hwtools.caption.data import (SPLIT_CHOICES, CaptionDataset, collate_captions, load_captions, make_splits,
                                  official_lists)
from hwtools.caption.encoders import build_encoder
from hwtools.caption.features import load_or_build_feature_cache
from hwtools.caption.models import ImageCaptioningModel, build_caption_model, caption_loss, encoder_output_for
from hwtools.caption.transforms import build_transforms
from hwtools.caption.vocab import VOCAB_FILE, Vocab
from hwtools.data_report import DataReport
from hwtools.errors import UserError

# Defaults that differ by architecture (a None field in the config takes the arch's value): the LSTMs use the
# heavy dropout of Show and Tell, the Transformer the usual 0.1. The rate is the same for all three: on the embedded
# set over 5 epochs the pre-norm Transformer reached BLEU-4 0.41 at 1e-3 against 0.35 at 3e-4 (it underfit).
ARCH_DEFAULTS = {
    "cnn-rnn": {"lr": 1e-3, "dropout": 0.5, "num_layers": 1},
    "attention": {"lr": 1e-3, "dropout": 0.5},  # one LSTM cell: no num_layers
    "transformer": {"lr": 1e-3, "dropout": 0.1, "num_layers": 2},
}
SPEC_FILE = "caption_model.json"
DECODER_FILE = "decoder.safetensors"
ENCODER_FILE = "encoder.safetensors"


def describe_arch_defaults() -> str:
    """The ARCH_DEFAULTS table as one line, for --help."""
    return "; ".join(f"{a}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for a, d in ARCH_DEFAULTS.items())


def check_arch(arch: str) -> None:
    if arch not in ARCH_DEFAULTS:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCH_DEFAULTS)}")


def check_split(split: str) -> None:
    if split not in SPLIT_CHOICES:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLIT_CHOICES)}")


def decoder_knobs(arch: str, cfg) -> dict:
    """Constructor keywords of the arch's decoder, taken from the config fields of the same meaning."""
    check_arch(arch)
    if arch == "cnn-rnn":
        return {"embed_dim": cfg.embed_dim, "hidden_dim": cfg.hidden_dim, "num_layers": cfg.num_layers,
                "dropout": cfg.dropout, "image_as_first_input": cfg.image_as_first_input}
    if arch == "attention":
        return {"embed_dim": cfg.embed_dim, "hidden_dim": cfg.hidden_dim, "attention_dim": cfg.attention_dim,
                "dropout": cfg.dropout, "alpha_c": cfg.alpha_c}
    return {"d_model": cfg.d_model, "nhead": cfg.heads, "num_layers": cfg.num_layers,
            "dim_feedforward": cfg.ff_dim, "dropout": cfg.dropout}


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
    # "upright": features of images read with their EXIF orientation applied (older caches did not)
    key = (encoder.name, encoder.weights_id, encoder.output, repr(eval_tf), "upright")
    feats = load_or_build_feature_cache(Path(cache_dir) / "caption-features", key, encoder, paths, eval_tf,
                                        batch_size, device=device, report=report, log=log)
    return ImageInputs(feats, None, eval_tf, "cached features")


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


MAX_AUTO_WORKERS = 4


def loader_workers(requested: int, device, inputs: "ImageInputs", num_processes: int = 1) -> int:
    """DataLoader workers: `requested` when >= 0; auto (-1): none for cached features (tensors already in memory)
    or on a CPU (workers would take cores from the model), else up to 4 per process to decode and transform images
    while the GPU trains."""
    if requested >= 0:
        return requested
    if inputs.features is not None or torch.device(device).type != "cuda":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, cores // max(num_processes, 1) - 1))


# token-weighted: the eval loss is the mean over target tokens, not over batches
weighted_caption_loss = partial(caption_loss, return_weight=True)


def count_images(batch: dict) -> int:
    """Captioned images in a batch (throughput unit)."""
    return len(batch["image_id"])


# -------------------------------------------------------------------------------------------- save / rebuild


def save_final(out_dir: Path, model: ImageCaptioningModel, vocab: Vocab, spec: dict) -> Path:
    """final/: decoder weights, the encoder's too when it was fine-tuned, vocab.json and caption_model.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()},
              str(out_dir / DECODER_FILE))
    if spec.get("finetune_blocks", 0) > 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()},
                  str(out_dir / ENCODER_FILE))
    vocab.save(out_dir / VOCAB_FILE)
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return out_dir


def load_final(final_dir: Path, log: Optional[Callable[[str], None]] = None):
    """Rebuild a saved captioner -> (ImageCaptioningModel in eval mode, vocab, spec, timm data config)."""
    from safetensors.torch import load_file

    final_dir = Path(final_dir)
    spec_path = final_dir / SPEC_FILE
    if not spec_path.is_file():
        raise UserError(f"{final_dir}: no {SPEC_FILE}; is this the final/ folder of a finished captioning run?")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        arch, knobs = spec["arch"], spec["knobs"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{spec_path}: not a caption model description ({e})") from None
    vocab = Vocab.load(final_dir / VOCAB_FILE)
    encoder, data_config = build_image_encoder(arch, spec["encoder"], spec.get("pretrained", False),
                                               spec.get("encoder_weights"), 0, log=log)
    if (final_dir / ENCODER_FILE).is_file():
        encoder.load_state_dict(load_file(str(final_dir / ENCODER_FILE)))
    decoder = build_caption_model(arch, len(vocab), encoder.out_dim, **knobs)
    decoder.load_state_dict(load_file(str(final_dir / DECODER_FILE)))
    model = ImageCaptioningModel(encoder, decoder).eval()
    return model, vocab, spec, data_config


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
