"""Test-split evaluation of a captioner: greedy and beam captions, COCO metrics, sample and attention figures, and
the error analysis written to errors.md (lowest sentence-BLEU images and counts of typical failures)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from accelerate.utils import send_to_device
from PIL import Image

from hwtools.caption import synthetic
from hwtools.caption.data import open_rgb
from hwtools.caption.decode import beam_search, greedy_decode
from hwtools.caption.vocab import Vocab, clean_caption

# Words too common to say anything about an image; a word in every reference that is not one of these is the
# image's "consensus" content (the object, and on the embedded set its colour/position).
FUNCTION_WORDS = frozenset(
    "a an the and or but of in on at to for from by with into onto over under above below near next is are was were "
    "be been it its this that these those there here some all his her their they he she them as while who which what "
    "up down out off one two three".split())
COUNT_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3}
# Words each position label of the embedded set may be described with.
LABEL_POSITION_WORDS = {"left": {"left"}, "right": {"right"}, "top": {"top", "upper"}, "bottom": {"bottom", "lower"},
                        "centre": {"centre", "center", "middle"}}
VERTICAL_RELATION_WORDS = {"above", "below", "over", "under"}
FAILURES = {
    "consensus_word_missing": "a content word of every reference is missing from the caption (usually the object)",
    "wrong_colour": "colour word not true of any object (embedded set; background phrases excluded)",
    "wrong_count": "count word (one/single/two/three) that does not match the number of objects (embedded set)",
    "wrong_position": "position word not true of any object (embedded set)",
    "repeated_words": "a word twice in a row, or a content word said more often than in any reference",
}
SCENE_FAILURES = ("wrong_colour", "wrong_count", "wrong_position")
# summary.json `test` keys of the run contract (greedy; beam search adds them prefixed `beam_`)
CAPTION_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


# --------------------------------------------------------------------------------------------------- captioning


@torch.no_grad()
def caption_batch(model, batch: dict, vocab: Vocab, max_len: int, beam_size: int = 1):
    """Captions of a batch (greedy, or beam search when beam_size > 1) -> [(text, alphas (n_words, R) | None)]."""
    device = next(model.decoder.parameters()).device
    was_training = model.training
    model.eval()  # a fine-tuned encoder's BatchNorm must not learn from the images it captions
    try:
        features = model.encode(send_to_device(batch, device))
        if beam_size > 1:
            ids, alphas = beam_search(model, features, beam_size, max_len)
        else:
            ids, alphas = greedy_decode(model, features, max_len)
    finally:
        model.train(was_training)
    return [(vocab.decode(seq), None if alphas is None else alphas[i]) for i, seq in enumerate(ids)]


def caption_split(model, loader, vocab: Vocab, max_len: int, beam_size: int = 1):
    """Caption every image of an eval loader -> (hypotheses {id: text}, references {id: [texts]},
    alphas {id: (n_words, R)} or {} when the arch has no attention)."""
    hyps, refs, maps = {}, {}, {}
    for batch in loader:
        for image_id, ref, (text, alpha) in zip(batch["image_id"], batch["references"],
                                                caption_batch(model, batch, vocab, max_len, beam_size)):
            hyps[image_id], refs[image_id] = text, list(ref)
            if alpha is not None:
                maps[image_id] = alpha
    return hyps, refs, maps


def score_test_split(model, loader, vocab: Vocab, max_len: int, beam_size: int):
    """COCO caption metrics on every test image with all references: greedy, and with prefix `beam_` beam search
    when beam_size > 1 -> (metrics dict, greedy hypotheses, references, greedy attention maps)."""
    from hwtools.metrics import caption_scores

    hyps, refs, maps = caption_split(model, loader, vocab, max_len)
    test = {"images": len(hyps), **caption_scores(refs, hyps)}
    if beam_size > 1:
        beam_hyps, _, _ = caption_split(model, loader, vocab, max_len, beam_size)
        beam = caption_scores(refs, beam_hyps)
        test["beam_size"] = beam_size
        test.update({f"beam_{k}": beam.get(k) for k in CAPTION_METRICS})
    return test, hyps, refs, maps


# ------------------------------------------------------------------------------------------------ error analysis


def consensus_words(references: list[str]) -> set[str]:
    """Content words that every reference uses (what annotators agree the image shows)."""
    sets = [set(r.split()) for r in references if r.strip()]
    return set.intersection(*sets) - FUNCTION_WORDS if sets else set()


def has_repetition(words: list[str], references: list[str]) -> bool:
    """A word twice in a row, or a content word said more often than any reference says it ("a red circle and a
    red square" is fine when the references also name two red things)."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    ref_counts = [Counter(r.split()) for r in references]
    return any(n > 1 and n > max((c[w] for c in ref_counts), default=0)
               for w, n in Counter(words).items() if w not in FUNCTION_WORDS)


def _background_phrases() -> list[list[str]]:
    phrases = {tuple(clean_caption(p)) for options in synthetic.BG_PHRASES.values() for p in options}
    return sorted((list(p) for p in phrases), key=len, reverse=True)


def _strip_phrases(words: list[str], phrases: list[list[str]]) -> list[str]:
    out, i = [], 0
    while i < len(words):
        hit = next((p for p in phrases if words[i:i + len(p)] == p), None)
        if hit:
            i += len(hit)
        else:
            out.append(words[i])
            i += 1
    return out


def scene_failures(words: list[str], scene: dict) -> dict[str, bool]:
    """Which colour / count / position words of a caption are false of an embedded-set scene (from scenes.json)."""
    objects = scene["objects"]
    object_words = _strip_phrases(words, _background_phrases())  # "on a black background" is not an object colour
    colours = {w for w in object_words if w in synthetic.COLOURS}
    counts = {COUNT_WORDS[w] for w in words if w in COUNT_WORDS}
    allowed = set()
    for o in objects:
        for part in o["position"].split():
            allowed |= LABEL_POSITION_WORDS[part]
    if scene.get("layout") == "pair-vertical":
        allowed |= VERTICAL_RELATION_WORDS
    positions = {w for w in words if w in synthetic.POSITION_WORDS}
    return {"wrong_colour": bool(colours - {o["colour"] for o in objects}),
            "wrong_count": bool(counts - {scene["count"]}),
            "wrong_position": bool(positions - allowed)}


def describe_scene(scene: dict) -> str:
    """'2 objects (pair-horizontal, on grass): big red circle @ left; small blue star @ right'."""
    objs = "; ".join(f"{o['size']} {o['colour']} {o['kind']} @ {o['position']}" for o in scene["objects"])
    return f"{scene['count']} object(s) ({scene.get('layout')}, {scene.get('background')} background): {objs}"


def load_scene_facts_for(image_ids) -> dict[str, dict]:
    """Scene facts of images that come from an embedded set (scenes.json beside the images folder), by image id."""
    roots: dict[Path, Optional[dict]] = {}
    out = {}
    for image_id in image_ids:
        root = Path(image_id).parent.parent
        if root not in roots:
            path = root / synthetic.SCENES_FILE
            roots[root] = synthetic.load_scene_facts(root) if path.is_file() else None
        facts = roots[root]
        if facts is not None and Path(image_id).name in facts:
            out[image_id] = facts[Path(image_id).name]
    return out


def analyse_errors(references: Mapping[str, list[str]], hypotheses: Mapping[str, str],
                   scenes: Optional[Mapping[str, dict]] = None, worst: int = 10,
                   sentence_bleu: Optional[Callable[[list[str], str], float]] = None) -> dict:
    """Typical-failure counts over all captions and the `worst` images by sentence BLEU-4.

    Returns {"images", "mean_sentence_bleu4", "failures": {name: count or None when not checkable},
    "scenes_checked", "missed_words": [(word, n)], "worst": [{image, bleu4, generated, references, scene, flags}]}.
    """
    if sentence_bleu is None:
        from hwtools.metrics import sentence_bleu4 as sentence_bleu
    scenes = scenes or {}
    failures = Counter({name: 0 for name in FAILURES})
    missed = Counter()
    rows = []
    for image_id, hyp in hypotheses.items():
        refs = list(references[image_id])
        words = hyp.split()
        flags = []
        lost = consensus_words(refs) - set(words)
        if lost:
            flags.append("consensus_word_missing")
            missed.update(lost)
        if has_repetition(words, refs):
            flags.append("repeated_words")
        scene = scenes.get(image_id)
        if scene is not None:
            flags += [name for name, bad in scene_failures(words, scene).items() if bad]
        failures.update(flags)
        rows.append({"image": image_id, "bleu4": float(sentence_bleu(refs, hyp)), "generated": hyp,
                     "references": refs, "scene": describe_scene(scene) if scene else None,
                     "flags": [f for f in FAILURES if f in flags]})
    counts = {name: (failures[name] if name not in SCENE_FAILURES or scenes else None) for name in FAILURES}
    rows.sort(key=lambda r: (r["bleu4"], r["image"]))
    return {"images": len(rows),
            "mean_sentence_bleu4": float(np.mean([r["bleu4"] for r in rows])) if rows else math.nan,
            "failures": counts, "scenes_checked": sum(1 for i in hypotheses if i in scenes),
            "missed_words": sorted(missed.items(), key=lambda kv: (-kv[1], kv[0]))[:10], "worst": rows[:worst]}


def write_errors_md(path, analysis: dict, title: str) -> Path:
    """errors.md from analyse_errors' result."""
    n = max(analysis["images"], 1)
    lines = [f"# Error analysis: {title}", "",
             f"{analysis['images']} test images, greedy captions; mean sentence BLEU-4 "
             f"{analysis['mean_sentence_bleu4']:.4f}.", "", "## Typical failures", "",
             "| failure | captions | share | what is counted |", "|---|---|---|---|"]
    for name, what in FAILURES.items():
        count = analysis["failures"][name]
        cells = ("n/a", "n/a") if count is None else (str(count), f"{100 * count / n:.1f}%")
        lines.append(f"| {name.replace('_', ' ')} | {cells[0]} | {cells[1]} | {what} |")
    if analysis["failures"]["wrong_colour"] is None:
        lines += ["", "Colour/count/position checks need scene facts (scenes.json of the embedded set); "
                      "this data set has none."]
    else:
        lines += ["", f"Scene facts checked for {analysis['scenes_checked']} image(s)."]
    if analysis["missed_words"]:
        lines += ["", "Consensus words most often missing: "
                  + ", ".join(f"{w} ({c})" for w, c in analysis["missed_words"]) + "."]
    lines += ["", f"## Lowest sentence BLEU-4 ({len(analysis['worst'])} images)", ""]
    for rank, row in enumerate(analysis["worst"], 1):
        lines.append(f"### {rank}. {Path(row['image']).name} (BLEU-4 {row['bleu4']:.4f})")
        lines.append("")
        lines.append(f"- generated: {row['generated'] or '(empty)'}")
        if row["flags"]:
            lines.append(f"- failures: {', '.join(f.replace('_', ' ') for f in row['flags'])}")
        if row["scene"]:
            lines.append(f"- scene: {row['scene']}")
        lines.append("- references:")
        lines += [f"  - {r}" for r in row["references"]]
        lines.append("")
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ figures


def attention_grid(alphas: torch.Tensor, input_size) -> np.ndarray:
    """(n_words, R) region weights -> (n_words, h, w) maps, h x w being the encoder's grid for a (C, H, W) input."""
    n, regions = alphas.shape
    _, height, width = input_size
    h = max(1, round(math.sqrt(regions * height / width)))
    w = regions // h
    if h * w != regions:  # not a grid (e.g. tokens with a class token): show them as one row
        h, w = 1, regions
    return alphas.float().reshape(n, h, w).numpy()


def _open_rgb(path) -> Image.Image:
    return open_rgb(path)  # upright and RGB, as training read it


def load_image_tensor(path, transform) -> torch.Tensor:
    """One image file through the encoder's eval transform."""
    return transform(_open_rgb(path))


def write_samples(path, image_ids: list[str], hypotheses: Mapping[str, str], references: Mapping[str, list[str]],
                  title: str = "") -> Path:
    """samples.png: each image with its generated caption and references."""
    from hwtools.plots import caption_samples

    return caption_samples([_open_rgb(i) for i in image_ids], [hypotheses[i] for i in image_ids],
                           [references.get(i, []) for i in image_ids], path, title=title)


def write_attention(out_dir, image_id: str, caption: str, alphas: torch.Tensor, input_size) -> Path:
    """attention_<image>.png: one heat map per generated word, upsampled over the whole image."""
    from hwtools.plots import attention_maps

    name = Path(image_id).stem
    return attention_maps(_open_rgb(image_id), caption.split(), attention_grid(alphas, input_size),
                          Path(out_dir) / f"attention_{name}.png", title=caption)


def evaluate_and_report(model, loader, vocab: Vocab, max_len: int, beam_size: int, out_dir, title: str,
                        input_size, n_samples: int = 5, worst: int = 10) -> tuple[dict, list[Path]]:
    """Test metrics (greedy + beam), samples.png, attention_<image>.png (attention arch) and errors.md in
    out_dir -> (metrics for summary.json's `test`, figure paths)."""
    out_dir = Path(out_dir)
    test, hyps, refs, maps = score_test_split(model, loader, vocab, max_len, beam_size)
    shown = list(hyps)[:n_samples]
    figures = [write_samples(out_dir / "samples.png", shown, hyps, refs, title=title)]
    if maps:
        figures.append(write_attention(out_dir, shown[0], hyps[shown[0]], maps[shown[0]], input_size))
    analysis = analyse_errors(refs, hyps, load_scene_facts_for(hyps), worst=worst)
    test["failures"] = analysis["failures"]
    write_errors_md(out_dir / "errors.md", analysis, title)
    return test, figures


# -------------------------------------------------------------------------------------------- during training


def epoch_caption_logger(accelerator, tracker, batch: dict, vocab: Vocab, max_len: int):
    """An `on_epoch_end` callback that captions one fixed validation image (a one-item eval batch) and logs it to
    metrics.jsonl (split "sample") and W&B."""
    rows = []
    image_id = batch["image_id"][0]

    def on_epoch_end(model, epoch: int, step: int) -> None:
        if not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(model)
        text, _ = caption_batch(model, batch, vocab, max_len)[0]
        tracker.log({"step": step, "epoch": epoch, "split": "sample", "image": image_id, "caption": text})
        rows.append([epoch, step, Path(image_id).name, text])
        tracker.log_table("validation_caption", ["epoch", "step", "image", "caption"], list(rows))
        accelerator.print(f"epoch {epoch}: {Path(image_id).name}: {text}")

    return on_epoch_end
