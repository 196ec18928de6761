"""Metrics: pycocoevalcap caption scores (cross-checked against nltk), sentence BLEU, chrF, perplexity."""
import math
import shutil

import pytest

from hwtools import metrics
from hwtools.metrics import caption_scores, chrf, nltk_corpus_bleu, perplexity, sentence_bleu4

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need java")

# Lower-case words after tokenisation, so PTB tokens == whitespace tokens. Image "c" is shorter than its closest
# reference (corpus brevity penalty < 1); image "b" is equidistant from refs of 4 and 6 words, where both
# implementations must pick the shorter one. One reference holds a line break, which must not shift other lines.
# No hypothesis is shorter than 4 words: there the two differ by definition (nltk counts at least one n-gram guess
# per sentence, pycocoevalcap none).
REFS = {
    "a": ["A dog runs on green grass.", "The dog is running."],
    "b": ["Two cats sleep on a sofa", "Cats sleep on sofa."],
    "c": ["A man rides a red bike down the road", "A man on a\nred bike."],
}
HYPS = {"a": "a dog runs on the grass", "b": "two cats sleep on a", "c": "A man rides a"}


def words(text):
    return text.lower().replace(".", "").split()


@pytest.fixture(scope="module")
def java_scores():
    if shutil.which("java") is None:
        pytest.skip("needs java")
    return caption_scores(REFS, HYPS)


@needs_java
def test_bleu_matches_nltk_corpus_bleu(java_scores):
    ids = sorted(HYPS)
    refs = [[words(r) for r in REFS[i]] for i in ids]
    hyps = [words(HYPS[i]) for i in ids]
    assert sum(map(len, hyps)) < 6 + 4 + 6  # the brevity penalty is in play
    for n in range(1, 5):
        assert java_scores[f"bleu{n}"] == pytest.approx(nltk_corpus_bleu(refs, hyps, n), abs=1e-6)
    assert 0.1 < java_scores["bleu4"] < java_scores["bleu1"] < 1
    assert java_scores["tokenizer"] == "ptb"


@needs_java
def test_meteor_is_a_number_with_java(java_scores):
    assert isinstance(java_scores["meteor"], float) and 0 < java_scores["meteor"] < 1
    assert "unavailable" not in java_scores
    assert 0 < java_scores["rouge_l"] < 1 and java_scores["cider"] > 0


def test_without_java_meteor_is_unavailable_and_the_rest_still_computed(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    scores = caption_scores(REFS, HYPS)
    assert scores["meteor"] is None and scores["unavailable"] == ["meteor"]
    assert scores["tokenizer"] == "simple"
    # The fallback tokenisation gives the same tokens as PTB here, so the same BLEU as nltk.
    refs = [[words(r) for r in REFS[i]] for i in sorted(HYPS)]
    hyps = [words(HYPS[i]) for i in sorted(HYPS)]
    assert scores["bleu4"] == pytest.approx(nltk_corpus_bleu(refs, hyps, 4), abs=1e-6)
    assert 0 < scores["rouge_l"] < 1 and scores["cider"] > 0


def test_perfect_captions_score_top_and_unrelated_ones_zero():
    refs = {"a": ["a dog runs on the grass", "a brown dog"], "b": ["two cats sleep on a red sofa"],
            "c": ["a man rides a bike down the street", "a cyclist"]}
    perfect = caption_scores(refs, {k: v[0] for k, v in refs.items()})
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["bleu1"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] > 0.9 and perfect["cider"] > 1
    unrelated = caption_scores(refs, {"a": "purple umbrellas", "b": "seven flying pianos",
                                      "c": "quietly melting clocks everywhere"})
    for key in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert unrelated[key] == pytest.approx(0.0, abs=1e-6), key
    if perfect["meteor"] is not None:
        assert perfect["meteor"] > 0.9 and unrelated["meteor"] < 0.05


def test_caption_scores_rejects_mismatched_images_and_accepts_empty_captions(monkeypatch):
    with pytest.raises(ValueError, match="different images"):
        caption_scores({"a": ["a dog"]}, {"b": "a dog"})
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores({"a": []}, {"a": "a dog"})
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)  # no jar start needed for this check
    scores = caption_scores({"a": ["a dog"], "b": ["a cat"]}, {"a": "", "b": "a cat"})
    assert 0 < scores["bleu1"] < 1


@needs_java
def test_ptb_tokenizer_keeps_lines_aligned_and_output_quiet(capfd):
    gts, res = metrics._ptb_tokenize({1: ["A dog's running,\nfast!", ""]}, {1: "Two CATS."})
    assert gts == {1: ["a dog 's running fast", ""]} and res == {1: ["two cats"]}
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # Java's "PTBTokenizer tokenized N tokens" line is swallowed


def test_sentence_bleu4_ranks_captions_and_ignores_case_and_punctuation():
    refs = ["A dog runs on the grass.", "A brown dog is running."]
    assert sentence_bleu4(refs, "a dog runs on the grass") == pytest.approx(1.0)
    good = sentence_bleu4(refs, "a dog runs on grass")
    bad = sentence_bleu4(refs, "a cat sits on a sofa")
    assert 0 < bad < good < 1
    assert sentence_bleu4(refs, "") == 0.0 and sentence_bleu4([""], "a dog") == 0.0


def test_chrf_identical_persian_and_multi_reference():
    assert chrf(["a dog runs on the grass"], ["a dog runs on the grass"]) == pytest.approx(100.0)
    persian_ref = "پایتخت ایران تهران است."
    assert chrf([persian_ref], [persian_ref]) == pytest.approx(100.0)
    partial = chrf(["پایتخت ایران شیراز است."], [persian_ref])
    assert 20 < partial < 100
    # the best of several references counts, and hypotheses may have different numbers of references
    assert chrf(["hello world", "good day"], [["nothing alike", "hello world"], ["good day"]]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        chrf(["a", "b"], ["a"])


def test_perplexity_is_exp_and_overflow_safe():
    assert perplexity(0) == 1.0
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert perplexity(1e6) == math.inf
