"""Show, Attend and Tell (Xu et al., 2015), soft attention: an LSTM cell that looks at image regions each step."""
from __future__ import annotations

import torch
from torch import nn

from hwtools.caption.vocab import PAD_ID


class AdditiveAttention(nn.Module):
    """e_i = w^T tanh(W_h h + W_a a_i); alpha = softmax_i(e); z = sum_i alpha_i a_i."""

    def __init__(self, encoder_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.W_a = nn.Linear(encoder_dim, attention_dim)
        self.W_h = nn.Linear(hidden_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, regions: torch.Tensor, projected_regions: torch.Tensor, h: torch.Tensor):
        """regions (B,R,C), their W_a projection (B,R,A) computed once per image, h (B,H) -> (z (B,C), alpha (B,R))."""
        e = self.w(torch.tanh(projected_regions + self.W_h(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(e, dim=1)
        return torch.bmm(alpha.unsqueeze(1), regions).squeeze(1), alpha


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

    def init_state(self, features: torch.Tensor) -> dict:
        """Decoding state before <start>: (h, c) from the mean region, plus the regions and their projection."""
        mean = features.mean(dim=1)
        return {"h": self.init_h(mean), "c": self.init_c(mean), "regions": features,
                "projected": self.attention.W_a(features)}

    def step(self, tokens: torch.Tensor, state: dict):
        """One step: previous tokens (B,) -> (logits (B,V), new state, alpha (B,R))."""
        h, c, regions = state["h"], state["c"], state["regions"]
        z, alpha = self.attention(regions, state["projected"], h)
        beta = torch.sigmoid(self.f_beta(h))
        h, c = self.cell(torch.cat([self.embed(tokens), beta * z], dim=1), (h, c))
        logits = self.fc(self.dropout(h))
        return logits, {"h": h, "c": c, "regions": regions, "projected": state["projected"]}, alpha

    def forward(self, features: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> dict:
        """Teacher forcing over caption_ids[:, :-1]: logits (B, T-1, V) and attention weights alphas (B, T-1, R)."""
        state = self.init_state(features)
        logits, alphas = [], []
        for t in range(caption_ids.shape[1] - 1):
            step_logits, state, alpha = self.step(caption_ids[:, t], state)
            logits.append(step_logits)
            alphas.append(alpha)
        return {"logits": torch.stack(logits, dim=1), "alphas": torch.stack(alphas, dim=1)}

    def attention_regularizer(self, alphas: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """Doubly stochastic regulariser alpha_c * mean_{b,i} (1 - sum_t alpha_ti)^2 over the real (non-pad) steps:
        pushes the model to spread attention over every region during the caption."""
        step_mask = caption_mask[:, 1:].to(alphas.dtype).unsqueeze(2)  # steps that predict a real token
        coverage = (alphas * step_mask).sum(dim=1)
        return self.alpha_c * ((1.0 - coverage) ** 2).mean()
