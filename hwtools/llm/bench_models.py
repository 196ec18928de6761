"""The model and data every LLM benchmark (launch/bench_*.py) measures: the flags that choose them, a factory of fresh
copies of the same weights (a tiny random Gemma-2 or the embedded Gemma-3-270M), the recipe's data splits and its
tokenised, packed examples, and the device."""
from __future__ import annotations

import copy
import gc
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from hwtools import bench
from hwtools.config import EMBEDDED, default_cache_dir
from hwtools.data_report import DataReport
from hwtools.errors import UserError
from hwtools.llm import data as llm_data
from hwtools.llm import pipeline
from hwtools.llm.models import load_model_and_tokenizer
from hwtools.llm.tiny import tiny_config, train_bpe_tokenizer
from hwtools.train.meters import count_parameters

TINY = "tiny-gemma2"


@dataclass
class ModelArgs:
    """The benchmarked model and data (every LLM benchmark's flags)."""

    model: str = field(default=TINY, metadata={
        "help": f"{TINY} (random Gemma-2 built from a config, with a BPE tokenizer trained on the data) or "
                f"embedded (Gemma-3-270M, its own tokenizer)."})
    hidden_size: int = field(default=256, metadata={"help": f"{TINY}: hidden size."})
    num_layers: int = field(default=6, metadata={"help": f"{TINY}: decoder layers."})
    head_dim: int = field(default=64, metadata={
        "help": f"{TINY}: attention head size; hidden / head_dim query heads, half as many KV heads."})
    vocab_size: int = field(default=16384, metadata={
        "help": f"{TINY}: embedding / LM-head rows (>= the tokenizer's vocabulary; the rest are unused ids, as in "
                f"real models' padded vocabularies)."})
    data: str = field(default="embedded", metadata={"help": "embedded or a SlimOrca-schema file (see train_llm.py)."})
    max_length: int = field(default=256, metadata={"help": "Max tokens per example and packed block length."})
    max_train_examples: int = field(default=0, metadata={"help": "Use at most N training conversations (0: all)."})
    seed: int = field(default=42, metadata={"help": "Seed of the weights, LoRA init, data order and split."})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={
        "help": "Where the embedded model is converted (shared with train_llm.py)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda."})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0: torch's default). On a CPU shared with other jobs, 1 avoids OpenMP threads "
                "spinning while they wait for a core (measured here: 2 threads ran a step 5-8x slower than 1)."})
    output_dir: str = field(default="results/bench", metadata={"help": "Where the .md and .json results go."})
    name: Optional[str] = field(default=None, metadata={
        "help": "Base name of the result files (default: by benchmark and device, e.g. llm, llm_cuda)."})
    notes: list[str] = field(default_factory=list, metadata={"help": "Free-text notes written into the results."})


def load_bench_model(args: ModelArgs, splits: dict):
    """(model factory, tokenizer, description): the factory returns a fresh fp32 copy of the same weights on CPU.
    The embedded model is reloaded from its converted cache each time: never two copies of it in memory."""
    from transformers import AutoModelForCausalLM

    if args.model == EMBEDDED:
        model, tokenizer = load_model_and_tokenizer(EMBEDDED, args.cache_dir)
        del model  # only the tokenizer is kept; every run loads its own copy
        gc.collect()

        def fresh():
            return load_model_and_tokenizer(EMBEDDED, args.cache_dir)[0]

        return fresh, tokenizer, "embedded Gemma-3-270M (its GGUF weights, de-quantised to fp32)"
    if args.model != TINY:
        raise UserError(f"--model {args.model}: choose {TINY} or {EMBEDDED}")
    texts = [t["content"] for split in splits.values() for conv in split for t in conv]
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
    if len(tokenizer) > args.vocab_size:
        raise UserError(f"--vocab-size {args.vocab_size}: smaller than the tokenizer ({len(tokenizer)} tokens)")
    torch.manual_seed(args.seed)
    # Gemma-2-2B's ratios at a small width, its soft-capping and alternating sliding-window layers
    config = tiny_config("gemma2", args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                         head_dim=args.head_dim, sliding_window=4096, max_position_embeddings=8192)
    config._attn_implementation = "eager"  # soft-capping needs it
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    params = count_parameters(base)["total"]
    desc = (f"random Gemma-2 from a config: hidden {args.hidden_size}, {args.num_layers} layers, "
            f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV) x {config.head_dim}, "
            f"MLP {config.intermediate_size}, vocab {args.vocab_size} ({params / 1e6:.1f}M parameters); "
            f"BPE tokenizer of {len(tokenizer)} tokens trained on the data")
    return (lambda: copy.deepcopy(base)), tokenizer, desc


def load_data(args: ModelArgs) -> tuple[dict, DataReport]:
    """The recipe's splits of --data (conversations), train cut to --max-train-examples."""
    report = DataReport()
    return pipeline.load_splits(args.data, report, seed=args.seed, max_train_examples=args.max_train_examples), report


def prepare_examples(args: ModelArgs, tokenizer, splits, report) -> tuple[list[dict], list[dict]]:
    """(tokenised train examples, packed blocks in a seeded order), as train_llm.py builds them."""
    examples = llm_data.tokenize_all(tokenizer, splits["train"], args.max_length, report)
    blocks = llm_data.pack_examples(examples, args.max_length)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return examples, [blocks[i] for i in order]


def resolve_device(name: str, threads: int = 0) -> torch.device:
    """The torch device of --device (and --threads applied); a CPU run on a GPU machine keeps accelerate on the CPU."""
    bench.set_threads(threads)
    device = bench.resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cpu" and torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"  # make_accelerator would otherwise pick the GPU
    return device
