"""The three captioning architectures behind one interface, the end-to-end model and the training loss.

Every decoder has `forward(features, caption_ids, caption_mask) -> {"logits": (B,T-1,V), "alphas": (B,T-1,R)|None}`
(teacher forcing: inputs caption_ids[:, :-1], targets caption_ids[:, 1:]) and the decoding API
`init_state(features) -> state` and `step(prev_tokens (B,), state) -> (logits (B,V), state, alpha (B,R)|None)`,
where the state is a dict or a NamedTuple of batch-first tensors, so beam search can reorder it with
index_select(0, ...).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hwtools.caption.models.show_attend_tell import ShowAttendTell
from hwtools.caption.models.show_tell import ShowTell
from hwtools.caption.models.transformer import CaptionTransformer
from hwtools.errors import UserError

ARCHS = {"cnn-rnn": ShowTell, "attention": ShowAttendTell, "transformer": CaptionTransformer}

__all__ = ["ARCHS", "CaptionTransformer", "ImageCaptioningModel", "ShowAttendTell", "ShowTell",
           "build_caption_model", "caption_loss", "encoder_output_for"]


def encoder_output_for(arch: str) -> str:
    """The encoder output an architecture reads: "pooled" vector (cnn-rnn) or "spatial" regions (the others)."""
    return _arch_class(arch).feature_kind


def _arch_class(arch: str):
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def build_caption_model(arch: str, vocab_size: int, encoder_dim: int, **knobs) -> nn.Module:
    """The decoder of `arch` ("cnn-rnn" | "attention" | "transformer"); knobs are its constructor's keywords."""
    return _arch_class(arch)(vocab_size=vocab_size, encoder_dim=encoder_dim, **knobs)


class ImageCaptioningModel(nn.Module):
    """Encoder + decoder end to end. A batch's precomputed `features` are used when present (feature cache), else the
    encoder runs on `image`; `encoder` may be None when every batch carries features."""

    def __init__(self, encoder: Optional[nn.Module], decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, batch: dict) -> torch.Tensor:
        """Image features for the batch, in the decoder's dtype (cached features may be stored as fp16)."""
        if batch.get("features") is not None:
            features = batch["features"]
        elif self.encoder is not None:
            features = self.encoder(batch["image"])
        else:
            raise ValueError("batch has no 'features' and the model has no encoder to compute them from 'image'")
        return features.to(self.decoder.fc.weight.dtype)

    def forward(self, batch: dict) -> dict:
        """Teacher-forced {"logits", "alphas", "aux_loss"}; aux_loss is the attention regulariser (0 without one)."""
        caption_ids, caption_mask = batch["caption_ids"], batch["caption_mask"].bool()
        out = dict(self.decoder(self.encode(batch), caption_ids, caption_mask))
        regularizer = getattr(self.decoder, "attention_regularizer", None)
        if regularizer is not None and out.get("alphas") is not None:
            out["aux_loss"] = regularizer(out["alphas"], caption_mask)
        else:
            out["aux_loss"] = out["logits"].new_zeros(())
        return out

    # decoding API, so decode.py can take either this model or a bare decoder
    def init_state(self, features: torch.Tensor):
        return self.decoder.init_state(features.to(self.decoder.fc.weight.dtype))

    def step(self, tokens: torch.Tensor, state):
        return self.decoder.step(tokens, state)


def caption_loss(model: nn.Module, batch: dict, return_weight: bool = False):
    """Cross-entropy over real target tokens (caption_mask[:, 1:]; <pad> never counts) plus the attention
    regulariser; with return_weight, (loss, number of target tokens) for token-weighted evaluation."""
    # captions come padded to --max-len; columns where every caption is padding change nothing but cost time
    longest = int(batch["caption_mask"].sum(dim=1).max())
    batch = {**batch, "caption_ids": batch["caption_ids"][:, :longest],
             "caption_mask": batch["caption_mask"][:, :longest]}
    out = model(batch)
    logits = out["logits"]
    targets = batch["caption_ids"][:, 1:]
    target_mask = batch["caption_mask"][:, 1:].bool()
    # ignore by mask, not by pad id, so whatever sits in padded positions cannot leak into the loss
    targets = targets.masked_fill(~target_mask, -100)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
    loss = ce + out["aux_loss"]
    if return_weight:
        return loss, float(target_mask.sum())
    return loss
