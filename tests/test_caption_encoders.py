"""timm encoders (embedded ImageNet weights, local weights, freezing) and the on-disk feature cache."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from hwtools.caption.encoders import build_encoder, load_embedded_classifier
from hwtools.caption.features import encode_images, feature_cache_key, load_or_build_feature_cache
from hwtools.caption.models import ImageCaptioningModel, build_caption_model
from hwtools.data_report import DataReport
from hwtools.errors import UserError


@pytest.fixture(scope="module")
def embedded_spatial():
    return build_encoder("embedded", output="spatial", log=None)


def eval_transform(data_config):
    return timm.data.create_transform(**data_config)


def test_embedded_classifier_top1_on_real_photos():
    model = load_embedded_classifier().eval()
    transform = eval_transform(timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        probs = model(torch.stack([transform(Image.fromarray(data.coffee())),
                                   transform(Image.fromarray(data.chelsea()))])).softmax(-1)
    assert int(probs[0].argmax()) == 967  # espresso
    assert float(probs[0, 967]) > 0.8
    assert 281 <= int(probs[1].argmax()) <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian cat


def test_pooled_encoder_is_the_classifier_input(embedded_spatial, capsys):
    """The pooled vector feeds the ImageNet head to the same logits, and it is the mean of the spatial regions."""
    module, data_config, out_dim = build_encoder("embedded", output="pooled")
    assert "pooled output (1, 1280)" in capsys.readouterr().out
    assert out_dim == 1280 and data_config["mean"] == (0.5, 0.5, 0.5) and data_config["input_size"] == (3, 224, 224)
    full = load_embedded_classifier().eval()
    x = eval_transform(data_config)(Image.fromarray(data.coffee())).unsqueeze(0)
    with torch.no_grad():
        pooled = module(x)
        regions = embedded_spatial.module(x)
        torch.testing.assert_close(full.get_classifier()(pooled), full(x), rtol=1e-4, atol=1e-4)
    assert pooled.shape == (1, 1280) and regions.shape == (1, 49, 1280)
    torch.testing.assert_close(regions.mean(1), pooled, rtol=1e-4, atol=1e-5)


def test_frozen_encoder_stays_in_eval_mode(embedded_spatial):
    enc = embedded_spatial.module
    assert enc.frozen and enc.weights_id.startswith("embedded:")
    model = ImageCaptioningModel(enc, build_caption_model("attention", 10, 1280, embed_dim=8, hidden_dim=8,
                                                          attention_dim=8)).train()
    assert model.decoder.training and not enc.training and not enc.backbone.bn2.training
    stats = enc.backbone.bn2.running_mean.clone()
    model(
        {"image": torch.randn(2, 3, 64, 64), "caption_ids": torch.tensor([[1, 5, 2], [1, 6, 2]]),
         "caption_mask": torch.ones(2, 3, dtype=torch.bool)}
    )["logits"].sum().backward()
    assert torch.equal(stats, enc.backbone.bn2.running_mean)  # BatchNorm statistics did not move
    assert all(p.grad is None for p in enc.parameters())


def test_finetune_last_blocks_only():
    module, _, _ = build_encoder("embedded", output="pooled", finetune_blocks=1, log=None)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in module.backbone.named_parameters()
                 if p.requires_grad and n.startswith("blocks.")}
    assert trainable == {"blocks.6"}
    assert module.backbone.conv_head.weight.requires_grad  # the head conv belongs to the last block
    assert not module.backbone.conv_stem.weight.requires_grad
    assert not module.backbone.blocks[5][0].conv_pw.weight.requires_grad
    module.train()
    assert module.backbone.bn2.training and not module.backbone.blocks[5][0].bn1.training
    with pytest.raises(UserError, match="has 7 blocks"):
        build_encoder("embedded", finetune_blocks=8, log=None)


def test_weights_file_loads_into_timm_model(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18").eval()  # a full classifier, as a user's checkpoint would be
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    module, _, out_dim = build_encoder("resnet18", output="spatial", weights_path=str(path), log=None)
    assert out_dim == 512 and module.weights_id.startswith("file:")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), source.forward_features(x).flatten(2).transpose(1, 2))
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit timm 'resnet18'"):
        build_encoder("resnet18", weights_path=str(tmp_path / "other.pth"), log=None)
    with pytest.raises(UserError, match="file not found"):
        build_encoder("resnet18", weights_path=str(tmp_path / "missing.pth"), log=None)


def test_bad_encoder_requests_are_one_line_user_errors():
    with pytest.raises(UserError, match="pass --encoder-weights PATH"):
        build_encoder("resnet18", pretrained=True, log=None)  # the hub is offline here
    with pytest.raises(UserError, match="not a timm model name"):
        build_encoder("resnet_does_not_exist", log=None)
    with pytest.raises(UserError, match="already has ImageNet weights"):
        build_encoder("embedded", pretrained=True, log=None)


def write_images(folder, n_real=3):
    paths = []
    for name, img in [("coffee", data.coffee()), ("chelsea", data.chelsea()), ("astronaut", data.astronaut())][:n_real]:
        p = folder / f"{name}.jpg"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    noise = np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    p = folder / "noise.png"
    Image.fromarray(noise).save(p)
    return paths + [str(p)]


class CountingEncoder(torch.nn.Module):
    """Wraps an encoder and counts the images it encodes; raises when told the cache must answer alone."""

    def __init__(self, inner, forbid=False):
        super().__init__()
        self.inner, self.forbid, self.images = inner, forbid, 0

    def forward(self, x):
        if self.forbid:
            raise AssertionError("the encoder ran although the cache holds every image")
        self.images += x.shape[0]
        return self.inner(x)


def test_cached_features_equal_live_features(tmp_path, embedded_spatial):
    module, data_config, _ = embedded_spatial
    transform = eval_transform(data_config)
    paths = write_images(tmp_path)
    key = ("tf_efficientnet_lite0", module.weights_id, "spatial", repr(transform))
    counting = CountingEncoder(module)
    built = load_or_build_feature_cache(tmp_path / "cache", key, counting, paths, transform, batch_size=3, log=None)
    assert counting.images == 4
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [f"features-{feature_cache_key(*key)}.pt"]  # no temp file left behind
    reread = load_or_build_feature_cache(tmp_path / "cache", key, CountingEncoder(module, forbid=True), paths,
                                         transform, log=None)
    assert list(reread) == paths
    for p in paths:
        with torch.no_grad():  # live: one image at a time, float32
            live = module(transform(Image.open(p).convert("RGB")).unsqueeze(0))[0]
        assert reread[p].dtype == torch.float16 and reread[p].shape == (49, 1280)
        assert torch.equal(reread[p], built[p])
        # fp16 storage: relative error <= 2**-11 per value, so 1e-3 relative (+1e-3 absolute near zero) holds
        torch.testing.assert_close(reread[p].float(), live, rtol=1e-3, atol=1e-3)
    assert not torch.equal(reread[paths[0]], reread[paths[1]])


def test_cache_tops_up_new_images_and_keys_on_transform(tmp_path, embedded_spatial):
    module, data_config, _ = embedded_spatial
    transform = eval_transform(data_config)
    paths = write_images(tmp_path, n_real=1)
    key = ("tf_efficientnet_lite0", module.weights_id, "spatial", repr(transform))
    load_or_build_feature_cache(tmp_path / "c", key, module, paths[:1], transform, log=None)
    counting = CountingEncoder(module)
    got = load_or_build_feature_cache(tmp_path / "c", key, counting, paths, transform, log=None)
    assert counting.images == 1 and set(got) == set(paths)  # only the new image was encoded
    other = timm.data.create_transform(**{**data_config, "crop_pct": 1.0})
    assert feature_cache_key(*key) != feature_cache_key(*key[:3], repr(other))


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    enc = CountingEncoder(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4)))
    transform = timm.data.create_transform(input_size=(3, 16, 16))
    good = write_images(tmp_path, n_real=0)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    report = DataReport()
    out = encode_images(enc, [*good, str(bad), str(tmp_path / "gone.jpg")], transform, batch_size=2, report=report,
                        device=torch.device("cpu"))
    assert list(out) == good and out[good[0]].shape == (4,)
    assert report.rows_skipped == 2 and all(r.startswith("unreadable image") for r in report.skipped_by_reason)


def test_out_dim_matches_the_output_for_a_conv_head_model():
    """MobileNetV3 pools to its conv head's width (1024), not num_features (288): the decoder is sized from out_dim."""
    for output in ("pooled", "spatial"):
        enc = build_encoder("mobilenetv3_small_050", output=output, log=lambda *a: None)
        with torch.no_grad():
            y = enc.module(torch.randn(1, 3, 96, 96))
        assert y.shape[-1] == enc.out_dim
