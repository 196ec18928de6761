import json

import pytest
import torch

from hwtools.caption.vocab import (END_ID, PAD_ID, SPECIALS, START_ID, UNK_ID, Vocab, clean_caption, coverage,
                                   word_counts)
from hwtools.errors import UserError

CAPTIONS = [
    "A black dog is running after a white dog in the snow .",
    "Black dog chasing brown dog through snow",
    "Two dogs chase each other across the snowy ground .",
    "A girl's T-shirt , 3 dogs & a CAT !!",
    "A dog runs .",
]


def test_specials_have_fixed_ids():
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    v = Vocab.build(CAPTIONS, min_freq=1)
    assert v.itos[:4] == list(SPECIALS) == ["<pad>", "<start>", "<end>", "<unk>"]
    assert [v.stoi[s] for s in SPECIALS] == [0, 1, 2, 3]


def test_clean_caption_strips_punctuation_symbols_and_digits():
    assert clean_caption("A girl's T-shirt , 3 dogs & a CAT !!") == ["a", "girls", "tshirt", "dogs", "a", "cat"]
    # Flickr8k's own tokenisation ("girl 's") leaves a one-letter token that must go too.
    assert clean_caption("A girl 's dog ( 2nd ) at 10:30 , 3d .") == ["a", "girl", "dog", "at"]
    assert clean_caption('"Café" crème-brûlée ...') == ["cafe", "cremebrulee"]
    assert clean_caption("  \t ") == []
    for c in CAPTIONS:  # cleaning is idempotent: references cleaned once are stable under encode's cleaning
        once = " ".join(clean_caption(c))
        assert clean_caption(once) == once.split()


def test_build_counts_min_freq_and_order():
    v = Vocab.build(CAPTIONS, min_freq=2)
    counts = word_counts(CAPTIONS)
    assert counts["dog"] == 5 and counts["a"] == 5 and counts["snow"] == 2
    # most frequent first, ties alphabetical, only words seen >= 2 times
    assert v.itos[4:] == ["a", "dog", "black", "dogs", "snow", "the"]
    assert len(v) == 10
    assert "cat" not in v.stoi
    cov = coverage(counts, 2)
    assert cov["types_kept"] == 6 and cov["types"] == len(counts)
    assert cov["token_coverage"] == pytest.approx(sum(counts[w] for w in v.itos[4:]) / sum(counts.values()))
    with pytest.raises(UserError):
        Vocab.build(CAPTIONS, min_freq=0)


def test_encode_pads_masks_and_round_trips():
    v = Vocab.build(CAPTIONS, min_freq=1)
    ids, mask = v.encode("A black dog is running !", max_len=10)
    assert len(ids) == len(mask) == 10
    words = ["a", "black", "dog", "is", "running"]
    assert ids == [START_ID] + [v.stoi[w] for w in words] + [END_ID] + [PAD_ID] * 3
    assert mask == [True] * 7 + [False] * 3
    assert v.decode(ids) == "a black dog is running"
    # decode works on tensors and stops at <end> even if junk follows
    assert v.decode(torch.tensor(ids[:7] + [v.stoi["cat"]] * 3)) == "a black dog is running"
    for c in CAPTIONS:
        ids, _ = v.encode(c, max_len=30)
        assert v.decode(ids) == " ".join(clean_caption(c))


def test_encode_unknown_words_and_truncation_keeps_end():
    v = Vocab.build(CAPTIONS, min_freq=2)
    ids, mask = v.encode("a zebra dog", max_len=6)
    assert ids == [START_ID, v.stoi["a"], UNK_ID, v.stoi["dog"], END_ID, PAD_ID]
    assert v.decode(ids) == "a dog"
    assert v.decode(ids, keep_unk=True) == "a <unk> dog"
    ids, mask = v.encode("a dog a dog a dog a dog", max_len=5)
    assert ids == [START_ID, v.stoi["a"], v.stoi["dog"], v.stoi["a"], END_ID]
    assert all(mask)
    ids, mask = v.encode("", max_len=4)
    assert ids == [START_ID, END_ID, PAD_ID, PAD_ID] and mask == [True, True, False, False]
    with pytest.raises(UserError):
        v.encode("a dog", max_len=1)
    assert v.decode([999, v.stoi["dog"]]) == "dog"  # ids beyond the vocabulary read as <unk>


def test_json_round_trip(tmp_path):
    v = Vocab.build(CAPTIONS, min_freq=2)
    path = v.save(tmp_path / "final")
    assert path == tmp_path / "final" / "vocab.json"
    data = json.loads(path.read_text())
    assert data["itos"] == v.itos and data["min_freq"] == 2
    for src in (path, tmp_path / "final"):
        w = Vocab.load(src)
        assert w == v and w.stoi == v.stoi and w.min_freq == 2
        assert w.encode(CAPTIONS[0], 12) == v.encode(CAPTIONS[0], 12)


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Vocab.load(tmp_path / "nope.json")
    bad = tmp_path / "vocab.json"
    bad.write_text('{"itos": ["dog", "<pad>"]}')
    with pytest.raises(UserError, match="vocab.json"):
        Vocab.load(bad)
    bad.write_text("{not json")
    with pytest.raises(UserError, match="vocab.json"):
        Vocab.load(bad)
