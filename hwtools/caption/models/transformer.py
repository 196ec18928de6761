"""CNN-Transformer captioner: a Transformer decoder that cross-attends to image regions projected to its width."""
from __future__ import annotations

import math

import torch
from torch import nn

from hwtools.caption.vocab import PAD_ID


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed sin/cos table of Vaswani et al. (max_len, d_model)."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table


def region_positions(num_regions: int, d_model: int) -> torch.Tensor:
    """Fixed (num_regions, d_model) positions for a row-major square grid of regions: half the channels encode
    the row, half the column (DETR's 2-D sin/cos). Other counts get the 1-D table; a single pooled region none."""
    side = math.isqrt(num_regions)
    if num_regions == 1:
        return torch.zeros(1, d_model)
    if side * side != num_regions or d_model % 4:
        return sinusoidal_positions(num_regions, d_model)
    axis = sinusoidal_positions(side, d_model // 2)  # (side, d/2)
    rows = axis.repeat_interleave(side, dim=0)  # region r*side + c -> row r
    cols = axis.repeat(side, 1)  # -> column c
    return torch.cat([rows, cols], dim=1)


def causal_mask(length: int, device=None) -> torch.Tensor:
    """Boolean (T, T) mask, True above the diagonal = position i may not attend to j > i."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)


class CaptionTransformer(nn.Module):
    """Word embedding + sinusoidal positions -> nn.TransformerDecoder (causal self-attention, cross-attention to
    the image) -> linear to the vocabulary.

    Positions are sinusoidal, not learned: Flickr8k has ~30k short captions, so learned vectors for the rare long
    positions would barely train, while the fixed table costs no parameters and extends to any decoding length.
    The frozen backbone's regions (B, R, C) (or a pooled (B, C) vector, taken as one region) go through a Linear to
    d_model: the "last layer replaced by a projection to the decoder width". Each region then gets its grid position
    added: cross-attention is blind to the order of its keys, so without it "left" and "top" could only come from
    location cues the CNN features happen to carry.
    """

    feature_kind = "spatial"

    def __init__(self, vocab_size: int, encoder_dim: int, d_model: int = 256, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 1024, dropout: float = 0.1, max_len: int = 128, pad_id: int = PAD_ID):
        super().__init__()
        self.d_model = d_model
        self.feature_proj = nn.Sequential(nn.Linear(encoder_dim, d_model), nn.LayerNorm(d_model))
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        # pre-norm layers train stably without a long warmup, which matters for short CPU runs
        layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(d_model))
        self.fc = nn.Linear(d_model, vocab_size)

    def encode_memory(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:
            features = features.unsqueeze(1)
        memory = self.feature_proj(features)
        return memory + region_positions(memory.shape[1], self.d_model).to(memory)

    def _decode(self, memory: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"caption of {length} tokens is longer than max_len={self.positions.shape[0]}")
        x = self.embed(tokens) * math.sqrt(self.d_model) + self.positions[:length]
        # a <start> token is always real, so no row of the combined masks is empty (no NaN from softmax)
        out = self.decoder(self.dropout(x), memory, tgt_mask=causal_mask(length, tokens.device), tgt_is_causal=True,
                           tgt_key_padding_mask=None if token_mask is None else ~token_mask)
        return self.fc(out)

    def forward(self, features: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> dict:
        """Teacher forcing over caption_ids[:, :-1] -> logits (B, T-1, V); padded inputs are masked as keys."""
        memory = self.encode_memory(features)
        return {"logits": self._decode(memory, caption_ids[:, :-1], caption_mask[:, :-1].bool()), "alphas": None}

    def init_state(self, features: torch.Tensor) -> dict:
        """Decoding state: the projected image memory and the tokens generated so far (none yet)."""
        memory = self.encode_memory(features)
        return {"memory": memory, "tokens": memory.new_zeros((memory.shape[0], 0), dtype=torch.long)}

    def step(self, tokens: torch.Tensor, state: dict):
        """Append the previous tokens (B,) and re-run the decoder on the prefix (captions are short, so no KV
        cache); -> (logits of the next token (B, V), new state, None)."""
        prefix = torch.cat([state["tokens"], tokens.unsqueeze(1)], dim=1)
        logits = self._decode(state["memory"], prefix, None)[:, -1]
        return logits, {"memory": state["memory"], "tokens": prefix}, None
