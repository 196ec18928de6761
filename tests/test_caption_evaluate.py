"""Caption error analysis on hand-made captions, checked against the embedded generator's own scenes, and the
evaluation figures."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hwtools.caption import synthetic
from hwtools.caption.evaluate import (analyse_errors, attention_grid, consensus_words, has_repetition,
                                      load_scene_facts_for, scene_failures, write_attention, write_errors_md,
                                      write_samples)
from hwtools.caption.vocab import clean_caption


def scene(layout, objects, background="dark"):
    objs = [{"kind": k, "colour": c, "size": "big", "position": p} for k, c, p in objects]
    return {"layout": layout, "count": len(objs), "background": background, "objects": objs}


SINGLE = scene("single", [("circle", "red", "top left")])
GROUP = scene("group", [("star", "blue", "right")] * 3, background="white")
PAIR_V = scene("pair-vertical", [("square", "green", "top"), ("cross", "yellow", "bottom")], background="sky")


def fails(caption, facts):
    return {k for k, bad in scene_failures(caption.split(), facts).items() if bad}


def exact_match_bleu(refs, hyp):
    return 1.0 if hyp in refs else 0.0


def test_consensus_words_are_content_words_of_every_reference():
    refs = ["a red circle on the left", "a small red circle at the left", "red circle left side"]
    assert consensus_words(refs) == {"red", "circle", "left"}
    assert consensus_words([]) == set()


def test_repetition_in_a_row_or_beyond_the_references():
    refs = ["a red circle on the left and a red square on the right", "two red shapes"]
    assert has_repetition("a a red circle".split(), refs)
    assert has_repetition("a red circle on the left on the left".split(), refs)  # 'left' twice, refs once
    assert not has_repetition("a red circle on the left and a red square on the right".split(), refs)
    assert has_repetition("a red circle and a red square and a red star".split(), refs)  # red 3x, refs 2x
    assert not has_repetition("".split(), refs)


@pytest.mark.parametrize("caption, expected", [
    ("a red circle in the top left corner on a black background", set()),  # 'black' names the background
    ("a red circle in the upper left corner", set()),
    ("a blue circle in the top left corner", {"wrong_colour"}),
    ("a black circle in the top left corner", {"wrong_colour"}),  # not a background phrase here
    ("two red circles at the top left", {"wrong_count"}),
    ("only one red circle at the bottom right", {"wrong_position"}),
    ("a single red circle in the middle", {"wrong_position"}),
    ("three green circles at the bottom", {"wrong_colour", "wrong_count", "wrong_position"}),
])
def test_scene_failures_single(caption, expected):
    assert fails(caption, SINGLE) == expected


def test_scene_failures_group_and_pair():
    assert fails("three blue stars on the right side on a white background", GROUP) == set()
    assert fails("two blue stars on the right", GROUP) == {"wrong_count"}
    assert fails("three blue stars on the left", GROUP) == {"wrong_position"}
    assert fails("a green square above a yellow cross against a blue sky", PAIR_V) == set()
    assert fails("a yellow cross under a green square in the sky", PAIR_V) == set()
    assert fails("a green square to the left of a yellow cross", PAIR_V) == {"wrong_position"}
    assert fails("a green square above a red cross", PAIR_V) == {"wrong_colour"}


def test_scene_checks_accept_every_reference_of_generated_scenes(tmp_path):
    """The generator's own captions are true by construction: none may be flagged."""
    facts = synthetic.generate(tmp_path, n_images=60, seed=5)
    layouts = set()
    for facts_one in facts.values():
        refs = [" ".join(clean_caption(c)) for c in facts_one["captions"]]
        layouts.add(facts_one["layout"])
        for ref in refs:
            assert fails(ref, facts_one) == set(), (ref, facts_one["objects"])
            assert not has_repetition(ref.split(), refs), ref
    assert layouts == {"single", "group", "pair-horizontal", "pair-vertical"}


def test_analyse_errors_counts_and_worst_list():
    refs = {
        "a.jpg": ["a red circle in the top left corner", "a big red circle at the top left"],
        "b.jpg": ["three blue stars on the right", "three big blue stars on the right side"],
        "c.jpg": ["a green square above a yellow cross", "a yellow cross below a green square"],
    }
    hyps = {
        "a.jpg": "a red circle in the top left corner",  # perfect
        "b.jpg": "two blue blue stars on the left",  # count, position, repetition
        "c.jpg": "a green square above a red square",  # colour; 'cross' and 'yellow' missing
    }
    scenes = {"a.jpg": SINGLE, "b.jpg": GROUP, "c.jpg": PAIR_V}
    out = analyse_errors(refs, hyps, scenes, worst=2, sentence_bleu=exact_match_bleu)
    assert out["images"] == 3 and out["scenes_checked"] == 3
    assert out["failures"] == {"consensus_word_missing": 2, "wrong_colour": 1, "wrong_count": 1,
                               "wrong_position": 1, "repeated_words": 2}
    missed = dict(out["missed_words"])
    assert missed == {"right": 1, "cross": 1, "yellow": 1}  # 'three' is a function word, not content
    assert out["mean_sentence_bleu4"] == pytest.approx(1 / 3)
    assert [r["image"] for r in out["worst"]] == ["b.jpg", "c.jpg"]
    assert out["worst"][0]["flags"] == ["consensus_word_missing", "wrong_count", "wrong_position", "repeated_words"]
    assert "3 object(s)" in out["worst"][0]["scene"]


def test_analyse_errors_without_scene_facts_reports_scene_checks_as_unavailable(tmp_path):
    refs = {"x.jpg": ["a dog runs on the grass", "a brown dog running on grass"]}
    out = analyse_errors(refs, {"x.jpg": "a cat sits on a cat"}, None, sentence_bleu=exact_match_bleu)
    assert out["failures"]["wrong_colour"] is None and out["failures"]["wrong_position"] is None
    assert out["failures"]["consensus_word_missing"] == 1 and out["failures"]["repeated_words"] == 1
    path = write_errors_md(tmp_path / "errors.md", out, "toy")
    text = path.read_text()
    assert "| wrong colour | n/a | n/a |" in text
    assert "| repeated words | 1 | 100.0% |" in text
    assert "- generated: a cat sits on a cat" in text and "  - a brown dog running on grass" in text
    assert "dog (1)" in text


def test_errors_md_lists_worst_images_with_their_facts(tmp_path):
    refs = {"a.jpg": ["a red circle in the top left corner"], "b.jpg": ["three blue stars on the right"]}
    hyps = {"a.jpg": "a red circle in the top left corner", "b.jpg": "a red circle"}
    out = analyse_errors(refs, hyps, {"a.jpg": SINGLE, "b.jpg": GROUP}, sentence_bleu=exact_match_bleu)
    text = write_errors_md(tmp_path / "errors.md", out, "toy").read_text()
    assert text.index("### 1. b.jpg (BLEU-4 0.0000)") < text.index("### 2. a.jpg (BLEU-4 1.0000)")
    assert "| wrong colour | 1 | 50.0% |" in text
    assert "scene: 3 object(s) (group, white background): big blue star @ right" in text


def test_scene_facts_are_found_beside_the_images_folder(tmp_path):
    facts = synthetic.generate(tmp_path, n_images=3, seed=1)
    name = next(iter(facts))
    image = tmp_path / synthetic.IMAGES_DIR / name
    other = tmp_path / "elsewhere" / "photos" / "x.jpg"
    found = load_scene_facts_for([str(image), str(other)])
    assert list(found) == [str(image)]
    assert found[str(image)]["objects"] == json.loads((tmp_path / synthetic.SCENES_FILE).read_text())[name]["objects"]


def test_attention_grid_keeps_region_order():
    alphas = torch.arange(2 * 49, dtype=torch.float32).reshape(2, 49)
    grid = attention_grid(alphas, (3, 224, 224))
    assert grid.shape == (2, 7, 7)
    assert grid[1, 1, 1] == 49 + 8  # region 8 = row 1, column 1 (row-major flattening of the feature map)
    assert attention_grid(torch.ones(1, 12), (3, 96, 128)).shape == (1, 3, 4)
    assert attention_grid(torch.ones(1, 50), (3, 224, 224)).shape == (1, 1, 50)  # not a grid


def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    hyps = {p: f"caption {i}" for i, p in enumerate(paths)}
    refs = {p: ["ref one", "ref two"] for p in paths}
    samples = write_samples(tmp_path / "samples.png", paths, hyps, refs, title="t")
    assert samples.stat().st_size > 5000
    alphas = torch.softmax(torch.randn(3, 49), dim=1)
    heat = write_attention(tmp_path, paths[0], "a red circle", alphas, (3, 224, 224))
    assert heat.name == "attention_img0.png" and heat.stat().st_size > 5000
