"""Image preprocessing for captioning, built from the encoder's own timm data config.

Captions talk about the whole frame ("a star on the left", "in the top right corner"), so unlike ImageNet
classification nothing may be cropped away or mirrored: evaluation squashes the full image to the input size, and
training adds only a mild crop (at most ~10% of each side) and a small brightness/contrast/saturation jitter that
keeps colour words true. No horizontal flip: it would make "left" and "right" lie.
"""
from __future__ import annotations

from timm.data import create_transform

# An area scale >= 0.9 keeps >= 90% of each side; the wide aspect range lets the crop follow any image shape
# (the output is squashed to the input size anyway, as in evaluation).
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (0.25, 4.0)
TRAIN_COLOR_JITTER = 0.1  # brightness, contrast, saturation; hue untouched


def build_transforms(data_config: dict, train: bool):
    """Transform PIL image -> normalised tensor for the encoder (`timm.data.resolve_model_data_config(model)`)."""
    common = dict(input_size=data_config["input_size"], interpolation=data_config.get("interpolation", "bicubic"),
                  mean=data_config["mean"], std=data_config["std"])
    if train:
        return create_transform(**common, is_training=True, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, hflip=0.0,
                                vflip=0.0, color_jitter=TRAIN_COLOR_JITTER, auto_augment=None, re_prob=0.0)
    # crop_pct 1.0 + squash: resize the whole image to the input size, losing nothing at the borders.
    return create_transform(**common, is_training=False, crop_pct=1.0, crop_mode="squash")
