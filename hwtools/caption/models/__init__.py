"""The three captioning architectures behind one interface, the end-to-end model and the training loss.

Every decoder has `forward(features, caption_ids, caption_mask) -> {"logits": (B,T-1,V), "alphas": (B,T-1,R)|None}`
(teacher forcing: inputs caption_ids[:, :-1], targets caption_ids[:, 1:]) and the decoding API
`init_state(features) -> state` and `step(prev_tokens (B,), state) -> (logits (B,V), state, alpha (B,R)|None)`,
where the state is a dict or a NamedTuple of batch-first tensors, so beam search can reorder it with
index_select(0, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hwtools.caption.models.show_attend_tell import ShowAttendTell
from hwtools.caption.models.show_tell import ShowTell
from hwtools.caption.models.transformer import CaptionTransformer
from hwtools.errors import UserError


@dataclass(frozen=True)
class Arch:
    """A captioning architecture: its decoder class, the config fields its constructor's keywords come from
    (keyword -> field), and the training defaults that differ by architecture (for config fields left None)."""

    decoder: type
    knobs: dict
    defaults: dict


_LSTM_KNOBS = {"embed_dim": "embed_dim", "hidden_dim": "hidden_dim", "dropout": "dropout"}
# The one table of architectures. Defaults: the LSTMs use the heavy dropout of Show and Tell, the Transformer the
# usual 0.1. The rate is the same for all three: on the embedded set over 5 epochs the pre-norm Transformer reached
# BLEU-4 0.41 at 1e-3 against 0.35 at 3e-4 (it underfit).
ARCHS = {
    "cnn-rnn": Arch(ShowTell, {**_LSTM_KNOBS, "num_layers": "num_layers",
                               "image_as_first_input": "image_as_first_input"},
                    {"lr": 1e-3, "dropout": 0.5, "num_layers": 1}),
    "attention": Arch(ShowAttendTell, {**_LSTM_KNOBS, "attention_dim": "attention_dim", "alpha_c": "alpha_c"},
                      {"lr": 1e-3, "dropout": 0.5}),  # one LSTM cell: no num_layers
    "transformer": Arch(CaptionTransformer, {"d_model": "d_model", "nhead": "heads", "num_layers": "num_layers",
                                             "dim_feedforward": "ff_dim", "dropout": "dropout"},
                        {"lr": 1e-3, "dropout": 0.1, "num_layers": 2}),
}

__all__ = ["ARCHS", "Arch", "CaptionTransformer", "ImageCaptioningModel", "ShowAttendTell", "ShowTell", "arch_spec",
           "build_caption_model", "caption_loss", "encoder_output_for"]


def arch_spec(arch: str) -> Arch:
    """The ARCHS entry of `arch`; an unknown name is a UserError listing the choices."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def encoder_output_for(arch: str) -> str:
    """The encoder output an architecture reads: "pooled" vector (cnn-rnn) or "spatial" regions (the others)."""
    return arch_spec(arch).decoder.feature_kind


def build_caption_model(arch: str, vocab_size: int, encoder_dim: int, **knobs) -> nn.Module:
    """The decoder of `arch` ("cnn-rnn" | "attention" | "transformer"); knobs are its constructor's keywords."""
    return arch_spec(arch).decoder(vocab_size=vocab_size, encoder_dim=encoder_dim, **knobs)


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
