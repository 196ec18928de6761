"""Batched chat generation that respects each fine-tuning method (soft prompts need the cache off, unpadded rows)."""
from __future__ import annotations

from typing import Optional

import torch

from hwtools.llm.methods import is_soft_prompt
from hwtools.llm.templates import render_chat

# end-of-turn markers of chat formats: a base model's generation config often stops only at <eos>
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>")


def _is_soft_prompt(model, method: Optional[str]) -> bool:
    """Prompt tuning, P-tuning or prefix tuning, by `method` when given, else from the PEFT config."""
    if method is not None:
        return is_soft_prompt(method)
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def generation_batches(lengths: list[int], batch_size: int, same_length: bool) -> list[list[int]]:
    """Row indices per generate() call: consecutive rows, or (same_length) only rows of equal token length together.
    PEFT's soft prompts lose the padding mask in batched generation (a 4-D mask is rebuilt as all ones), so their
    rows must not need padding."""
    if not same_length:
        return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the model's generation config and tokenizer, plus the chat format's end-of-turn token."""
    ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [tokenizer.eos_token_id] + (configured if isinstance(configured, list) else [configured]):
        if i is not None and i not in ids:
            ids.append(int(i))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab and vocab[t] not in ids]
    return ids


class _StepTicker:
    """A logits processor that only shows the decoding step of the running batch on the progress bar."""

    def __init__(self, bar, max_new_tokens: int):
        self.bar, self.max_new_tokens, self.step = bar, max_new_tokens, 0

    def __call__(self, input_ids, scores):
        self.step += 1
        self.bar.set_postfix_str(f"token {self.step}/{self.max_new_tokens}")
        return scores


@torch.no_grad()
def generate_token_ids(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    method: Optional[str] = None,
    *,
    temperature: float = 0.7,
    top_p: float = 0.9,
    progress: Optional[str] = None,
) -> list[list[int]]:
    """The new token ids for each conversation (see generate_answers), stop tokens and padding removed; `progress`
    names a progress bar counting the answers (None: no bar)."""
    from hwtools.train.phases import progress as progress_bar

    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    # with the KV cache PEFT drops a prefix, and misplaces the steps after virtual tokens (the answer drifts into noise
    # after its first token); without it every step re-reads the soft prompt exactly as in training
    soft_prompt = _is_soft_prompt(model, method)
    use_cache = not soft_prompt
    device = next(model.parameters()).device
    prompts = [render_chat(tokenizer, turns, add_generation_prompt=True) for turns in conversations]
    stop_ids = stop_token_ids(model, tokenizer)
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        use_cache=use_cache,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:  # a model's sampling defaults (e.g. Gemma's top_k/top_p) would only trigger warnings in greedy mode
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)

    # the chat template already writes <bos>; the tokenizer must not add a second one
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batches = generation_batches([len(e) for e in encoded], batch_size, same_length=soft_prompt)
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    results: list[list[int]] = [[] for _ in prompts]
    bar = progress_bar(len(prompts), progress or "", "answers", enabled=progress is not None)
    if progress is not None:  # a batch of answers takes minutes on a CPU: show its decoding step too
        gen_kwargs["logits_processor"] = [_StepTicker(bar, max_new_tokens)]
    try:
        for rows in batches:
            enc = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(device)
            if progress is not None:
                gen_kwargs["logits_processor"][0].step = 0
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kwargs)
            for i, row in zip(rows, out[:, enc["input_ids"].shape[1]:].tolist()):
                for t in row:  # everything after the first stop token is padding
                    if t in stop_ids:
                        break
                    results[i].append(t)
            bar.update(len(rows))
    finally:
        bar.close()
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results


def generate_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    method: Optional[str] = None,
    *,
    temperature: float = 0.7,
    top_p: float = 0.9,
    progress: Optional[str] = None,
) -> list[str]:
    """The model's answer to each conversation (turns ending with a user turn), greedy or sampled, in batches.

    Prompts are rendered with the chat template plus the generation prompt and left-padded. Generation stops at
    EOS or the chat format's end-of-turn token. Soft prompts (by `method`, or detected from the PEFT config)
    generate without the KV cache and batch only prompts of equal length (see generate_token_ids). `progress` names
    a progress bar counting the answers.
    """
    ids = generate_token_ids(model, tokenizer, conversations, max_new_tokens, batch_size, do_sample, method,
                             temperature=temperature, top_p=top_p, progress=progress)
    return [a.strip() for a in tokenizer.batch_decode(ids, skip_special_tokens=True)]
