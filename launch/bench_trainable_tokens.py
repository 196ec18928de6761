"""Benchmark what --trainable-tokens costs per LoRA step: no token rows, PEFT's trainable-tokens forward, and
hwtools' indexed forward (hwtools.llm.methods.use_indexed_trainable_tokens), each step split into forward + loss,
backward and optimiser step.

    python launch/bench_trainable_tokens.py                       # embedded Gemma-3-270M, 8 x 256, 3 repeats
    python launch/bench_trainable_tokens.py --quick --output-dir /tmp/bench      # tiny model, smoke test

The three variants are LoRA (the recipe's defaults) on copies of the same model, trained on the same packed batch,
interleaved (the order rotates every repeat); the median of --repeats is reported. The token rows are the chat turn
markers (`--trainable-tokens chat`); with a tied embedding the LM head shares them.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from hwtools import bench
from hwtools.config import parse_config
from hwtools.errors import UserError, cli_main
from hwtools.llm.bench_models import ModelArgs, load_bench_model, load_data, prepare_examples, resolve_device
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import MethodConfig, apply_method, default_lr
from hwtools.llm.pipeline import packed_loader

VARIANTS = ("lora", "lora+tokens-peft", "lora+tokens-indexed")
QUICK_SIZES = {"hidden_size": 32, "num_layers": 2, "head_dim": 16, "vocab_size": 1024, "batch_size": 2,
               "max_length": 64, "repeats": 1, "warmup": 0, "max_train_examples": 24}


@dataclass
class BenchTokensArgs(ModelArgs):
    model: str = field(default="embedded", metadata={"help": "embedded (Gemma-3-270M) or tiny-gemma2."})
    batch_size: int = field(default=8, metadata={"help": "Packed rows per step (train_llm.py's default)."})
    repeats: int = field(default=3, metadata={"help": "Timed steps of every variant; the median is reported."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps of every variant first."})
    quick: bool = field(default=False, metadata={"help": f"Smoke test: {QUICK_SIZES}."})


def unpatched(model):
    """PEFT's own trainable-tokens forward back (drop hwtools' per-instance override)."""
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and "forward_adapters" in module.__dict__:
            del module.__dict__["forward_adapters"]
    return model


def build_variant(name: str, make_model, tokenizer):
    tokens = "none" if name == "lora" else "chat"
    model = apply_method(make_model(), MethodConfig(method="lora", trainable_tokens=tokens), tokenizer, log=None)
    if name == "lora+tokens-peft":
        model = unpatched(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=default_lr("lora"))
    return model, opt


def one_step(model, opt, batch) -> dict:
    """One optimiser step, timed by part in CPU seconds of this process (with --threads 1 the work itself, barely
    touched by other jobs on a shared machine): {"forward": s, "backward": s, "optimizer": s, "loss": float}."""
    t0 = time.process_time()
    loss, _ = causal_lm_loss(model, batch)
    t1 = time.process_time()
    loss.backward()
    t2 = time.process_time()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.process_time()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "loss": loss.item()}


def markdown_body(results: dict) -> str:
    rows = []
    base = results["variants"]["lora"]["step_cpu_s"]["median"]
    for name, r in results["variants"].items():
        med = {k: r[k]["median"] for k in ("step_s", "step_cpu_s", "forward_s", "backward_s", "optimizer_s")}
        rows.append([name, med["step_cpu_s"], med["forward_s"], med["backward_s"], med["optimizer_s"],
                     f"{100 * (med['step_cpu_s'] / base - 1):+.0f}%", med["step_s"], r["trainable"]])
    table = bench.markdown_table(["variant", "step (CPU s)", "forward + loss (CPU s)", "backward (CPU s)",
                                  "optimizer (CPU s)", "vs lora (CPU)", "step (wall s)", "trainable"], rows)
    return "\n".join([f"{results['model']}; one packed batch of {results['batch']}; LoRA r=8 on q,k,v,o.", "",
                      table, "", results["finding"]])


@cli_main
def main(argv=None) -> dict:
    started = time.time()
    args = parse_config(BenchTokensArgs, argv)
    if args.quick:
        args = BenchTokensArgs(**{**asdict(args), **QUICK_SIZES, "model": "tiny-gemma2"})
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        raise UserError("--repeats and --batch-size must be >= 1, --warmup >= 0")
    device = resolve_device(args.device, args.threads)
    if device.type != "cpu":
        raise UserError("bench_trainable_tokens.py measures the CPU step; run it without --device cuda")
    log = partial(print, flush=True)
    machine = bench.machine_info(device)
    splits, report = load_data(args)
    make_model, tokenizer, model_desc = load_bench_model(args, splits)
    _, blocks = prepare_examples(args, tokenizer, splits, report)
    batch = next(iter(packed_loader(blocks, args.batch_size, tokenizer.pad_token_id)))
    built = {name: build_variant(name, make_model, tokenizer) for name in VARIANTS}
    parts = {name: [] for name in VARIANTS}

    def fn(name):
        def step():
            parts[name].append(one_step(*built[name], batch))
        return step

    log(f"{model_desc}; batch {tuple(batch['input_ids'].shape)}; variants {', '.join(VARIANTS)}")
    runs = bench.interleaved_runs({n: fn(n) for n in VARIANTS}, args.repeats, args.warmup)
    variants = {}
    for name in VARIANTS:
        timed = parts[name][args.warmup:]
        variants[name] = {"step_s": bench.summarize([r.seconds for r in runs[name]]),
                          "step_cpu_s": bench.summarize([r.cpu_seconds for r in runs[name]]),
                          **{f"{k}_s": bench.summarize([t[k] for t in timed]) for k in ("forward", "backward",
                                                                                         "optimizer")},
                          "losses": [t["loss"] for t in parts[name]],
                          "trainable": sum(p.numel() for p in built[name][0].parameters() if p.requires_grad)}
        log(f"{name}: step {variants[name]['step_s']['median']:.2f} s wall, "
            f"{variants[name]['step_cpu_s']['median']:.2f} s CPU")
    med = {n: variants[n]["step_cpu_s"]["median"] for n in VARIANTS}
    finding = (f"PEFT's trainable tokens add {100 * (med['lora+tokens-peft'] / med['lora'] - 1):.0f}% to a LoRA "
               f"step, the indexed forward {100 * (med['lora+tokens-indexed'] / med['lora'] - 1):.0f}%. PEFT's forward "
               f"builds a full copy of the weight with the trained rows swapped in (index_copy) on every call of the "
               f"embedding and of the tied LM head (each loss chunk, twice with its checkpoint's recompute), and "
               f"backward then forms a dense weight-sized gradient: for the head a second vocabulary x hidden matmul "
               f"per chunk. The indexed forward uses the frozen weight for every row and puts the trained rows in by "
               f"index (same values and gradients: tests/test_llm_methods.py).")
    results = {"model": model_desc, "batch": list(batch["input_ids"].shape), "variants": variants,
               "finding": finding}
    md, js = bench.write_results(args.output_dir, args.name or "trainable_tokens",
                                 "LoRA step with trainable token rows: PEFT's forward vs indexed", results,
                                 markdown_body(results), settings=asdict(args), machine=machine, started_at=started)
    log(f"wrote {md} and {js}")
    return results


if __name__ == "__main__":
    main()
