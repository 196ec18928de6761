"""Caption generation from image features: greedy (the default) and beam search, both batched.

`model` is an ImageCaptioningModel or a bare decoder: anything with `init_state(features)` and
`step(tokens, state) -> (logits, state, alpha|None)` whose state is a dict or a NamedTuple of batch-first tensors.
Returned ids hold the generated words only (no <start>, no <end>); for the attention arch, alphas[i] is a
(len(ids[i]), R) tensor with one attention map per returned word.
"""
from __future__ import annotations

from typing import Optional

import torch

from hwtools.caption.vocab import END_ID, START_ID


def _select(state, index: torch.Tensor):
    """The state's rows at `index` (beams reordered), of the same kind: a dict or a NamedTuple."""
    if isinstance(state, dict):
        return {k: v.index_select(0, index) for k, v in state.items()}
    return type(state)(*(v.index_select(0, index) for v in state))


def _trim(seqs: torch.Tensor, alphas: Optional[torch.Tensor], end_id: int):
    """Cut each row at its first <end> (excluded); alphas follow the words they produced."""
    ids_out, alphas_out = [], [] if alphas is not None else None
    for i, row in enumerate(seqs.tolist()):
        n = row.index(end_id) if end_id in row else len(row)
        ids_out.append(row[:n])
        if alphas is not None:
            alphas_out.append(alphas[i, :n].cpu())
    return ids_out, alphas_out


class _eval_mode:
    """Dropout off while decoding; the caller's train/eval mode comes back afterwards."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def greedy_decode(model, features: torch.Tensor, max_len: int, start_id: int = START_ID, end_id: int = END_ID):
    """Most likely word at each step, for a batch of features; stops when every caption has produced <end> or after
    max_len words. -> (ids list[list[int]], alphas list[Tensor (len, R)] | None)."""
    with _eval_mode(model):
        b = features.shape[0]
        state = model.init_state(features)
        tokens = torch.full((b,), start_id, dtype=torch.long, device=features.device)
        done = torch.zeros(b, dtype=torch.bool, device=features.device)
        words, maps = [], []
        for _ in range(max_len):
            logits, state, alpha = model.step(tokens, state)
            tokens = logits.argmax(dim=-1)
            words.append(tokens)
            if alpha is not None:
                maps.append(alpha)
            done |= tokens == end_id
            if bool(done.all()):
                break
        seqs = torch.stack(words, dim=1)
        return _trim(seqs, torch.stack(maps, dim=1) if maps else None, end_id)


@torch.no_grad()
def beam_search(model, features: torch.Tensor, beam_size: int, max_len: int, start_id: int = START_ID,
                end_id: int = END_ID, length_penalty: float = 0.0):
    """Keep the `beam_size` best partial captions per image (sum of log-probabilities); a beam that emits <end>
    stays in the beam with its score frozen. At the end the best beam wins (finished or cut at max_len), scored as
    logp / length**length_penalty (0.0 = plain log-probability, as in Show and Tell; ~1.0 counters the bias towards
    short captions). Same return as greedy_decode; beam_size 1 gives exactly the greedy captions."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    with _eval_mode(model):
        b, k, device = features.shape[0], beam_size, features.device
        state = _select(model.init_state(features), torch.arange(b, device=device).repeat_interleave(k))
        tokens = torch.full((b * k,), start_id, dtype=torch.long, device=device)
        # only the first beam of each image is alive at the start, so the k beams do not all pick the same word
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, 0] = 0.0
        ended = torch.zeros(b * k, dtype=torch.bool, device=device)
        lengths = torch.zeros(b * k, device=device)
        seqs = torch.empty((b * k, 0), dtype=torch.long, device=device)
        maps = None
        for _ in range(max_len):
            logits, state, alpha = model.step(tokens, state)
            logp = torch.log_softmax(logits.float(), dim=-1)
            # an ended beam may only "emit" <end> again, at no cost: its score and its rank stay as they were
            frozen = torch.full_like(logp, float("-inf"))
            frozen[:, end_id] = 0.0
            logp = torch.where(ended.unsqueeze(1), frozen, logp)
            vocab = logp.shape[1]
            candidates = (scores.reshape(-1, 1) + logp).view(b, k * vocab)
            scores, flat = candidates.topk(k, dim=1)
            origin = (flat // vocab + torch.arange(b, device=device).unsqueeze(1) * k).reshape(-1)
            tokens = (flat % vocab).reshape(-1)
            state = _select(state, origin)
            seqs = torch.cat([seqs.index_select(0, origin), tokens.unsqueeze(1)], dim=1)
            if alpha is not None:
                step_map = alpha.index_select(0, origin).unsqueeze(1)
                maps = step_map if maps is None else torch.cat([maps.index_select(0, origin), step_map], dim=1)
            was_ended = ended.index_select(0, origin)
            lengths = lengths.index_select(0, origin) + (~was_ended).float()  # counts the <end> token itself
            ended = was_ended | (tokens == end_id)
            if bool(ended.all()):
                break
        final = scores / lengths.view(b, k).clamp(min=1.0) ** length_penalty if length_penalty else scores
        best = final.argmax(dim=1) + torch.arange(b, device=device) * k
        return _trim(seqs.index_select(0, best), None if maps is None else maps.index_select(0, best), end_id)
