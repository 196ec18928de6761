"""The embedded captioning data set: simple drawn scenes in the original Flickr8k layout, generated once per cache.

Flickr8k cannot be downloaded here, so the package draws its own: coloured shapes of two sizes, alone, in groups of two
or three, or in pairs, on six backgrounds, with some noise and occluding twigs. Every fact a caption states (colour,
kind, size, count, left/right/top/bottom/centre) is true in the pixels, so a captioner can learn it and attention maps
can be checked against the object boxes recorded in `scenes.json`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Bump when drawing or captions change: a cache written by another version is regenerated.
GENERATOR_VERSION = 1
DEFAULT_N_IMAGES = 2000
DEFAULT_SEED = 8091
CAPTIONS_PER_IMAGE = 5
MARKER = "GENERATOR.json"
SCENES_FILE = "scenes.json"
IMAGES_DIR = "Flicker8k_Dataset"  # sic: the original archive's spelling
TOKEN_FILE = "Flickr8k_text/Flickr8k.token.txt"

KINDS = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURAL = {k: ("crosses" if k == "cross" else k + "s") for k in KINDS}
COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 80, 225), "yellow": (245, 215, 30),
    "purple": (135, 55, 180), "orange": (245, 135, 20), "white": (248, 248, 248), "black": (18, 18, 18),
}
# Colours left out on each background so that every object stands out from it.
BACKGROUNDS = {
    "white": {"avoid": {"white", "yellow"}}, "gray": {"avoid": set()}, "dark": {"avoid": {"black"}},
    "grass": {"avoid": {"green"}}, "sky": {"avoid": {"blue"}}, "sand": {"avoid": {"yellow", "orange", "white"}},
}
BG_PHRASES = {
    "white": ["on a white background", "on white"], "gray": ["on a gray background", "on a grey background"],
    "dark": ["on a dark background", "on a black background"], "grass": ["on the grass", "on green grass"],
    "sky": ["against a blue sky", "in the sky"], "sand": ["on the sand", "on sandy ground"],
}
# Object side as a fraction of the image's shorter side.
SIZE_RANGES = {"small": (0.10, 0.14), "big": (0.21, 0.26)}
SIZE_WORDS = {"small": ["small", "little"], "big": ["big", "large"]}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# Position label -> (column, row) of the 3x3 cell the object's centre lies in.
CELLS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
POS_PHRASES = {
    "left": ["on the left", "on the left side", "at the left of the picture", "on the left side of the image"],
    "right": ["on the right", "on the right side", "at the right of the picture", "on the right side of the image"],
    "top": ["at the top", "near the top", "at the top of the picture", "in the upper part of the image"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom of the image", "in the lower part of the picture"],
    "centre": ["in the centre", "in the middle", "in the center of the picture", "in the middle of the image"],
    "top left": ["in the top left corner", "at the top left", "in the upper left corner"],
    "top right": ["in the top right corner", "at the top right", "in the upper right corner"],
    "bottom left": ["in the bottom left corner", "at the bottom left", "in the lower left corner"],
    "bottom right": ["in the bottom right corner", "at the bottom right", "in the lower right corner"],
}
# Words a caption may use for each position label; tests check captions against these and the recorded boxes.
POSITION_WORDS = {"left", "right", "top", "bottom", "upper", "lower", "centre", "center", "middle", "above", "below",
                  "over", "under"}


def ensure_embedded(cache_dir, n_images: int = DEFAULT_N_IMAGES, seed: int = DEFAULT_SEED) -> Path:
    """Return the embedded Flickr8k-layout folder under cache_dir, generating it first if absent or outdated."""
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / f"embedded-flickr8k-n{n_images}-s{seed}"
    wanted = {"version": GENERATOR_VERSION, "n_images": n_images, "seed": seed}
    if _marker(root) == wanted:
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Generate beside the target and rename, so a killed run never leaves a half-written set behind.
    tmp = Path(tempfile.mkdtemp(prefix=".embedded-tmp-", dir=cache_dir))
    try:
        generate(tmp, n_images=n_images, seed=seed)
        if root.exists():
            if _marker(root) == wanted:  # another process finished first
                return root
            old = Path(tempfile.mkdtemp(prefix=".embedded-old-", dir=cache_dir))
            os.replace(root, old / "set")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if _marker(root) != wanted:  # lost a race to a process that wrote something else
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def load_scene_facts(root) -> dict[str, dict]:
    """Scene facts of an embedded set, keyed by image file name (objects, colours, counts, positions, boxes)."""
    return json.loads((Path(root) / SCENES_FILE).read_text())


def generate(out_dir, n_images: int = DEFAULT_N_IMAGES, seed: int = DEFAULT_SEED) -> dict[str, dict]:
    """Write n_images scenes in the original Flickr8k layout into out_dir; return the scene facts by file name."""
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / TOKEN_FILE).parent.mkdir(parents=True, exist_ok=True)
    facts, lines = {}, []
    for i in range(n_images):
        # One generator per image: the first k images are the same whatever n_images is.
        rng = random.Random(f"{seed}-{i}")
        name = _image_name(seed, i)
        image, scene = draw_scene(rng, np.random.default_rng([seed, i]))
        image.save(out_dir / IMAGES_DIR / name, "JPEG", quality=scene.pop("jpeg_quality"))
        scene["captions"] = write_captions(scene, rng)
        facts[name] = scene
        lines += [f"{name}#{k}\t{c}" for k, c in enumerate(scene["captions"])]
    (out_dir / TOKEN_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / SCENES_FILE).write_text(json.dumps(facts, indent=1), encoding="utf-8")
    (out_dir / MARKER).write_text(json.dumps({"version": GENERATOR_VERSION, "n_images": n_images, "seed": seed}))
    return facts


def _image_name(seed: int, i: int) -> str:
    # Shaped like Flickr8k's "1000268201_693b08cb0e.jpg" so path handling meets the real pattern.
    digest = hashlib.sha1(f"{seed}-{i}".encode()).hexdigest()[:10]
    return f"{1000000000 + 104729 * i:010d}_{digest}.jpg"


# ----------------------------------------------------------------------------------------------------- drawing


def draw_scene(rng: random.Random, nrng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Draw one random scene; return the RGB image and its facts (objects with kind/colour/size/box/position)."""
    w, h = rng.randint(160, 400), rng.randint(160, 400)
    background = rng.choice(sorted(BACKGROUNDS))
    image = _background(background, w, h, rng, nrng)
    colours = [c for c in COLOURS if c not in BACKGROUNDS[background]["avoid"]]
    layout = rng.choices(["single", "group", "pair"], weights=[0.35, 0.3, 0.35])[0]
    unit = min(w, h)

    def sized(size):
        return unit * rng.uniform(*SIZE_RANGES[size])

    objects = []
    if layout == "single":
        label = rng.choice(sorted(CELLS))
        size = rng.choice(["small", "big"])
        s = sized(size)
        cx, cy = _centre_in_cell(CELLS[label], s, w, h, rng)
        objects.append(_obj(rng.choice(KINDS), rng.choice(colours), size, s, cx, cy, label))
    elif layout == "group":
        label = rng.choice(["left", "right", "top", "bottom"])
        count = rng.choice([2, 3])
        kind, colour, size = rng.choice(KINDS), rng.choice(colours), rng.choice(["small", "big"])
        s = sized(size)
        col, row = CELLS[label]
        for k in range(count):
            # Spread along the side: left/right groups stand in a column, top/bottom groups in a row.
            slot = (k + 0.5 + rng.uniform(-0.12, 0.12)) / count
            if label in ("left", "right"):
                cx, _ = _centre_in_cell((col, row), s, w, h, rng)
                cy = _clamp(slot * h, s / 2 + 2, h - s / 2 - 2)
            else:
                _, cy = _centre_in_cell((col, row), s, w, h, rng)
                cx = _clamp(slot * w, s / 2 + 2, w - s / 2 - 2)
            objects.append(_obj(kind, colour, size, s, cx, cy, label))
    else:
        relation = rng.choice(["horizontal", "vertical"])
        kind_a, kind_b = rng.choice(KINDS), rng.choice(KINDS)
        colour_a = rng.choice(colours)
        # The two objects must differ in kind or colour, or the captions could not tell them apart.
        colour_b = rng.choice([c for c in colours if c != colour_a or kind_a != kind_b])
        size_a, size_b = rng.choice(["small", "big"]), rng.choice(["small", "big"])
        s_a, s_b = sized(size_a), sized(size_b)
        if relation == "horizontal":
            row_a, row_b = rng.choice([(1, 1), (0, 0), (2, 2), (0, 2), (2, 0), (1, 1)])
            cells = ((0, row_a), (2, row_b))
            labels = ("left", "right")
        else:
            col_a, col_b = rng.choice([(1, 1), (0, 0), (2, 2), (0, 2), (2, 0), (1, 1)])
            cells = ((col_a, 0), (col_b, 2))
            labels = ("top", "bottom")
        for kind, colour, size, s, cell, label in zip((kind_a, kind_b), (colour_a, colour_b), (size_a, size_b),
                                                      (s_a, s_b), cells, labels):
            cx, cy = _centre_in_cell(cell, s, w, h, rng)
            objects.append(_obj(kind, colour, size, s, cx, cy, label))
        layout = f"pair-{relation}"

    draw = ImageDraw.Draw(image)
    for o in objects:
        _draw_object(draw, o, rng)
    twigs = rng.random() < 0.25
    if twigs:  # thin occluders across the scene, drawn over the objects
        for _ in range(rng.randint(2, 6)):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            ang, ln = rng.uniform(0, math.pi), rng.uniform(0.2, 0.6) * unit
            draw.line([(x0, y0), (x0 + ln * math.cos(ang), y0 + ln * math.sin(ang))],
                      fill=(110, 85, 55), width=rng.randint(1, 3))
    noise = rng.choice([0.0, 0.0, 4.0, 8.0, 12.0])
    if noise:
        arr = np.asarray(image, dtype=np.float32) + nrng.normal(0, noise, (h, w, 3)).astype(np.float32)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    for o in objects:
        o["column"], o["row"] = _column_row(o["center"], w, h)
    scene = {"width": w, "height": h, "background": background, "layout": layout, "count": len(objects),
             "objects": objects, "noise_std": noise, "twigs": twigs, "jpeg_quality": rng.randint(75, 95)}
    return image, scene


def _obj(kind, colour, size, side, cx, cy, label) -> dict:
    half = side / 2
    return {"kind": kind, "colour": colour, "size": size, "position": label,
            "center": [round(cx, 1), round(cy, 1)], "side": round(side, 1),
            "bbox": [round(cx - half, 1), round(cy - half, 1), round(cx + half, 1), round(cy + half, 1)]}


def _clamp(v, lo, hi):
    return max(lo, min(hi, v))


def _centre_in_cell(cell, side, w, h, rng) -> tuple[float, float]:
    """A centre well inside the 3x3 cell (so its position word is true) with the whole object in the frame."""
    def pick(index, length):
        lo, hi = index * length / 3, (index + 1) * length / 3
        inner = length * 0.04  # keep off the cell border so the label is unambiguous
        lo, hi = max(lo + inner, side / 2 + 2), min(hi - inner, length - side / 2 - 2)
        return rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2

    return pick(cell[0], w), pick(cell[1], h)


def _column_row(center, w, h) -> tuple[str, str]:
    cx, cy = center
    column = "left" if cx < w / 3 else "right" if cx >= 2 * w / 3 else "centre"
    row = "top" if cy < h / 3 else "bottom" if cy >= 2 * h / 3 else "middle"
    return column, row


def _background(kind: str, w: int, h: int, rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    if kind in ("white", "gray", "dark"):
        base = {"white": 244, "gray": 128, "dark": 32}[kind] + rng.randint(-8, 8)
        return Image.new("RGB", (w, h), (base, base, base))
    if kind == "sky":  # lighter towards the horizon
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        top, low = np.array([60, 120, 215], np.float32), np.array([170, 205, 245], np.float32)
        arr = np.broadcast_to(top + (low - top) * t, (h, w, 3))
        return Image.fromarray(arr.astype(np.uint8))
    base = np.array({"grass": (70, 150, 55), "sand": (215, 195, 145)}[kind], np.float32)
    # Blotchy texture: coarse noise scaled up, plus fine grain.
    coarse = nrng.normal(0, 1, (max(2, h // 16), max(2, w // 16))).astype(np.float32)
    blotch = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))[..., None]
    arr = base + 14 * blotch + nrng.normal(0, 6, (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_object(draw: ImageDraw.ImageDraw, o: dict, rng: random.Random) -> None:
    cx, cy = o["center"]
    r = o["side"] / 2
    # Small per-object shade change so colour is a range, not a single pixel value.
    fill = tuple(int(_clamp(c + rng.randint(-15, 15), 0, 255)) for c in COLOURS[o["colour"]])
    rot = math.radians(rng.uniform(-12, 12))
    kind = o["kind"]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    if kind == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif kind == "diamond":
        pts = [(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)]
    elif kind == "triangle":
        pts = [(0, -r), (r, 0.8 * r), (-r, 0.8 * r)]
    elif kind == "star":
        pts = [((r if k % 2 == 0 else 0.42 * r) * math.sin(k * math.pi / 5),
                -(r if k % 2 == 0 else 0.42 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    else:  # cross: a plus sign
        t = 0.33 * r
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
               (-t, -t)]
    c, s = math.cos(rot), math.sin(rot)
    draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=fill)


# ----------------------------------------------------------------------------------------------------- captions


def write_captions(scene: dict, rng: random.Random, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """n differently worded Flickr8k-style captions (mixed case, punctuation, trailing ' .') true to the scene."""
    makers = {"single": _single_templates, "group": _group_templates}.get(scene["layout"], _pair_templates)
    templates = makers(scene)
    picked = rng.sample(range(len(templates)), n)
    return [_style(templates[k](rng), rng) for k in picked]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: dict, rng: random.Random, size_p: float = 0.6) -> str:
    """'a small red circle' with the size word sometimes left out (people do not always mention it)."""
    words = ([rng.choice(SIZE_WORDS[o["size"]])] if rng.random() < size_p else []) + [o["colour"], o["kind"]]
    return f"{_article(words[0])} {' '.join(words)}"


def _bg(scene, rng) -> str:
    return rng.choice(BG_PHRASES[scene["background"]])


def _pos(label, rng) -> str:
    return rng.choice(POS_PHRASES[label])


def _single_templates(scene):
    o = scene["objects"][0]
    p = o["position"]
    return [
        lambda r: f"{_np(o, r)} {_pos(p, r)} .",
        lambda r: f"there is {_np(o, r)} {_pos(p, r)} {_bg(scene, r)} .",
        lambda r: f"{_np(o, r)} {_bg(scene, r)} , {_pos(p, r)} .",
        lambda r: f"{_pos(p, r)} , there is {_np(o, r)} .",
        lambda r: f"a picture of {_np(o, r)} {_pos(p, r)} .",
        lambda r: f"{_np(o, r, 1.0)} sits {_pos(p, r)} {_bg(scene, r)} .",
        lambda r: f"only one {o['colour']} {o['kind']} , {_pos(p, r)} !",
        lambda r: f"a single {r.choice(SIZE_WORDS[o['size']])} {o['colour']} {o['kind']} {_pos(p, r)} .",
    ]


def _group_templates(scene):
    o = scene["objects"][0]
    p, n = o["position"], COUNT_WORDS[scene["count"]]
    kinds = PLURAL[o["kind"]]
    line = "column" if p in ("left", "right") else "row"
    size = lambda r: r.choice(SIZE_WORDS[o["size"]])  # noqa: E731
    return [
        lambda r: f"{n} {o['colour']} {kinds} {_pos(p, r)} .",
        lambda r: f"there are {n} {size(r)} {o['colour']} {kinds} {_pos(p, r)} {_bg(scene, r)} .",
        lambda r: f"{n} {kinds} , all {o['colour']} , {_pos(p, r)} .",
        lambda r: f"a group of {n} {o['colour']} {kinds} {_pos(p, r)} .",
        lambda r: f"{_pos(p, r)} , {n} {size(r)} {o['colour']} {kinds} .",
        lambda r: f"{n} {o['colour']} {kinds} in a {line} {_pos(p, r)} {_bg(scene, r)} .",
        lambda r: f"{n} ({scene['count']}) {size(r)} {o['colour']} {kinds} {_pos(p, r)} .",
        lambda r: f"some {o['colour']} {kinds} {_pos(p, r)} : {n} of them .",
    ]


def _pair_templates(scene):
    a, b = scene["objects"]  # a is left (horizontal) or top (vertical)
    if scene["layout"] == "pair-horizontal":
        return [
            lambda r: f"{_np(a, r)} on the left and {_np(b, r)} on the right .",
            lambda r: f"{_np(a, r)} to the left of {_np(b, r)} .",
            lambda r: f"{_np(b, r)} to the right of {_np(a, r)} .",
            lambda r: f"{_np(a, r)} next to {_np(b, r)} {_bg(scene, r)} .",
            lambda r: f"two shapes : {_np(a, r)} on the left , {_np(b, r)} on the right .",
            lambda r: f"on the right {_np(b, r)} , on the left {_np(a, r)} .",
            lambda r: f"{_np(a, r)} & {_np(b, r)} side by side , {_bg(scene, r)} .",
        ]
    return [
        lambda r: f"{_np(a, r)} at the top and {_np(b, r)} at the bottom .",
        lambda r: f"{_np(a, r)} above {_np(b, r)} .",
        lambda r: f"{_np(b, r)} below {_np(a, r)} .",
        lambda r: f"{_np(a, r)} over {_np(b, r)} {_bg(scene, r)} .",
        lambda r: f"two shapes : {_np(a, r)} at the top , {_np(b, r)} at the bottom .",
        lambda r: f"at the bottom {_np(b, r)} , at the top {_np(a, r)} .",
        lambda r: f"{_np(b, r)} under {_np(a, r)} , {_bg(scene, r)} .",
    ]


def _style(text: str, rng: random.Random) -> str:
    """Flickr-like surface noise: capital first letter, a stray capitalised word, occasional quotes or no spaces."""
    words = text.split(" ")
    words[0] = words[0][:1].upper() + words[0][1:]
    if rng.random() < 0.15:
        k = rng.randrange(len(words))
        words[k] = words[k].capitalize()
    text = " ".join(words)
    if rng.random() < 0.1:
        text = text.replace(" ,", ",")
    if rng.random() < 0.05:
        text = f'"{text[:-2]}" .'
    return text
