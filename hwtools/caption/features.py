"""Feature cache: a frozen encoder without augmentation gives the same features every epoch, so encode each image
once and keep the result on disk, keyed by everything that changes the features (encoder, weights, output kind,
transform)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from hwtools.caption.data import open_rgb
from hwtools.data_report import DataReport


def feature_cache_key(*key_parts) -> str:
    """Short hash of what determines the features (e.g. encoder name, weights id, output kind, repr(transform))."""
    text = json.dumps([str(p) for p in key_parts])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _load_image(path: str, report: Optional[DataReport]):
    try:
        return open_rgb(path)
    except (OSError, ValueError, SyntaxError) as e:  # missing, truncated or not an image
        if report is None:
            raise
        report.skip(f"unreadable image ({type(e).__name__})", str(path))
        return None


@torch.no_grad()
def encode_images(encoder: torch.nn.Module, image_paths: Iterable[str], transform: Callable, batch_size: int = 32,
                  device: Optional[torch.device] = None, report: Optional[DataReport] = None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Encode each image once in eval mode; {path: features on CPU}. Unreadable images are skipped into `report`
    when one is given (otherwise they raise)."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out: dict[str, torch.Tensor] = {}
    paths, images = [], []

    def flush():
        feats = encoder(torch.stack(images).to(device)).to("cpu", dtype)
        out.update(zip(paths, feats.unbind(0)))
        paths.clear()
        images.clear()

    for path in dict.fromkeys(str(p) for p in image_paths):
        img = _load_image(path, report)
        if img is None:
            continue
        paths.append(path)
        images.append(transform(img))
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    encoder.train(was_training)
    return out


def _save_atomic(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_build_feature_cache(cache_dir: str | os.PathLike, key_parts: Iterable, encoder: torch.nn.Module,
                                image_paths: Iterable[str], transform: Callable, batch_size: int = 32,
                                storage_dtype: torch.dtype = torch.float16, device: Optional[torch.device] = None,
                                report: Optional[DataReport] = None,
                                log: Optional[Callable[[str], None]] = print) -> dict[str, torch.Tensor]:
    """{path: features} for `image_paths`, read from `cache_dir/features-<hash of key_parts>.pt` and topped up with
    any images it lacks (then rewritten atomically). fp16 storage halves the disk and RAM; features come back in
    `storage_dtype` (the models cast them to their own dtype)."""
    key_parts = list(key_parts)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"features-{feature_cache_key(*key_parts)}.pt"
    wanted = list(dict.fromkeys(str(p) for p in image_paths))
    cached: dict[str, torch.Tensor] = {}
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cached = dict(zip(blob["paths"], blob["features"].unbind(0)))
    missing = [p for p in wanted if p not in cached]
    if missing:
        if log is not None:
            log(f"feature cache {path}: encoding {len(missing)} image(s) ({len(cached)} cached)")
        fresh = encode_images(encoder, missing, transform, batch_size, device=device, report=report)
        cached.update({p: f.to(storage_dtype) for p, f in fresh.items()})
        if fresh:
            names = list(cached)
            _save_atomic({"key_parts": [str(p) for p in key_parts], "paths": names,
                          "features": torch.stack([cached[n] for n in names])}, path)
    elif log is not None:
        log(f"feature cache {path}: {len(wanted)} image(s) read from disk")
    return {p: cached[p] for p in wanted if p in cached}
