"""The pieces of an LLM fine-tuning run, from its settings: data splits and loaders, the base and tuned evaluations,
and the files the run ends with. train_llm.py assembles them; bench_llm.py and the tests build the same loaders.

The twin of hwtools.caption.pipeline.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

from torch.utils.data import DataLoader

from hwtools.data_report import DataReport
from hwtools.llm import data as llm_data
from hwtools.llm.evaluate import answer_prompts, chrf_on_conversations, shards_weights, write_generations
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import explicit_trainable_tokens, is_soft_prompt, save_finetuned
from hwtools.llm.models import is_flash_attention
from hwtools.metrics import perplexity
from hwtools.train.run_end import evaluate_test_loss, write_run_end

# ------------------------------------------------------------------------------------------------------- data


def load_splits(data: str, report: DataReport, val_frac: float = 0.05, test_frac: float = 0.05, seed: int = 42,
                max_train_examples: int = 0) -> dict[str, list]:
    """train/validation/test conversations of `data`, train cut to its first `max_train_examples` (0: all)."""
    splits = llm_data.load_splits(data, report, val_frac, test_frac, seed)
    if max_train_examples > 0:
        splits["train"] = splits["train"][:max_train_examples]
    return splits


def packing_used(cfg, log=print) -> bool:
    """--packing, except for soft prompts: they are prepended per sequence, so in a packed block only the first
    example would see them."""
    packing = cfg.packing and not is_soft_prompt(cfg.method)
    if cfg.packing and not packing and log is not None:
        log(f"{cfg.method}: packing turned off (virtual tokens belong to one example per sequence)")
    return packing


def count_tokens(batch) -> int:
    """Non-padding tokens in a batch (throughput unit): num_tokens of our collators, else the attention mask's sum
    (Trainer's collators)."""
    return int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())


def tokenize_splits(tokenizer, splits, report, max_length: int, accelerator=None) -> dict:
    """{split: tokenised examples}, tokenised once by the main process and sent to the others."""
    def tokenize():
        # one report for every split: rows_used counted them all at loading, so their tokenising skips count too
        return {s: llm_data.tokenize_all(tokenizer, convs, max_length, report) for s, convs in splits.items()}

    if accelerator is None or accelerator.num_processes == 1:
        return tokenize()
    from accelerate.utils import broadcast_object_list

    box = [tokenize() if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def packed_loader(blocks, batch_size: int, pad_id: int, shuffle: bool = False, flattened: bool = False) -> DataLoader:
    """Packed blocks in batches; `flattened`: each batch one row (flash-attention's varlen path)."""
    collate = llm_data.collate_flattened if flattened else llm_data.collate_packed
    return DataLoader(blocks, batch_size=batch_size, shuffle=shuffle, collate_fn=partial(collate, pad_id=pad_id))


def padded_loader(examples, batch_size: int, pad_id: int, seed: Optional[int] = None) -> DataLoader:
    """One example per row, padded; with a `seed`, length-grouped batches in a seeded order (training), else in
    order."""
    collate = partial(llm_data.collate_padded, pad_id=pad_id)
    if seed is None:
        return DataLoader(examples, batch_size=batch_size, collate_fn=collate)
    sampler = llm_data.length_grouped_sampler(examples, batch_size, seed)
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collate)


def build_loaders(tokenizer, splits, report, *, max_length: int, batch_size: int, seed: int, packing: bool,
                  attn_implementation: Optional[str] = None, accelerator=None) -> dict[str, DataLoader]:
    """Tokenise with assistant-only labels; pack into blocks of max_length (train shuffled) or pad one example per
    row (train length-grouped) into DataLoaders. Under flash-attention a packed batch is one flattened row (its
    varlen path needs a batch of one row)."""
    pad_id = tokenizer.pad_token_id
    flattened = is_flash_attention(attn_implementation)
    loaders = {}
    for split, examples in tokenize_splits(tokenizer, splits, report, max_length, accelerator).items():
        if packing:
            loaders[split] = packed_loader(llm_data.pack_examples(examples, max_length), batch_size, pad_id,
                                           shuffle=split == "train", flattened=flattened)
        else:
            loaders[split] = padded_loader(examples, batch_size, pad_id, seed if split == "train" else None)
    return loaders


# --------------------------------------------------------------------------------------------------- evaluation


def _gen(cfg, method, progress: Optional[str], accelerator, together: bool = False) -> dict:
    shown = accelerator.is_local_main_process  # progress bars on one process only
    return {"max_new_tokens": cfg.gen_max_new_tokens, "batch_size": cfg.gen_batch_size, "method": method,
            "progress": progress if shown else None, "together": together}


def evaluate_base(accelerator, model, tokenizer, cfg, prompts: list[dict], test_convs: list, test_loader):
    """The base model's answers to the test prompts, chrF on test conversations and test loss (test_loader
    prepared) -> (answers, test block of summary.json)."""
    # every process answers its share of the prompts with its own (not yet sharded) copy of the base model
    before = answer_prompts(model, tokenizer, prompts, _gen(cfg, None, "base answers", accelerator), accelerator)
    chrf = chrf_on_conversations(model, tokenizer, test_convs, cfg.chrf_samples,
                                 _gen(cfg, None, "base chrF answers", accelerator), accelerator)
    loss = evaluate_test_loss(accelerator, model, test_loader, causal_lm_loss, "base test loss")
    accelerator.print(f"base model: test loss {_fmt(loss)}, chrF {_fmt(chrf['chrf'])}")
    return before, {"base_loss": loss, "base_perplexity": _ppl(loss), "base_chrf": chrf["chrf"]}


def evaluate_tuned(accelerator, model, tokenizer, cfg, prompts: list[dict], test_convs: list, test_loader):
    """The fine-tuned model's test loss, chrF and answers -> (answers, test scores)."""
    loss = evaluate_test_loss(accelerator, model, test_loader, causal_lm_loss, "test loss")
    # sharded weights (FSDP, ZeRO-3) take every rank in each forward pass: all answer everything together
    together = shards_weights(accelerator)
    tuned = chrf_on_conversations(model, tokenizer, test_convs, cfg.chrf_samples,
                                  _gen(cfg, cfg.method, "chrF answers", accelerator, together), accelerator)
    after = answer_prompts(model, tokenizer, prompts, _gen(cfg, cfg.method, "answers", accelerator, together),
                           accelerator)
    return after, {"loss": loss, "perplexity": _ppl(loss), "chrf": tuned["chrf"], "chrf_samples": tuned["n"]}


def gathered_state_dict(accelerator, prepared_model):
    """The full state dict of a model whose weights are sharded (FSDP, ZeRO-3), gathered by accelerate on every rank
    (a collective) for the main process to save; None otherwise (each rank holds whole weights)."""
    if prepared_model is None or not shards_weights(accelerator):
        return None
    return accelerator.get_state_dict(prepared_model)


# ------------------------------------------------------------------------------------------------------ outputs


def write_outputs(run_dir: Path, tracker, cfg, model, tokenizer, result, phases, *, prompts, before, after, test,
                  params: dict, report: DataReport, tokens, state_dict=None) -> dict:
    """Main process only: final/ (a finished run), the before/after answers, loss.png and summary.json."""
    if result.stopped_reason is None:
        save_finetuned(model, tokenizer, run_dir / "final", cfg, state_dict=state_dict)
    write_generations(run_dir, prompts, before, after)
    tracker.log_table("generations", ["id", "prompt", "reference", "before", "after"],
                      [[p["id"], p["turns"][-1]["content"], p["reference"], b, a]
                       for p, b, a in zip(prompts, before, after or [None] * len(prompts))])
    return write_run_end(run_dir, tracker, result, phases, test, f"{cfg.method} on {cfg.model}", task="llm",
                         method=cfg.method, arch=None, model=cfg.model, data=cfg.data, params=params,
                         data_report=report.as_dict(), trainable_tokens=tokens_label(cfg, tokens),
                         trainable_tokens_reason=tokens.reason)


def tokens_label(cfg, tokens) -> Optional[str]:
    """summary.json's trainable_tokens: the explicit --trainable-tokens value, or what auto chose (None: no rows)."""
    if explicit_trainable_tokens(cfg.trainable_tokens):
        return cfg.trainable_tokens.strip()
    return ",".join(tokens.tokens) or None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _ppl(loss):
    return None if loss is None else perplexity(loss)
