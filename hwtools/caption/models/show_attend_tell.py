"""Show, Attend and Tell (Xu et al., 2015), soft attention: an LSTM cell that looks at image regions each step.

Shapes: B batch, R image regions, C encoder channels, A attention width, E word embedding, H LSTM hidden size,
V vocabulary, T caption length (<start> and <end> included).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from hwtools.caption.vocab import PAD_ID


class AttendState(NamedTuple):
    """The decoding state between two steps; every field is batch-first so a beam can reorder it."""

    h: torch.Tensor  # (B, H) the LSTM's h_{t-1}
    c: torch.Tensor  # (B, H) its cell state
    regions: torch.Tensor  # (B, R, C) the annotation vectors a_i
    projected: torch.Tensor  # (B, R, A) W_a a_i, which does not change during a caption


class AdditiveAttention(nn.Module):
    """e_i = w^T tanh(W_h h + W_a a_i); alpha = softmax_i(e); z = sum_i alpha_i a_i."""

    def __init__(self, encoder_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.W_a = nn.Linear(encoder_dim, attention_dim)
        self.W_h = nn.Linear(hidden_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """W_a a_i for regions (B,R,C) -> (B,R,A); it does not depend on h, so it is computed once per image."""
        return self.W_a(regions)

    def forward(self, regions: torch.Tensor, projected_regions: torch.Tensor, h: torch.Tensor):
        """regions (B,R,C), their project_regions (B,R,A), h (B,H) -> (z (B,C), alpha (B,R))."""
        e = self.w(torch.tanh(projected_regions + self.W_h(h).unsqueeze(1))).squeeze(2)  # (B, R)
        alpha = torch.softmax(e, dim=1)  # (B, R), sums to 1 over the regions
        z = torch.bmm(alpha.unsqueeze(1), regions).squeeze(1)  # (B, C): sum_i alpha_i a_i as one batched matmul
        return z, alpha


class ShowAttendTell(nn.Module):
    """Soft-attention captioner; input to the LSTM cell is concat(embed(x_t), beta_t * z_t).

    The LSTM cell's input size is embed_dim + encoder_dim, so the context needs no extra projection. beta_t =
    sigmoid(f_beta(h_{t-1})) is the paper's gating scalar (how much the image matters for this word). The initial
    (h, c) come from the mean region through linear layers. `alpha_c` weighs the doubly stochastic regulariser.
    """

    feature_kind = "spatial"

    def __init__(self, vocab_size: int, encoder_dim: int, embed_dim: int = 256, hidden_dim: int = 512,
                 attention_dim: int = 256, dropout: float = 0.5, alpha_c: float = 1.0, pad_id: int = PAD_ID):
        super().__init__()
        self.alpha_c = alpha_c
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.attention = AdditiveAttention(encoder_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(encoder_dim, hidden_dim)
        self.init_c = nn.Linear(encoder_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, 1)
        self.cell = nn.LSTMCell(embed_dim + encoder_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> AttendState:
        """Decoding state before <start> for regions (B,R,C): (h, c) from the mean region, the regions and their
        projection."""
        mean = features.mean(dim=1)  # (B, C)
        return AttendState(h=self.init_h(mean), c=self.init_c(mean), regions=features,
                           projected=self.attention.project_regions(features))

    def step(self, tokens: torch.Tensor, state: AttendState):
        """One step: previous tokens (B,) -> (logits (B,V), new state, alpha (B,R))."""
        z, alpha = self.attention(state.regions, state.projected, state.h)  # (B, C), (B, R)
        beta = torch.sigmoid(self.f_beta(state.h))  # (B, 1)
        x = torch.cat([self.embed(tokens), beta * z], dim=1)  # (B, E + C)
        h, c = self.cell(x, (state.h, state.c))  # (B, H) each
        logits = self.fc(self.dropout(h))  # (B, V)
        return logits, state._replace(h=h, c=c), alpha

    def forward(self, features: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> dict:
        """Teacher forcing over caption_ids[:, :-1] (B, T) for regions (B, R, C): logits (B, T-1, V) and attention
        weights alphas (B, T-1, R).

        `caption_mask` is not needed here: each step sees only earlier words, so padding after <end> cannot change a
        real step's output, and the loss and the regulariser (attention_regularizer) mask the padded steps."""
        state = self.init_state(features)
        logits, alphas = [], []
        for t in range(caption_ids.shape[1] - 1):
            step_logits, state, alpha = self.step(caption_ids[:, t], state)  # (B, V), state, (B, R)
            logits.append(step_logits)
            alphas.append(alpha)
        return {"logits": torch.stack(logits, dim=1), "alphas": torch.stack(alphas, dim=1)}

    def attention_regularizer(self, alphas: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """Doubly stochastic regulariser alpha_c * mean_{b,i} (1 - sum_t alpha_ti)^2 over the real (non-pad) steps:
        pushes the model to spread attention over every region during the caption."""
        step_mask = caption_mask[:, 1:].to(alphas.dtype).unsqueeze(2)  # (B, T-1, 1): steps that predict a real token
        coverage = (alphas * step_mask).sum(dim=1)  # (B, R): sum_t alpha_ti
        return self.alpha_c * ((1.0 - coverage) ** 2).mean()
