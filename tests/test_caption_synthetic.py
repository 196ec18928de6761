import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from hwtools.caption import synthetic
from hwtools.caption.synthetic import COLOURS, PLURAL, ensure_embedded, generate, load_scene_facts
from hwtools.caption.vocab import clean_caption


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "set"
    facts = generate(root, n_images=150, seed=11)
    return root, facts


def test_generator_is_deterministic(tmp_path):
    generate(tmp_path / "a", n_images=12, seed=5)
    generate(tmp_path / "b", n_images=12, seed=5)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha == hb and len(ha) == 12 + 3  # images, token file, scenes.json, marker
    # Each image has its own seed: a shorter set is a prefix of a longer one; another seed gives other images.
    generate(tmp_path / "c", n_images=5, seed=5)
    hc = {k: v for k, v in _hashes(tmp_path / "c").items() if k.startswith("Flicker8k_Dataset/")}
    assert hc.items() <= ha.items() and len(hc) == 5
    generate(tmp_path / "d", n_images=5, seed=6)
    hd = {v for k, v in _hashes(tmp_path / "d").items() if k.startswith("Flicker8k_Dataset/")}
    assert not hd & set(ha.values())


def test_original_flickr8k_layout_and_caption_format(small_set):
    root, facts = small_set
    lines = (root / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines()
    assert len(lines) == 5 * 150
    pattern = re.compile(r"^\d{10}_[0-9a-f]{10}\.jpg#[0-4]\t.+ [.!]$")
    assert all(pattern.match(line) for line in lines), [x for x in lines if not pattern.match(x)][:3]
    names = sorted(facts)
    assert sorted(p.name for p in (root / "Flicker8k_Dataset").iterdir()) == names
    for name in names:
        caps = facts[name]["captions"]
        assert len(set(caps)) == 5, caps  # differently worded
        assert [line.split("\t")[1] for line in lines if line.startswith(name)] == caps
    all_text = " ".join(line.split("\t")[1] for line in lines)
    assert re.search(r"[A-Z]", all_text) and "," in all_text  # mixed case and punctuation for cleaning to handle
    assert load_scene_facts(root) == json.loads(json.dumps(facts))
    sizes = set()
    for name in names[:40]:
        with Image.open(root / "Flicker8k_Dataset" / name) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert 160 <= im.width <= 400 and 160 <= im.height <= 400
            assert im.size == (facts[name]["width"], facts[name]["height"])
            sizes.add(im.size)
    assert len(sizes) > 30
    layouts = {f["layout"] for f in facts.values()}
    assert layouts == {"single", "group", "pair-horizontal", "pair-vertical"}
    assert {f["count"] for f in facts.values()} == {1, 2, 3}
    assert any(f["twigs"] for f in facts.values()) and any(f["noise_std"] > 0 for f in facts.values())


def _expected_cell(label):
    col = "left" if "left" in label else "right" if "right" in label else "centre"
    row = "top" if "top" in label else "bottom" if "bottom" in label else "middle"
    return col, row


def test_positions_are_true_in_the_boxes_and_captions(small_set):
    _check_positions(small_set[1])


def _check_positions(facts):
    for name, f in facts.items():
        objs = f["objects"]
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert -1 <= x0 and x1 <= f["width"] + 1 and -1 <= y0 and y1 <= f["height"] + 1, name
            col, row = _expected_cell(o["position"])
            if f["layout"] == "group" and o["position"] in ("left", "right"):
                row = o["row"]  # a left/right group stands in a column across rows
            if f["layout"] == "group" and o["position"] in ("top", "bottom"):
                col = o["column"]
            if f["layout"].startswith("pair"):  # pairs only promise the relation's axis
                col = o["column"] if f["layout"] == "pair-vertical" else col
                row = o["row"] if f["layout"] == "pair-horizontal" else row
            assert (o["column"], o["row"]) == (col, row), (name, o)
        for cap in f["captions"]:
            words = set(clean_caption(cap))
            if f["layout"] in ("single", "group"):
                o = objs[0]
                if words & {"left"}:
                    assert all(p["column"] == "left" for p in objs), (name, cap)
                if words & {"right"}:
                    assert all(p["column"] == "right" for p in objs), (name, cap)
                if words & {"top", "upper"}:
                    assert all(p["row"] == "top" for p in objs), (name, cap)
                if words & {"bottom", "lower"}:
                    assert all(p["row"] == "bottom" for p in objs), (name, cap)
                if words & {"centre", "center", "middle"}:
                    assert (o["column"], o["row"]) == ("centre", "middle"), (name, cap)
                plural = f["count"] > 1
                assert (PLURAL[o["kind"]] if plural else o["kind"]) in words, (name, cap)
                assert o["colour"] in words, (name, cap)
            elif f["layout"] == "pair-horizontal":
                a, b = objs
                assert (a["column"], b["column"]) == ("left", "right"), name
                assert not words & {"top", "bottom", "above", "below", "upper", "lower"}, (name, cap)
                assert {a["colour"], b["colour"]} <= words and {a["kind"], b["kind"]} <= words, (name, cap)
            else:
                a, b = objs
                assert (a["row"], b["row"]) == ("top", "bottom"), name
                assert not words & {"left", "right"}, (name, cap)
                assert {a["colour"], b["colour"]} <= words and {a["kind"], b["kind"]} <= words, (name, cap)


def test_colours_are_true_in_the_pixels(small_set):
    root, facts = small_set
    checked = 0
    for name, f in facts.items():
        if f["layout"] != "single" or f["twigs"]:
            continue
        o = f["objects"][0]
        with Image.open(root / "Flicker8k_Dataset" / name) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        cx, cy = (int(round(v)) for v in o["center"])
        patch = arr[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
        target = np.array(COLOURS[o["colour"]], np.float32)
        # nearest named colour at the object's centre is the caption's colour
        nearest = min(COLOURS, key=lambda c: np.abs(patch - np.array(COLOURS[c])).sum())
        assert nearest == o["colour"] and np.abs(patch - target).max() < 60, (name, patch, o["colour"])
        # and the background is elsewhere: the corner farthest from the object is not the object's colour
        corner = arr[2 if cy > f["height"] / 2 else -3, 2 if cx > f["width"] / 2 else -3]
        assert np.abs(corner - target).max() > 40, (name, corner, o["colour"])
        checked += 1
    assert checked > 20


def test_full_default_set_is_large_with_small_vocabulary(tmp_path):
    assert synthetic.DEFAULT_N_IMAGES >= 2000
    root = ensure_embedded(tmp_path)  # the real default: also checks generation speed stays modest
    facts = load_scene_facts(root)
    assert len(facts) == synthetic.DEFAULT_N_IMAGES
    assert len(list((root / "Flicker8k_Dataset").glob("*.jpg"))) == len(facts)
    vocab = {w for f in facts.values() for c in f["captions"] for w in clean_caption(c)}
    assert 40 < len(vocab) < 150, len(vocab)
    _check_positions(facts)


def test_ensure_embedded_reuses_regenerates_and_leaves_no_temp(tmp_path, monkeypatch):
    root = ensure_embedded(tmp_path, n_images=4, seed=1)
    assert root.is_dir() and json.loads((root / synthetic.MARKER).read_text())["n_images"] == 4
    first = _hashes(root)
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    mtime = token.stat().st_mtime_ns
    assert ensure_embedded(tmp_path, n_images=4, seed=1) == root
    assert token.stat().st_mtime_ns == mtime  # reused, not rewritten
    # A cache from another generator version (or a half-written folder without a marker) is regenerated.
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    (root / "stale.txt").write_text("old")
    assert ensure_embedded(tmp_path, n_images=4, seed=1) == root
    assert not (root / "stale.txt").exists()
    assert {k: v for k, v in _hashes(root).items() if k != synthetic.MARKER} == \
           {k: v for k, v in first.items() if k != synthetic.MARKER}
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp or old folders left
