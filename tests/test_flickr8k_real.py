"""Flickr8k as people download it: the Kaggle copy (`Images/` + `captions.txt`, some captions quoted) and the original
archives (`Flicker8k_Dataset/` + `Flickr8k_text/` with the token file and the official split lists), with what real
files hold: a UTF-8 byte-order mark, CRLF line ends, grayscale / CMYK / progressive / EXIF-rotated JPEGs, a truncated
JPEG, a zero-byte file and a caption line naming a file that is not there. Everything is built here with PIL."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hwtools.caption import data as cdata
from hwtools.caption.features import encode_images
from hwtools.data_report import DataReport
from hwtools.errors import UserError
from tests.test_bad_input import assert_user_error, recipe, run_recipe
from tests.tiny_models import one_torch_thread  # noqa: F401

BOM, CRLF = "\ufeff", "\r\n"
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "cyan", "magenta", "brown", "pink"]
SIZE = (64, 48)
CAPTIONS = ["A {c} square on a gray background .", "a {c} box , seen from above .", "The {c} block is small .",
            "Some {c} thing , and a gray frame , again .", "{c} square"]


def _save(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _two_halves(mode="RGB", left="red", right="blue", size=SIZE) -> Image.Image:
    img = Image.new("RGB", size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img.convert(mode)


def rotated_jpeg() -> bytes:
    """Stored landscape, red left / blue right, with EXIF orientation 6: shown upright it is portrait, red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_two_halves(), exif=exif.tobytes())


def special_images() -> dict[str, bytes]:
    """The readable JPEG kinds real collections hold besides plain RGB baseline."""
    return {"3000_gray.jpg": _save(_two_halves("L")),
            "3001_cmyk.jpg": _save(Image.new("CMYK", SIZE, (0, 255, 255, 0))),  # red, in CMYK ink
            "3002_progressive.jpg": _save(_two_halves(), progressive=True),
            "3003_rotated.jpg": rotated_jpeg()}


BAD_IMAGES = {"4000_truncated.jpg": lambda: _save(_two_halves())[:700], "4001_empty.jpg": lambda: b""}
MISSING_NAME = "2258277193_586949ec62.jpg.1"  # the real token file names this; the image folder lacks it


def write_images(folder: Path) -> list[str]:
    """12 plain images, the 4 special ones, the 2 unreadable ones; returns the readable names."""
    folder.mkdir(parents=True)
    names = []
    for i, colour in enumerate(COLOURS):
        name = f"{1000 + i}_{colour}.jpg"
        (folder / name).write_bytes(_save(Image.new("RGB", SIZE, colour)))
        names.append(name)
    for name, blob in special_images().items():
        (folder / name).write_bytes(blob)
        names.append(name)
    for name, make in BAD_IMAGES.items():
        (folder / name).write_bytes(make())
    return names


def _caption_pairs(readable: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for name in readable + list(BAD_IMAGES) + [MISSING_NAME]:
        colour = name.split("_")[1].split(".")[0]
        pairs += [(name, c.format(c=colour)) for c in CAPTIONS]
    return pairs


# official lists: the readable images split 8 / 3 / 4, one readable image in no list, the bad ones listed in train
def official_lists(readable: list[str]) -> dict[str, list[str]]:
    return {"train": readable[:8] + list(BAD_IMAGES), "validation": readable[8:11], "test": readable[11:15]}


def make_original(root: Path, with_lists: bool = True) -> dict:
    """The two original archives unpacked: Flicker8k_Dataset/ and Flickr8k_text/ (token file with BOM + CRLF)."""
    readable = write_images(root / "Flicker8k_Dataset")
    text = root / "Flickr8k_text"
    text.mkdir()
    lines = [f"{name}#{k % 5}\t{caption}" for k, (name, caption) in enumerate(_caption_pairs(readable))]
    (text / "Flickr8k.token.txt").write_bytes((BOM + CRLF.join(lines) + CRLF).encode("utf-8"))
    (text / "readme.txt").write_text("Flickr8k text files\n")
    if with_lists:
        for split, names in official_lists(readable).items():
            (text / cdata.OFFICIAL_LISTS[split]).write_bytes((BOM + CRLF.join(names) + CRLF).encode("utf-8"))
    return {"readable": readable, "lines": len(lines)}


def make_kaggle(root: Path) -> dict:
    """Kaggle's copy: Images/ + captions.txt (header image,caption; captions with commas quoted as csv writes them,
    one with an embedded quote; BOM + CRLF)."""
    readable = write_images(root / "Images")
    rows = ["image,caption"]
    for name, caption in _caption_pairs(readable):
        if "," in caption and "again" in caption:
            caption = '"' + caption.replace("again", 'said ""again""') + '"'
        elif "," in caption:
            caption = f'"{caption}"'
        rows.append(f"{name},{caption}")
    rows.append(f"{readable[0]},a red square , unquoted , with commas .")  # a hand-edited line: kept whole
    (root / "captions.txt").write_bytes((BOM + CRLF.join(rows) + CRLF).encode("utf-8"))
    return {"readable": readable, "lines": len(rows) - 1}


EXPECTED_SKIPS = {cdata.MISSING: 5, cdata.UNREADABLE: 10}  # 5 captions each for the 2 bad and the 1 missing image


# -------------------------------------------------------------------------------------------------------- images
def test_every_jpeg_kind_reads_as_upright_rgb(tmp_path):
    for name, blob in special_images().items():
        (tmp_path / name).write_bytes(blob)
        assert cdata.image_problem(tmp_path / name) is None, name
    gray = cdata.open_rgb(tmp_path / "3000_gray.jpg")
    assert gray.mode == "RGB" and gray.size == SIZE
    r, g, b = gray.getpixel((5, 5))
    assert abs(r - g) <= 2 and abs(g - b) <= 2 and r > 50  # grey red: three equal channels
    cmyk = cdata.open_rgb(tmp_path / "3001_cmyk.jpg")
    r, g, b = cmyk.getpixel((10, 10))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    prog = cdata.open_rgb(tmp_path / "3002_progressive.jpg")
    assert prog.getpixel((5, 20))[0] > 200 and prog.getpixel((60, 20))[2] > 200
    up = cdata.open_rgb(tmp_path / "3003_rotated.jpg")
    assert up.size == (SIZE[1], SIZE[0])  # portrait once upright
    assert up.getpixel((24, 5))[0] > 200 and up.getpixel((24, 58))[2] > 200  # red top, blue bottom
    # the same image through the draft (1/8-scale) check comes out upright too
    small = cdata.open_rgb(tmp_path / "3003_rotated.jpg", draft=True)
    assert small.height > small.width


def test_truncated_empty_and_missing_images_are_found(tmp_path):
    for name, make in BAD_IMAGES.items():
        (tmp_path / name).write_bytes(make())
        assert cdata.image_problem(tmp_path / name) == cdata.UNREADABLE, name
    assert cdata.image_problem(tmp_path / MISSING_NAME) == cdata.MISSING


# ------------------------------------------------------------------------------------------------------- layouts
def test_original_archives_with_bom_and_crlf(tmp_path):
    built = make_original(tmp_path / "flickr8k")
    report = DataReport()
    items = cdata.load_captions(str(tmp_path / "flickr8k"), report, tmp_path / "cache")
    assert report.as_dict() == {"rows_read": built["lines"], "rows_used": len(built["readable"]) * 5,
                                "rows_skipped": 15, "skipped_by_reason": EXPECTED_SKIPS}
    assert sorted(Path(p).name for p in items) == sorted(built["readable"])
    first = items[str(tmp_path / "flickr8k" / "Flicker8k_Dataset" / "1000_red.jpg")]
    assert first == [c.format(c="red") for c in CAPTIONS]  # the first line (after the BOM) is kept, no \r anywhere
    assert not any("\r" in c or "\ufeff" in c for caps in items.values() for c in caps)


def test_kaggle_copy_with_quoted_commas_bom_and_crlf(tmp_path):
    built = make_kaggle(tmp_path / "kaggle")
    report = DataReport()
    items = cdata.load_captions(str(tmp_path / "kaggle"), report, tmp_path / "cache")
    assert report.as_dict() == {"rows_read": built["lines"], "rows_used": len(built["readable"]) * 5 + 1,
                                "rows_skipped": 15, "skipped_by_reason": EXPECTED_SKIPS}
    red = items[str(tmp_path / "kaggle" / "Images" / "1000_red.jpg")]
    assert red == [c.format(c="red") for c in CAPTIONS[:3]] + [
        'Some red thing , and a gray frame , said "again" .', "red square", "a red square , unquoted , with commas ."]


# -------------------------------------------------------------------------------------------------------- splits
def test_official_split_follows_the_lists_and_random_stays_80_10_10(tmp_path):
    built = make_original(tmp_path / "flickr8k")
    items = cdata.load_captions(str(tmp_path / "flickr8k"), DataReport(), tmp_path / "cache")
    splits = cdata.make_splits(items, "official", str(tmp_path / "flickr8k"), tmp_path / "cache")
    lists = official_lists(built["readable"])
    for split in cdata.SPLITS:  # listed but unreadable images are absent; each split exactly its readable images
        assert sorted(Path(p).name for p in splits[split]) == sorted(n for n in lists[split] if n not in BAD_IMAGES)
    assert built["readable"][15] not in {Path(p).name for s in splits.values() for p in s}  # in no list: left out
    rand = cdata.make_splits(items, "random", str(tmp_path / "flickr8k"), tmp_path / "cache", seed=42)
    assert {k: len(v) for k, v in rand.items()} == {"train": 12, "validation": 2, "test": 2}  # 16 images, by image
    assert rand == cdata.split_by_image(items, seed=42)


def test_official_split_without_lists_is_one_line(tmp_path):
    make_kaggle(tmp_path / "kaggle")
    with pytest.raises(UserError) as e:
        cdata.official_lists(str(tmp_path / "kaggle"), tmp_path / "cache")
    assert "\n" not in str(e.value) and "Flickr_8k.testImages.txt" in str(e.value) and "--split random" in str(e.value)
    # the lists copied beside the Kaggle captions.txt count too
    for split, name in cdata.OFFICIAL_LISTS.items():
        (tmp_path / "kaggle" / name).write_text("1000_red.jpg\n" if split == "train" else "1001_blue.jpg\n"
                                                if split == "test" else "1002_green.jpg\n")
    assert set(cdata.official_lists(str(tmp_path / "kaggle"), tmp_path / "cache")) == set(cdata.SPLITS)


# ------------------------------------------------------------------------------------- reading during training
def test_dataloader_workers_and_feature_encoding_never_meet_a_bad_image(tmp_path):
    """Bad images are found when the data loads, so a DataLoader worker reading images live never meets one, and
    encoding for the feature cache counts instead of crashing when handed one."""
    from hwtools.caption.transforms import build_transforms
    from hwtools.caption.vocab import Vocab

    make_original(tmp_path / "flickr8k")
    items = cdata.load_captions(str(tmp_path / "flickr8k"), DataReport(), tmp_path / "cache")
    vocab = Vocab.build([c for caps in items.values() for c in caps])
    tf = build_transforms({"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3,
                           "std": (0.5,) * 3}, train=True)
    ds = cdata.CaptionDataset(items, vocab, 12, transform=tf, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2, collate_fn=cdata.collate_captions)
    seen = sum(len(b["image_id"]) for b in loader)
    assert seen == len(ds) == 16 * 5

    class RedTopMinusBottom(torch.nn.Module):  # a stand-in encoder: which images get read, and which way up
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            half = x.shape[2] // 2
            return (x[:, 0, :half].mean(dim=(1, 2)) - x[:, 0, half:].mean(dim=(1, 2)))[:, None] * self.w

    folder = tmp_path / "flickr8k" / "Flicker8k_Dataset"
    report = DataReport()
    feats = encode_images(RedTopMinusBottom(), [str(p) for p in sorted(folder.iterdir())], build_transforms(
        {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}, train=False), batch_size=4,
        report=report)
    assert len(feats) == 16 and report.rows_skipped == 2
    # stored red-left / blue-right; upright it is red on top (normalised red +1 vs -1: difference about 2)
    assert feats[str(folder / "3003_rotated.jpg")].item() > 1.5
    assert abs(feats[str(folder / "3002_progressive.jpg")].item()) < 0.1  # not rotated: top and bottom alike


# ------------------------------------------------------------------------------------------------ through CLIs
def _caption_argv(data, out, cache, *extra) -> list:
    return ["--arch", "attention", "--data", data, "--cache-dir", cache, "--output-dir", out, "--epochs", 1,
            "--batch-size", 8, "--eval-batch-size", 4, "--max-len", 12, "--min-freq", 1, "--embed-dim", 16,
            "--hidden-dim", 32, "--attention-dim", 16, "--beam-size", 1, "--log-every", 1, "--report-to", "none",
            *extra]


def test_official_split_through_train_eval_and_explore(tmp_path, capfd):
    built = make_original(tmp_path / "flickr8k")
    data, cache, out = tmp_path / "flickr8k", tmp_path / "cache", tmp_path / "run"
    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        code = run_recipe("train_caption", _caption_argv(data, out, cache, "--split", "official"))
    finally:
        sys.stderr = stderr
    assert code == 0, err.getvalue()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_report"] == {"rows_read": built["lines"], "rows_used": 16 * 5, "rows_skipped": 15,
                                      "skipped_by_reason": EXPECTED_SKIPS}
    assert summary["train"]["steps"] == 5  # 8 official train images x 5 captions / batch 8
    assert json.loads((out / "final" / "caption_model.json").read_text())["split"] == "official"
    capfd.readouterr()

    code = run_recipe("eval_caption", ["--run", out, "--batch-size", 2])
    assert code == 0
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluated["split"] == "official" and evaluated["test_images"] == 4
    capfd.readouterr()
    code = run_recipe("eval_caption", ["--run", out, "--split", "offical", "--output-dir", tmp_path / "ev2"])
    assert_user_error(code, capfd.readouterr().err, "--split offical: choose one of random, official")
    assert not (tmp_path / "ev2" / "eval.json").exists()

    capfd.readouterr()
    recipe("explore_caption_data").main(["--data", str(data), "--cache-dir", str(cache), "--split", "official",
                                         "--output-dir", str(tmp_path / "explore")])
    printed = capfd.readouterr().out
    assert "images 16, captions 80 (95 caption lines read, 15 skipped: image file missing 5, image unreadable 10)" \
        in printed
    assert "split (official) {'train': 8, 'validation': 3, 'test': 4}; 1 image(s) in no list" in printed
    stats = json.loads((tmp_path / "explore" / "stats.json").read_text())
    assert stats["split_images"] == {"train": 8, "validation": 3, "test": 4} and stats["images_in_no_split"] == 1


def test_official_split_without_lists_stops_every_recipe_with_one_line(tmp_path, capfd):
    make_original(tmp_path / "flickr8k", with_lists=False)
    data, cache = tmp_path / "flickr8k", tmp_path / "cache"
    code = run_recipe("train_caption", _caption_argv(data, tmp_path / "run", cache, "--split", "official"))
    assert_user_error(code, capfd.readouterr().err, "--split official: no Flickr_8k.trainImages.txt")
    assert not (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(SystemExit) as e:
        recipe("explore_caption_data").main(["--data", str(data), "--cache-dir", str(cache), "--split", "official",
                                             "--output-dir", str(tmp_path / "explore")])
    assert e.value.code == 2
    assert_user_error(2, capfd.readouterr().err, "--split official: no Flickr_8k.trainImages.txt")
    code = run_recipe("train_caption", _caption_argv(data, tmp_path / "run", cache, "--split", "offical"))
    assert_user_error(code, capfd.readouterr().err, "--split offical: choose one of random, official", True)


@pytest.mark.parametrize("where", [".", "Flickr8k_text_unpacked"])
def test_text_archive_unpacked_at_the_root_or_in_any_subfolder(tmp_path, where):
    built = make_original(tmp_path / "flickr8k")
    text = tmp_path / "flickr8k" / "Flickr8k_text"
    target = tmp_path / "flickr8k" / where
    target.mkdir(exist_ok=True)
    for f in list(text.iterdir()):
        f.rename(target / f.name)
    text.rmdir()
    items = cdata.load_captions(str(tmp_path / "flickr8k"), DataReport(), tmp_path / "cache")
    assert len(items) == len(built["readable"])
    splits = cdata.make_splits(items, "official", str(tmp_path / "flickr8k"), tmp_path / "cache")
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "validation": 3, "test": 4}
