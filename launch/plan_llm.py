"""Plan fine-tuning memory before downloading anything: every method on the real architecture, built on the meta device.

    python launch/plan_llm.py --model gemma-2-2b
    python launch/plan_llm.py --model llama-3.2-3b --batch-size 4 --seq-len 1024 --gradient-checkpointing
    python launch/plan_llm.py --model embedded --dtype fp32 --device cpu --output results/plan_embedded.md

Prints, per method with its default knobs (or the ones given, e.g. --lora-r 16): exact trainable and total
parameters, and the estimated training memory by component, with and without gradient checkpointing. The model
behind the estimate is described in hwtools/llm/plan.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hwtools.config import default_cache_dir, parse_config
from hwtools.errors import UserError, cli_main
from hwtools.llm.methods import METHODS, MethodConfig, explicit_trainable_tokens
from hwtools.llm.plan import DTYPES, default_attention, plan_methods, plan_table, resolve_config


@dataclass
class PlanLLMConfig(MethodConfig):
    """Flags of plan_llm.py: the model and step shape, plus every method knob of train_llm.py."""

    method: str = field(default="all", metadata={"help": f"all, or comma-separated methods of: {', '.join(METHODS)}."})
    model: str = field(default="gemma-2-2b", metadata={
        "help": "gemma-2-2b, llama-3.2-3b, embedded (Gemma-3-270M), a hub id in the local HF cache, or a local dir."})
    batch_size: int = field(default=1, metadata={"help": "Micro-batch size."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per row."})
    dtype: str = field(default="bf16", metadata={"help": f"Weights and activations: {', '.join(DTYPES)}."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Mark the checkpointed total as the one that applies (both are always printed)."})
    attention: Optional[str] = field(default=None, metadata={
        "help": "eager or sdpa (default: what hwtools uses, eager for Gemma-2, else sdpa)."})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu (dropout masks and AdamW differ)."})
    output: Optional[str] = field(default=None, metadata={"help": "Also write the table to this markdown file."})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={
        "help": "Where the converted embedded model lives (its config is read from there when present)."})


def chosen_methods(text: str) -> list[str]:
    """`all` or a comma-separated list -> method names (UserError for an unknown one)."""
    if text.strip() == "all":
        return list(METHODS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise UserError(
            f"--method {text}: unknown method(s) {', '.join(unknown)}; choose all or some of {', '.join(METHODS)}"
        )
    return names


@cli_main
def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # PEFT imports bitsandbytes, whose CPU kernel notice means nothing here: the planner never runs a 4-bit layer
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    cfg = parse_config(PlanLLMConfig, argv)
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype}: choose one of {', '.join(DTYPES)}")
    if cfg.attention not in (None, "eager", "sdpa"):
        raise UserError(f"--attention {cfg.attention}: choose eager or sdpa")
    # resolving token names needs the tokenizer, which the planner never loads (auto plans no token rows)
    if explicit_trainable_tokens(cfg.trainable_tokens):
        raise UserError("--trainable-tokens is not planned: it adds (tokens x hidden size) parameters to LoRA, "
                        "e.g. 2 x 2,304 for Gemma-2-2B's turn markers, a negligible amount of memory")
    methods = chosen_methods(cfg.method)
    config = resolve_config(cfg.model, cfg.cache_dir)
    attention = cfg.attention or default_attention(config)
    plans = plan_methods(config, cfg, methods, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         dtype=DTYPES[cfg.dtype], attention=attention, device=cfg.device)
    settings = (
        f"{config.architectures[0] if getattr(config, 'architectures', None) else config.model_type}; batch "
        f"{cfg.batch_size} x {cfg.seq_len} tokens, {cfg.dtype}, {attention} attention, {cfg.device}; LoRA r="
        f"{cfg.lora_r} on {cfg.target_modules}; {cfg.num_virtual_tokens} virtual tokens; partial: first "
        f"{cfg.unfreeze_first} + last {cfg.unfreeze_last} layers."
    )
    table = plan_table(plans, title=f"Training memory plan: {cfg.model}", settings=settings,
                       gradient_checkpointing=cfg.gradient_checkpointing)
    print(table)
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table, encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
