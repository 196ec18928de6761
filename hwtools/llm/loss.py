"""Causal-LM loss over label positions only, so vocabulary-sized logits exist for one chunk of targets at a time.

With a 262k vocabulary the logits dominate memory (4 x 256 tokens x 262144 x 4 bytes = 1 GiB, twice with their
gradient). The model is asked for its final hidden states and no logits at all (`logits_to_keep` = no position);
the hidden states of positions whose next token is a label go through the LM head here, a chunk at a time, each
chunk under activation checkpointing so that backward also holds one chunk of logits, not all of them.

Those positions come from the batch's `loss_index` (made by the collate function on the CPU), so the loss never
waits for the device: no label count, no boolean mask of device tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hwtools.errors import UserError
from hwtools.llm.data import IGNORE_INDEX, loss_index

# target rows per chunk: about 2**26 logits (256 MiB in fp32) per chunk
LOGITS_PER_CHUNK = 2**26
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _strip_wrappers(model):
    """The PEFT or plain model inside DDP / DataParallel / torch.compile wrappers. Not accelerate's
    extract_model_from_parallel: that walks every submodule looking for compiled regions on each call (~2 ms for
    Gemma-2-2B with LoRA on a CPU core), and the loss runs every micro-batch."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _peft_type(inner) -> Optional[str]:
    cfg = getattr(inner, "active_peft_config", None)
    return str(getattr(cfg.peft_type, "value", cfg.peft_type)) if cfg is not None else None


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: Optional[float]):
    weight = getattr(head, "weight", None)
    if (weight is not None and weight.is_floating_point() and hidden.dtype != weight.dtype
            and not torch.is_autocast_enabled(hidden.device.type)):
        # the head runs outside the model's forward: accelerate's mixed precision hands back fp32 hidden states
        # (an autocast loss, as the loop runs it, casts them itself); bf16 weights and fp32 states do not multiply
        hidden = hidden.to(weight.dtype)
    logits = head(hidden).float()
    if softcap:  # Gemma-2/3 final logit soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _params_sharded(model) -> bool:
    """Whether the weights exist whole only inside the model's forward (FSDP, DeepSpeed): the LM head must not be
    applied outside it. On one H200, FSDP2 broke at the step after a checkpoint when the loss did so."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, (FSDPModule, FullyShardedDataParallel)) or type(model).__name__ == "DeepSpeedEngine"


def _loss_from_model_logits(model, kwargs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The same loss from the model's own (soft-capped) logits for every position: more memory, no weight access
    outside forward."""
    logits = model(**kwargs, use_cache=False).logits
    seq_len = labels.shape[1]
    offset = logits.shape[1] - seq_len  # prompt tuning / P-tuning: virtual tokens come first
    next_labels = labels[:, 1:]
    n_tokens = int((next_labels != IGNORE_INDEX).sum())
    if n_tokens == 0:
        return logits.sum() * 0.0, 0
    shifted = logits[:, offset : offset + seq_len - 1].float()
    total = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), next_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n_tokens, n_tokens


def causal_lm_loss(model, batch: dict, chunk_size: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy over label positions, number of label tokens) for a batch with input_ids,
    labels (-100 = ignored), attention_mask (2D; absent for packed rows), position_ids (packed rows) and optional
    loss_index (hwtools.llm.data.loss_index; without it the index is made here, one host sync).

    Equals the model's own `labels=` loss. Works for plain models, PEFT LoRA-family models and soft prompts
    (prompt tuning / P-tuning prepend virtual tokens, whose positions are skipped; prefix tuning adds keys/values).
    A batch without any label gives a zero loss (still connected to the graph) and 0 tokens.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    attention_mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    inner = _strip_wrappers(model)
    peft_type = _peft_type(inner)
    soft_prompt = peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
    if soft_prompt and attention_mask is None and position_ids is not None:
        # packed rows attend per example through restarting position ids, which PEFT drops for virtual tokens;
        # the recipe pads rows for soft prompts
        raise UserError("packed batches are not supported with soft prompts; use --no-packing")
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None and peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        kwargs["position_ids"] = position_ids  # PEFT ignores them for prepended virtual tokens (with a warning)
        # collate_flattened's example boundaries for flash-attention's varlen kernel (other kernels ignore them)
        kwargs.update({k: batch[k] for k in _VARLEN_KEYS if k in batch})
    if _params_sharded(model):
        return _loss_from_model_logits(model, kwargs, labels)
    no_position = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    out = model(**kwargs, use_cache=False, output_hidden_states=-1, logits_to_keep=no_position)
    hidden = out.hidden_states[-1]  # the final, normed hidden states (transformers ties the last one to them)

    seq_len = input_ids.shape[1]
    offset = hidden.shape[1] - seq_len  # prompt tuning / P-tuning: virtual tokens come first
    index = batch.get("loss_index")
    if index is None:
        index = loss_index(labels)
    n_tokens = index.shape[0]  # a shape: known to the host without a sync
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    targets = labels.reshape(-1).index_select(0, index + 1)  # the next token, in the same row
    if offset:
        index = index + (index // seq_len + 1) * offset  # rows of hidden are offset + seq_len long
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)

    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = base.get_output_embeddings()
    text_config = base.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    # the vocabulary from the config: under PEFT's trainable-tokens wrapper `head.weight` builds a merged copy
    rows = chunk_size or max(1, LOGITS_PER_CHUNK // text_config.vocab_size)
    total = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, rows):
        h, t = selected[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled() and h.requires_grad:
            # recomputes this chunk's logits in backward instead of keeping every chunk's logits alive
            total = total + checkpoint(_chunk_loss_sum, h, t, head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, t, head, softcap)
    return total / n_tokens, n_tokens
