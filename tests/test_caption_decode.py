"""Greedy and beam-search decoding: stopping at <end>, beam 1 == greedy, beam beats greedy where it should."""
import math

import pytest
import torch

from hwtools.caption.decode import beam_search, greedy_decode
from hwtools.caption.models import ImageCaptioningModel, build_caption_model, caption_loss, encoder_output_for
from hwtools.caption.vocab import END_ID, START_ID

V, C, R = 30, 12, 6
KNOBS = {
    "cnn-rnn": dict(embed_dim=16, hidden_dim=24, dropout=0.3),
    "attention": dict(embed_dim=16, hidden_dim=24, attention_dim=10, dropout=0.3),
    "transformer": dict(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, dropout=0.3),
}


LENGTHS = (2, 5, 3, 7)


def make_features(arch, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, C) if encoder_output_for(arch) == "pooled" else (b, R, C), generator=g) * 2


def make_captions(seed=2):
    """`<start> w.. <end> <pad>..` with LENGTHS words (ids 4.. are words) and the words alone."""
    g = torch.Generator().manual_seed(seed)
    words = [torch.randint(4, V, (n,), generator=g).tolist() for n in LENGTHS]
    t = max(LENGTHS) + 2
    ids = torch.zeros((len(words), t), dtype=torch.long)
    mask = torch.zeros((len(words), t), dtype=torch.bool)
    for i, w in enumerate(words):
        ids[i, : len(w) + 2] = torch.tensor([START_ID, *w, END_ID])
        mask[i, : len(w) + 2] = True
    return ids, mask, words


@pytest.fixture(scope="module", params=list(KNOBS))
def trained(request):
    """(arch, model, features, words): a model fitted to four captions of different lengths (so greedy output
    has known, varied lengths), left in train mode with dropout on."""
    arch = request.param
    torch.manual_seed(0)
    model = ImageCaptioningModel(None, build_caption_model(arch, V, C, **KNOBS[arch])).train()
    ids, mask, words = make_captions()
    batch = {"features": make_features(arch), "caption_ids": ids, "caption_mask": mask}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        caption_loss(model, batch).backward()
        opt.step()
    return arch, model, batch["features"], words


class ScriptedLM(torch.nn.Module):
    """A fake decoder whose next-token distribution depends on the previous token only (given as a table)."""

    def __init__(self, table: dict, vocab=8):
        super().__init__()
        self.logp = torch.full((vocab, vocab), -30.0)
        for prev, dist in table.items():
            for tok, p in dist.items():
                self.logp[prev, tok] = math.log(p)
        self.steps = 0

    def init_state(self, features):
        return {"dummy": features}

    def step(self, tokens, state):
        self.steps += 1
        return self.logp[tokens], state, None


def test_greedy_reproduces_fitted_captions(trained):
    arch, model, feats, words = trained
    ids, alphas = greedy_decode(model, feats, max_len=12)
    assert ids == words  # stops at <end>, which is not returned; lengths differ per image
    assert model.training, "decoding restores the caller's mode"
    if arch == "attention":
        assert [a.shape for a in alphas] == [(len(w), R) for w in words]
        for a in alphas:
            torch.testing.assert_close(a.sum(-1), torch.ones(len(a)))
    else:
        assert alphas is None


def test_beam_one_equals_greedy(trained):
    arch, model, feats, _ = trained
    for f in (feats, make_features(arch, b=5, seed=7)):  # fitted images, and unseen ones
        ids_g, al_g = greedy_decode(model, f, max_len=12)
        ids_b, al_b = beam_search(model, f, beam_size=1, max_len=12)
        assert ids_g == ids_b
        if arch == "attention":
            for a, b in zip(al_g, al_b):
                torch.testing.assert_close(a, b)
        else:
            assert al_b is None


def test_greedy_follows_argmax_of_teacher_forced_logits(trained):
    arch, model, _, _ = trained
    feats = make_features(arch, b=3, seed=7)
    ids, _ = greedy_decode(model, feats, max_len=12)
    model.eval()
    for i, words in enumerate(ids):
        seq = torch.tensor([[START_ID, *words, END_ID]])
        batch = {"features": feats[i:i + 1], "caption_ids": seq, "caption_mask": torch.ones_like(seq, dtype=torch.bool)}
        with torch.no_grad():
            pred = model(batch)["logits"].argmax(-1)[0].tolist()
        assert pred[: len(words)] == words
        if len(words) < 12:
            assert pred[len(words)] == END_ID
    model.train()


def test_beam_is_batched_per_image(trained):
    arch, model, _, _ = trained
    feats = make_features(arch, b=3, seed=7)
    together, maps = beam_search(model, feats, beam_size=3, max_len=10)
    for i in range(3):
        alone, alone_maps = beam_search(model, feats[i:i + 1], beam_size=3, max_len=10)
        assert alone == [together[i]]
        if arch == "attention":
            torch.testing.assert_close(alone_maps[0], maps[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(maps[i].sum(-1), torch.ones(len(together[i])))


def test_stops_at_end_and_at_max_len():
    # row 0 starts with token 4 -> 5 -> <end>; token 6 loops on itself forever
    lm = ScriptedLM({START_ID: {4: 0.6, 6: 0.4}, 4: {5: 0.9, END_ID: 0.1}, 5: {END_ID: 1.0}, 6: {6: 1.0},
                     END_ID: {END_ID: 1.0}})
    ids, alphas = greedy_decode(lm, torch.zeros(1, 1), max_len=10)
    assert ids == [[4, 5]] and alphas is None
    assert lm.steps == 3, "decoding stops as soon as every caption has ended"
    lm.logp[START_ID, 6] = math.log(0.7)
    lm.logp[START_ID, 4] = math.log(0.3)
    assert greedy_decode(lm, torch.zeros(1, 1), max_len=5)[0] == [[6] * 5]
    assert beam_search(lm, torch.zeros(1, 1), beam_size=2, max_len=5)[0] == [[6] * 5]


def test_beam_finds_the_more_likely_caption():
    # greedy takes 4 (0.6) but every continuation of 4 is unlikely; 5 (0.4) then <end> (0.99) is more likely overall
    spread = {t: 0.2 for t in (3, 4, 5, 6, 7)}
    lm = ScriptedLM({START_ID: {4: 0.6, 5: 0.4}, 4: spread, 3: {END_ID: 1.0}, 5: {END_ID: 0.99, 3: 0.01},
                     6: {END_ID: 1.0}, 7: {END_ID: 1.0}, END_ID: {END_ID: 1.0}})
    feats = torch.zeros(2, 1)
    greedy, _ = greedy_decode(lm, feats, max_len=6)
    beam, _ = beam_search(lm, feats, beam_size=2, max_len=6)
    assert greedy[0][0] == 4 and beam == [[5], [5]]


def test_length_penalty_prefers_longer_caption():
    # "<end>" at once: p 0.5 over 1 token; "4 5 <end>": p 0.5 * 0.6 * 1.0 = 0.3 over 3 tokens
    lm = ScriptedLM({START_ID: {END_ID: 0.5, 4: 0.5}, 4: {5: 0.6, END_ID: 0.4}, 5: {END_ID: 1.0},
                     END_ID: {END_ID: 1.0}})
    feats = torch.zeros(1, 1)
    assert beam_search(lm, feats, beam_size=3, max_len=6)[0] == [[]]  # log 0.5 > log 0.3
    assert beam_search(lm, feats, beam_size=3, max_len=6, length_penalty=1.0)[0] == [[4, 5]]  # log .5/1 < log .3/3
