"""Captioning data: Flickr8k loaders (original, Kaggle, `datasets`), the splits (80/10/10 by image, or Flickr8k's
official lists), and the torch Dataset.

Every loader returns {image path: [raw captions]}. Captions whose image is missing or unreadable, and malformed
caption lines, are skipped and counted by reason in the DataReport; only a data set with no usable image is an error.
Text files may start with a UTF-8 byte-order mark and end lines with CRLF; images are read upright (EXIF orientation)
and as RGB whatever their mode (grayscale, CMYK), by the same code that checks them at load time.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Mapping

import torch
from PIL import Image, ImageOps

from hwtools.caption import synthetic
from hwtools.caption.vocab import Vocab, clean_caption
from hwtools.data_report import DataReport
from hwtools.config import EMBEDDED
from hwtools.errors import UserError
from hwtools.hub import looks_like_hub_id

logger = logging.getLogger(__name__)

# Where each layout keeps its files; several spellings occur in the copies people download.
ORIGINAL_TOKEN_FILES = ("Flickr8k_text/Flickr8k.token.txt", "Flickr8k.token.txt")
ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
KAGGLE_CAPTIONS = "captions.txt"
KAGGLE_IMAGE_DIRS = ("Images", "images")
DATASETS_MARKERS = ("dataset_dict.json", "state.json")
HUB_IMAGE_COLUMNS = ("image", "img", "image_path", "filepath", "file_name", "filename", "path")
HUB_CAPTION_COLUMNS = re.compile(r"^(captions?(_?\d+)?|text|sentences?|raw|description)$", re.IGNORECASE)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

MISSING = "image file missing"
UNREADABLE = "image unreadable"
MALFORMED = "malformed caption line"
EMPTY = "empty caption"

SPLITS = ("train", "validation", "test")
SPLIT_CHOICES = ("random", "official")
# Flickr8k's official split lists (6000 / 1000 / 1000 images), in Flickr8k_text.zip of the original archive
OFFICIAL_LISTS = {"train": "Flickr_8k.trainImages.txt", "validation": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}
OFFICIAL_LIST_DIRS = ("Flickr8k_text", ".")


# ------------------------------------------------------------------------------------------------------ loading


def load_captions(data: str, report: DataReport, cache_dir) -> dict[str, list[str]]:
    """{image path: raw captions} from `embedded`, a Flickr8k folder (original or Kaggle), or a hub id/datasets dir."""
    cache_dir = Path(cache_dir).expanduser()
    if data == EMBEDDED:
        folder = synthetic.ensure_embedded(cache_dir)
    else:
        folder = Path(data).expanduser()
    if not folder.exists():
        if looks_like_hub_id(data):
            items = _load_datasets(data, report, cache_dir)
            return _require_usable(items, data, report)
        raise UserError(f"{data}: no such folder (expected a Flickr8k folder, `embedded`, or a hub id)")
    if not folder.is_dir():
        raise UserError(f"{folder}: is a file; pass the folder that holds the captions file and the images")
    kind, captions_file, images_dir = detect_layout(folder)
    if kind == "original":
        items = _load_original(captions_file, images_dir, report)
    elif kind == "kaggle":
        items = _load_kaggle(captions_file, images_dir, report)
    else:
        items = _load_datasets(str(folder), report, cache_dir)
    return _require_usable(items, str(folder), report)


def detect_layout(folder: Path) -> tuple[str, Path | None, Path | None]:
    """('original'|'kaggle'|'datasets', captions file, images dir) from what the folder holds."""
    # Flickr8k_text.zip unpacked into the folder itself or into a subfolder of any name
    tokens = [folder / rel for rel in ORIGINAL_TOKEN_FILES] + sorted(folder.glob(f"*/{ORIGINAL_TOKEN_FILES[1]}"))
    for token_file in tokens:
        if token_file.is_file():
            return "original", token_file, _first_dir(folder, ORIGINAL_IMAGE_DIRS)
    if (folder / KAGGLE_CAPTIONS).is_file():
        return "kaggle", folder / KAGGLE_CAPTIONS, _first_dir(folder, KAGGLE_IMAGE_DIRS)
    if any((folder / m).is_file() for m in DATASETS_MARKERS):
        return "datasets", None, None
    raise UserError(
        f"{folder}: not a captioning data set: expected Flickr8k_text/Flickr8k.token.txt + Flicker8k_Dataset/ "
        f"(original), captions.txt + Images/ (Kaggle), or a `datasets` save_to_disk folder")


def _first_dir(folder: Path, names) -> Path:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    raise UserError(f"{folder}: captions found but no image folder (looked for {', '.join(names)})")


def _load_original(token_file: Path, images_dir: Path, report: DataReport) -> dict[str, list[str]]:
    """Lines `<image>.jpg#<k>\\t<caption>`; the `#<k>` index is optional."""
    checker = _ImageChecker(report)
    items: dict[str, list[str]] = {}
    with open(token_file, encoding="utf-8-sig", errors="replace") as f:  # -sig: a leading BOM is not a name
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            report.rows_read += 1
            where = f"{token_file}:{lineno}"
            name, tab, caption = line.partition("\t")
            image = name.strip().rsplit("#", 1)[0] if "#" in name else name.strip()
            if not tab or not image:
                report.skip(MALFORMED, where)
                continue
            _add(items, images_dir / image, caption, where, checker, report)
    return items


def _load_kaggle(captions_file: Path, images_dir: Path, report: DataReport) -> dict[str, list[str]]:
    """CSV `image,caption` (Kaggle's Flickr8k). Unquoted commas inside a last-column caption are kept as part of it.
    A file without the header line is read as `image,caption` data when its first field names an image file;
    anything else on line 1 is an error."""
    checker = _ImageChecker(report)
    items: dict[str, list[str]] = {}
    with open(captions_file, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f)
        image_col, caption_col, join_rest = 0, 1, True
        for row in reader:
            where = f"{captions_file}:{reader.line_num}"
            if reader.line_num == 1:
                header = [h.strip().lower() for h in row]
                if "image" in header and "caption" in header:
                    image_col, caption_col = header.index("image"), header.index("caption")
                    join_rest = caption_col == len(header) - 1
                    continue
                if not (row and row[0].strip().lower().endswith(IMAGE_SUFFIXES)):
                    raise UserError(f"{where}: expected the header `image,caption`, got {','.join(row)[:60]!r}")
                logger.warning("%s: no `image,caption` header; reading line 1 as data", where)
            if not any(field.strip() for field in row):
                continue
            report.rows_read += 1
            if len(row) <= max(image_col, caption_col) or not row[image_col].strip():
                report.skip(MALFORMED, where)
                continue
            caption = ",".join(row[caption_col:]) if join_rest else row[caption_col]
            _add(items, images_dir / row[image_col].strip(), caption, where, checker, report)
    return items


def _load_datasets(data: str, report: DataReport, cache_dir: Path) -> dict[str, list[str]]:
    """A `datasets` folder (save_to_disk) or hub id with an image column and one or more caption columns.

    All of its splits are merged (split_by_image makes the splits). Images without a file on disk are written once to
    `<cache_dir>/hub-images/`, named by content hash so the same image in several rows is one image.
    """
    import datasets

    local = Path(data).expanduser()
    try:
        ds = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(data)
    except Exception as e:  # offline, unknown id, gated: all end the same way for the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(
            f"cannot load data set {data!r} ({reason}); offline, run `datasets.load_dataset({data!r})"
            f".save_to_disk(DIR)` on a connected machine, copy DIR here and pass --data DIR") from None
    splits = ds if isinstance(ds, datasets.DatasetDict) else {"data": ds}
    out_dir = cache_dir / "hub-images" / re.sub(r"[^\w.-]+", "_", data.strip("/"))
    checker = _ImageChecker(report)
    items: dict[str, list[str]] = {}
    for split_name in sorted(splits):
        split = splits[split_name]
        image_col, caption_cols = _hub_columns(split, data)
        if isinstance(split.features[image_col], datasets.Image):
            split = split.cast_column(image_col, datasets.Image(decode=False))
        for idx, row in enumerate(split):
            where = f"{data}[{split_name}]:{idx}"
            captions = []
            for col in caption_cols:
                value = row[col]
                captions += value if isinstance(value, list) else [value]
            path = _hub_image_path(row[image_col], local if local.is_dir() else None, out_dir)
            for caption in captions:
                report.rows_read += 1
                if path is None:
                    report.skip(MISSING, where)
                    continue
                _add(items, path, caption if isinstance(caption, str) else "", where, checker, report)
    return items


def _hub_columns(split, data: str) -> tuple[str, list[str]]:
    import datasets

    names = list(split.features)
    images = [n for n in names if isinstance(split.features[n], datasets.Image)]
    images += [n for n in names if n.lower() in HUB_IMAGE_COLUMNS and n not in images]
    captions = [n for n in names if HUB_CAPTION_COLUMNS.match(n)]
    if not images or not captions:
        raise UserError(f"{data}: need an image column and caption column(s), found columns {names}")
    return images[0], captions


def _hub_image_path(value, base: Path | None, out_dir: Path) -> Path | None:
    """A file path for a `datasets` image value ({'bytes', 'path'} or a path string), writing bytes when needed."""
    if isinstance(value, str):
        value = {"bytes": None, "path": value}
    if not isinstance(value, dict):
        return None
    raw_path = value.get("path")
    if raw_path:
        p = Path(raw_path)
        if not p.is_absolute() and base is not None:
            p = base / p
        if p.is_file() and not value.get("bytes"):
            return p
    data = value.get("bytes")
    if not data:
        return None
    suffix = Path(raw_path).suffix.lower() if raw_path and Path(raw_path).suffix else ".jpg"
    target = out_dir / f"{hashlib.sha1(data).hexdigest()[:20]}{suffix}"
    if not target.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target


class _ImageChecker:
    """Checks each image once (missing / unreadable), however many captions point at it."""

    def __init__(self, report: DataReport):
        self.report = report
        self.verdicts: dict[Path, str | None] = {}

    def problem(self, path: Path) -> str | None:
        if path not in self.verdicts:
            self.verdicts[path] = image_problem(path)
        return self.verdicts[path]


def open_rgb(path, draft: bool = False) -> Image.Image:
    """The image as RGB, upright (EXIF orientation applied), whatever its mode (L, CMYK, P, RGBA).
    draft: JPEGs decode at 1/8 scale (cheap; still reads every byte, so a truncated file fails)."""
    with Image.open(path) as im:
        if draft and im.format == "JPEG":
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
        return ImageOps.exif_transpose(im).convert("RGB")


def image_problem(path: Path) -> str | None:
    """None if the image reads as training will read it (open_rgb), else the skip reason."""
    if not Path(path).is_file():
        return MISSING
    try:
        open_rgb(path, draft=True)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # truncated, empty, not an image
        return UNREADABLE
    return None


def _add(items, image: Path, caption: str, where: str, checker: _ImageChecker, report: DataReport) -> None:
    caption = caption.strip()
    if not clean_caption(caption):  # "123 !!!" would train as "<start> <end>": nothing but stopping
        report.skip(EMPTY, where)
        return
    problem = checker.problem(image)
    if problem:
        report.skip(problem, where)
        return
    items.setdefault(str(image), []).append(caption)
    report.rows_used += 1


def _require_usable(items: dict, source: str, report: DataReport) -> dict[str, list[str]]:
    if not items:
        why = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped_by_reason.items())) or "no caption lines"
        raise UserError(f"{source}: no usable image with a caption ({report.rows_read} caption(s) read; {why})")
    return items  # the recipe warns once per skip reason, after the encoder's own skips are counted too


# ------------------------------------------------------------------------------------------------------- split


def split_by_image(items: dict, fracs=(0.8, 0.1, 0.1), seed: int = 42) -> dict[str, dict]:
    """train/validation/test by image (all captions of an image in one split), shuffled with a fixed seed."""
    if len(fracs) != 3 or min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, got {tuple(fracs)}")
    images = sorted(items)  # sorted first: the split must not depend on the order a loader read files in
    random.Random(seed).shuffle(images)
    n = len(images)
    n_val, n_test = round(n * fracs[1]), round(n * fracs[2])
    # Small sets: a split asked for gets at least one image while train keeps one.
    n_val = max(n_val, 1) if fracs[1] > 0 and n >= 3 else n_val
    n_test = max(n_test, 1) if fracs[2] > 0 and n >= 3 else n_test
    n_train = n - n_val - n_test
    cuts = {"train": images[:n_train], "validation": images[n_train:n_train + n_val],
            "test": images[n_train + n_val:]}
    return {name: {img: items[img] for img in imgs} for name, imgs in cuts.items()}


def data_folder(data: str, cache_dir) -> Path | None:
    """The local folder behind `data` (the embedded set's generated folder), or None for a hub id."""
    if data == EMBEDDED:
        return synthetic.ensure_embedded(Path(cache_dir).expanduser())
    folder = Path(data).expanduser()
    return folder if folder.is_dir() else None


def official_lists(data: str, cache_dir) -> dict[str, Path]:
    """Paths of Flickr8k's train/dev/test image lists beside the data; one-line UserError when they are absent."""
    folder = data_folder(data, cache_dir)
    places = [] if folder is None else [folder / sub for sub in OFFICIAL_LIST_DIRS] + [
        p.parent for p in sorted(folder.glob(f"*/{OFFICIAL_LISTS['train']}"))]
    for place in places:
        found = {split: place / name for split, name in OFFICIAL_LISTS.items()}
        if all(p.is_file() for p in found.values()):
            return found
    raise UserError(
        f"--split official: no {', '.join(OFFICIAL_LISTS.values())} in {folder or data} or a folder in it "
        f"(they come in the original Flickr8k_text.zip, not in the Kaggle copy); copy them there or use --split random")


def read_image_list(path: Path) -> list[str]:
    """Image names of an official split list, one a line (BOM and CRLF tolerated)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def split_official(items: dict, lists: Mapping[str, Path]) -> dict[str, dict]:
    """train/validation/test from the official lists (matched by file name); images in no list are left out,
    listed images that were skipped as missing or unreadable are simply absent."""
    by_name = {Path(p).name: p for p in items}
    out, owner = {}, {}
    for split in SPLITS:
        out[split] = {}
        for name in read_image_list(lists[split]):
            if name in owner and owner[name] != split:
                raise UserError(f"{lists[split]}: {name} is also in the {owner[name]} list; the splits must not share "
                                f"images")
            owner[name] = split
            if name in by_name:
                out[split][by_name[name]] = items[by_name[name]]
    return out


def make_splits(items: dict, split: str, data: str, cache_dir, seed: int = 42) -> dict[str, dict]:
    """`random`: split_by_image 80/10/10 with seed; `official`: the Flickr8k lists beside `data`."""
    if split == "random":
        return split_by_image(items, seed=seed)
    if split == "official":
        return split_official(items, official_lists(data, cache_dir))
    raise UserError(f"--split {split}: choose one of {', '.join(SPLIT_CHOICES)}")


# ----------------------------------------------------------------------------------------------------- dataset


class CaptionDataset(torch.utils.data.Dataset):
    """Training mode: one item per (image, caption). Eval mode: one item per image with every reference.

    Items: `image` (transformed tensor) or `features` (from the given lookup), `caption_ids` (LongTensor max_len),
    `caption_mask` (BoolTensor, True on real tokens), `image_id` (path); eval items add `references` (cleaned
    strings) and encode their first caption as `caption_ids`, so an eval loss can still be computed.
    """

    def __init__(self, items: Mapping[str, list[str]], vocab: Vocab, max_len: int, transform=None,
                 train: bool = True, features: Mapping[str, torch.Tensor] | None = None):
        if transform is None and features is None:
            raise ValueError("CaptionDataset needs an image transform or a feature lookup")
        self.vocab, self.max_len, self.transform, self.train, self.features = vocab, max_len, transform, train, features
        if train:
            self.samples = [(img, [cap]) for img, caps in items.items() for cap in caps]
        else:
            self.samples = [(img, list(caps)) for img, caps in items.items() if caps]
        # Encoding is cheap but repeated every epoch; do it once.
        self.encoded = [vocab.encode(caps[0], max_len) for _, caps in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image_id, captions = self.samples[i]
        ids, mask = self.encoded[i]
        item = {"image_id": image_id, "caption_ids": torch.tensor(ids, dtype=torch.long),
                "caption_mask": torch.tensor(mask, dtype=torch.bool)}
        if self.features is not None:
            if image_id not in self.features:
                raise UserError(f"{image_id}: not in the feature cache; rebuild the cache for this data set")
            item["features"] = torch.as_tensor(self.features[image_id])
        else:
            item["image"] = self.transform(open_rgb(image_id))
        if not self.train:
            item["references"] = [" ".join(clean_caption(c)) for c in captions]
        return item


def collate_captions(batch: list[dict]) -> dict:
    """Stack tensor fields into batch tensors; keep other fields (ids, references) as lists."""
    return {key: torch.stack([b[key] for b in batch]) if isinstance(batch[0][key], torch.Tensor)
            else [b[key] for b in batch] for key in batch[0]}
