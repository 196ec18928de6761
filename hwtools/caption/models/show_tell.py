"""Show and Tell (Vinyals et al., 2015): an LSTM language model conditioned on one pooled image vector.

Shapes: B batch, C encoder channels, E word embedding, L LSTM layers, H hidden size, V vocabulary, T caption length
(<start> and <end> included).
"""
from __future__ import annotations

import torch
from torch import nn

from hwtools.caption.vocab import PAD_ID


class ShowTell(nn.Module):
    """Embedding -> LSTM -> dropout -> linear to the vocabulary.

    The image enters either as the LSTM's initial (h, c), through one linear layer each (default), or, with
    `image_as_first_input=True`, as the paper does it: projected to the word-embedding size and fed as the input at
    step -1 from a zero state, so the image is seen once and never again.
    """

    feature_kind = "pooled"

    def __init__(self, vocab_size: int, encoder_dim: int, embed_dim: int = 256, hidden_dim: int = 512,
                 num_layers: int = 1, dropout: float = 0.5, image_as_first_input: bool = False, pad_id: int = PAD_ID):
        super().__init__()
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.image_as_first_input = image_as_first_input
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        if image_as_first_input:
            self.image_proj = nn.Linear(encoder_dim, embed_dim)
        else:
            self.init_h = nn.Linear(encoder_dim, num_layers * hidden_dim)
            self.init_c = nn.Linear(encoder_dim, num_layers * hidden_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def _initial_lstm_state(self, features: torch.Tensor):
        """(h0, c0), each (layers, B, H), and, for the paper variant, the image input step that must run first."""
        if self.image_as_first_input:
            return None, self.image_proj(features).unsqueeze(1)  # (B, 1, E)
        b = features.shape[0]
        h = self.init_h(features).view(b, self.num_layers, self.hidden_dim).transpose(0, 1).contiguous()  # (L, B, H)
        c = self.init_c(features).view(b, self.num_layers, self.hidden_dim).transpose(0, 1).contiguous()  # (L, B, H)
        return (h, c), None

    def forward(self, features: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> dict:
        """Teacher forcing: features (B, C), inputs caption_ids[:, :-1] -> logits (B, T-1, V) predicting
        caption_ids[:, 1:].

        `caption_mask` is not needed, nor is packing: the LSTM is causal, so padding after <end> cannot reach real
        positions and the loss ignores the outputs at padded steps."""
        state, image_step = self._initial_lstm_state(features)
        inputs = self.embed(caption_ids[:, :-1])  # (B, T-1, E)
        if image_step is not None:
            inputs = torch.cat([image_step, inputs], dim=1)  # (B, T, E)
        out, _ = self.lstm(inputs, state)  # (B, T-1, H), or (B, T, H) with the image step first
        if image_step is not None:
            out = out[:, 1:]  # (B, T-1, H): the output at the image step predicts nothing
        return {"logits": self.fc(self.dropout(out)), "alphas": None}

    def init_state(self, features: torch.Tensor) -> dict:
        """Decoding state before the <start> token; every tensor is batch-first so a beam can reorder it."""
        state, image_step = self._initial_lstm_state(features)
        if image_step is not None:
            _, state = self.lstm(image_step)  # (h, c) after the image step, each (L, B, H)
        h, c = state
        return {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}  # each (B, L, H)

    def step(self, tokens: torch.Tensor, state: dict):
        """One decoding step: previous tokens (B,) -> (logits (B, V), new state, attention None)."""
        h, c = state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous()  # (L, B, H) each
        out, (h, c) = self.lstm(self.embed(tokens).unsqueeze(1), (h, c))  # out (B, 1, H); input (B, 1, E)
        return self.fc(self.dropout(out[:, 0])), {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}, None
