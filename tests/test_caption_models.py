"""The three hand-written captioners: shapes, masks, loss, attention, causality and that each can learn a batch."""
import pytest
import torch
import torch.nn.functional as F

from hwtools.caption.models import (ImageCaptioningModel, ShowAttendTell, build_caption_model, caption_loss,
                                    encoder_output_for)
from hwtools.caption.models.transformer import region_positions
from hwtools.caption.vocab import END_ID, PAD_ID, START_ID
from hwtools.errors import UserError

V, C, R = 23, 12, 5
KNOBS = {
    "cnn-rnn": dict(embed_dim=16, hidden_dim=24, dropout=0.0),
    "cnn-rnn-first-input": dict(embed_dim=16, hidden_dim=24, dropout=0.0, image_as_first_input=True),
    "cnn-rnn-2-layers": dict(embed_dim=16, hidden_dim=24, dropout=0.0, num_layers=2),
    "attention": dict(embed_dim=16, hidden_dim=24, attention_dim=10, dropout=0.0),
    "transformer": dict(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, dropout=0.0),
}
VARIANTS = list(KNOBS)


def arch_of(variant):
    return variant.split("-first")[0].split("-2-")[0]


def make_decoder(variant, seed=0, **over):
    torch.manual_seed(seed)
    return build_caption_model(arch_of(variant), V, C, **{**KNOBS[variant], **over}).eval()


def make_features(variant, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (b, C) if encoder_output_for(arch_of(variant)) == "pooled" else (b, R, C)
    return torch.randn(shape, generator=g)


def make_batch(variant, lengths=(6, 4, 8), t=10, seed=2):
    """Captions `<start> w.. <end> <pad>..` with `lengths` words each (ids 4.. are words)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), t), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(lengths), t), dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, 0] = START_ID
        ids[i, 1:n + 1] = torch.randint(4, V, (n,), generator=g)
        ids[i, n + 1] = END_ID
        mask[i, : n + 2] = True
    return {"features": make_features(variant, len(lengths), seed), "caption_ids": ids, "caption_mask": mask,
            "image_id": [f"img{i}.jpg" for i in range(len(lengths))]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes(variant):
    batch = make_batch(variant)
    out = make_decoder(variant)(batch["features"], batch["caption_ids"], batch["caption_mask"])
    assert out["logits"].shape == (3, 9, V)
    if arch_of(variant) == "attention":
        assert out["alphas"].shape == (3, 9, R)
    else:
        assert out["alphas"] is None


def test_encoder_output_kinds_and_unknown_arch():
    assert encoder_output_for("cnn-rnn") == "pooled"
    assert encoder_output_for("attention") == "spatial"
    assert encoder_output_for("transformer") == "spatial"
    with pytest.raises(UserError, match="--arch lstm"):
        build_caption_model("lstm", V, C)


def test_attention_weights_sum_to_one_and_are_positive():
    batch = make_batch("attention")
    alphas = make_decoder("attention")(batch["features"], batch["caption_ids"], batch["caption_mask"])["alphas"]
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 9))
    assert (alphas > 0).all()
    # random weights still give non-uniform maps: the weights depend on the regions
    assert alphas.std(-1).mean() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_ignores_padding(variant):
    model = ImageCaptioningModel(None, make_decoder(variant))
    batch = make_batch(variant)
    base = caption_loss(model, batch)
    noisy = dict(batch, caption_ids=batch["caption_ids"].clone())
    pad = ~batch["caption_mask"]
    noisy["caption_ids"][pad] = torch.randint(4, V, (int(pad.sum()),))
    torch.testing.assert_close(caption_loss(model, noisy), base, rtol=0, atol=1e-6)
    longer = make_batch(variant, t=16)  # same captions, 6 more columns of padding
    assert torch.equal(longer["caption_ids"][:, :10], batch["caption_ids"])
    torch.testing.assert_close(caption_loss(model, longer), base, rtol=0, atol=1e-6)
    real = make_decoder(variant)(batch["features"], batch["caption_ids"], batch["caption_mask"])["logits"]
    other = make_decoder(variant)(noisy["features"], noisy["caption_ids"], noisy["caption_mask"])["logits"]
    keep = batch["caption_mask"][:, :-1]  # outputs at real input positions
    torch.testing.assert_close(other[keep], real[keep], rtol=0, atol=1e-6)
    # ...while a real word does change it
    changed = dict(batch, caption_ids=batch["caption_ids"].clone())
    changed["caption_ids"][0, 2] = 4 if batch["caption_ids"][0, 2] != 4 else 5
    assert abs(float(caption_loss(model, changed).detach()) - float(base.detach())) > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_is_cross_entropy_over_real_targets(variant):
    model = ImageCaptioningModel(None, make_decoder(variant, alpha_c=0.0) if variant == "attention"
                                 else make_decoder(variant))
    batch = make_batch(variant)
    logits = model(batch)["logits"]
    tgt, m = batch["caption_ids"][:, 1:], batch["caption_mask"][:, 1:]
    expected = F.cross_entropy(logits[m], tgt[m])
    loss, weight = caption_loss(model, batch, return_weight=True)
    torch.testing.assert_close(loss, expected)
    assert weight == 7 + 5 + 9  # words + <end> per caption
    assert abs(float(expected.detach()) - torch.log(torch.tensor(float(V)))) < 1.0  # untrained: about log V


def test_attention_regulariser_formula_and_padding():
    dec = ShowAttendTell(V, C, embed_dim=8, hidden_dim=8, attention_dim=8, alpha_c=0.5)
    b, t, r = 2, 6, 4
    alphas = torch.full((b, t, r), 1.0 / r)
    mask = torch.zeros(b, t + 1, dtype=torch.bool)
    mask[0, :7] = True  # 6 real target steps -> coverage 6/4 per region
    mask[1, :3] = True  # 2 real target steps -> coverage 2/4
    expected = 0.5 * (((1 - 6 / 4) ** 2) + ((1 - 2 / 4) ** 2)) / 2
    torch.testing.assert_close(dec.attention_regularizer(alphas, mask), torch.tensor(expected))
    # what the maps say at padded steps does not count
    alphas[1, 2:] = torch.tensor([1.0, 0, 0, 0])
    torch.testing.assert_close(dec.attention_regularizer(alphas, mask), torch.tensor(expected))


def test_attention_loss_includes_regulariser():
    batch = make_batch("attention")
    with_reg = ImageCaptioningModel(None, make_decoder("attention", alpha_c=1.0))
    without = ImageCaptioningModel(None, make_decoder("attention", alpha_c=0.0))
    out = with_reg(batch)
    assert float(out["aux_loss"].detach()) > 0
    torch.testing.assert_close(caption_loss(with_reg, batch), caption_loss(without, batch) + out["aux_loss"])


def test_transformer_is_causal():
    dec = make_decoder("transformer")
    batch = make_batch("transformer", lengths=(8, 8, 8))
    ids = batch["caption_ids"]
    base = dec(batch["features"], ids, batch["caption_mask"])["logits"]
    for k in (2, 5):
        changed = ids.clone()
        changed[:, k] = (changed[:, k] - 4 + 1) % (V - 4) + 4  # another word
        out = dec(batch["features"], changed, batch["caption_mask"])["logits"]
        torch.testing.assert_close(out[:, :k], base[:, :k], rtol=0, atol=1e-6)  # inputs < k predict the same
        assert (out[:, k] - base[:, k]).abs().max() > 1e-4  # the changed input itself is seen


def test_transformer_cross_attends_to_image():
    dec = make_decoder("transformer")
    batch = make_batch("transformer")
    a = dec(batch["features"], batch["caption_ids"], batch["caption_mask"])["logits"]
    b = dec(batch["features"].flip(0), batch["caption_ids"], batch["caption_mask"])["logits"]
    assert (a - b).abs().max() > 1e-3


def test_transformer_knows_where_each_region_is():
    # without region positions cross-attention is blind to region order: a swap of two regions changed nothing
    dec = make_decoder("transformer")
    batch = make_batch("transformer")
    feats = torch.randn(3, 4, C)  # a 2 x 2 grid
    swapped = feats[:, [1, 0, 2, 3]]  # top-left <-> top-right
    a = dec(feats, batch["caption_ids"], batch["caption_mask"])["logits"]
    b = dec(swapped, batch["caption_ids"], batch["caption_mask"])["logits"]
    assert (a - b).abs().max() > 1e-3
    p = region_positions(49, 16)  # 7 x 7, row-major: row half shared along a row, column half down a column
    assert torch.equal(p[7, :8], p[13, :8]) and torch.equal(p[2, 8:], p[9, 8:]) and not torch.equal(p[0], p[1])
    assert region_positions(1, 16).abs().sum() == 0  # a pooled vector has no position


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_api_matches_teacher_forcing(variant):
    dec = make_decoder(variant)
    batch = make_batch(variant, lengths=(8, 8, 8))
    ids = batch["caption_ids"]
    out = dec(batch["features"], ids, batch["caption_mask"])
    state = dec.init_state(batch["features"])
    for t in range(ids.shape[1] - 1):
        logits, state, alpha = dec.step(ids[:, t], state)
        torch.testing.assert_close(logits, out["logits"][:, t], rtol=1e-4, atol=1e-5)
        if out["alphas"] is not None:
            torch.testing.assert_close(alpha, out["alphas"][:, t], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["cnn-rnn", "cnn-rnn-first-input", "attention", "transformer"])
def test_each_arch_overfits_one_batch(variant):
    # regulariser off: with 5 regions it cannot reach 0, and the claim here is about the captioning loss
    over = {"alpha_c": 0.0} if variant == "attention" else {}
    model = ImageCaptioningModel(None, make_decoder(variant, **over)).train()
    batch = make_batch(variant, lengths=(6, 4, 8, 7))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(caption_loss(model, batch).detach())
    for _ in range(100):
        opt.zero_grad()
        loss = caption_loss(model, batch)
        loss.backward()
        opt.step()
    assert first > 2.5
    assert loss.item() < 0.05, f"{variant}: loss {loss.item():.3f} after 100 steps"


def test_model_runs_encoder_on_images_when_no_features():
    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, C)
            self.calls = 0

        def forward(self, images):
            self.calls += 1
            return self.proj(images.mean(dim=(2, 3)))

    enc = Pool()
    model = ImageCaptioningModel(enc, make_decoder("cnn-rnn"))
    batch = make_batch("cnn-rnn")
    del batch["features"]
    batch["image"] = torch.randn(3, 3, 8, 8)
    out = model(batch)
    assert enc.calls == 1 and out["logits"].shape == (3, 9, V)
    expected = model.decoder(enc(batch["image"]), batch["caption_ids"], batch["caption_mask"])["logits"]
    torch.testing.assert_close(out["logits"], expected)
    # cached fp16 features are used as given, without calling the encoder, and cast to the decoder's dtype
    batch["features"] = enc(batch["image"]).detach().half()
    calls = enc.calls
    assert model(batch)["logits"].dtype == torch.float32 and enc.calls == calls
