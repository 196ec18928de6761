"""Benchmark a LoRA training step on the CPU in fp32, under bf16 autocast (fp32 weights) and with bf16 weights,
and check that the bf16 loss curves follow fp32's.

    python launch/bench_cpu_dtype.py                          # embedded Gemma-3-270M, 8 x 256, 6 steps
    python launch/bench_cpu_dtype.py --model gemma-3-270m     # the same architecture, random weights (no GGUF needed)
    python launch/bench_cpu_dtype.py --quick --output-dir /tmp/bench      # tiny model, smoke test

The three variants start from the same weights and the same LoRA init, train on the same packed batches, and take
their steps interleaved (step s of every variant, in an order rotating with s), so a slow spell of a shared machine
hits all of them. Step time is the median over the steps after the first; the loss curves are compared step by step.
LoRA's adapters stay fp32 in every variant (PEFT upcasts adapters over bf16 weights), as train_llm.py trains them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from hwtools import bench
from hwtools.config import parse_config
from hwtools.device import cpu_flags, cpu_has_bf16
from hwtools.errors import UserError, cli_main
from hwtools.llm.bench_models import ModelArgs, load_bench_model, load_data, prepare_examples
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import MethodConfig, apply_method, default_lr
from hwtools.llm.pipeline import packed_loader
from hwtools.llm.tiny import train_bpe_tokenizer

VARIANTS = ("fp32", "bf16-autocast", "bf16-weights")
LOSS_TOLERANCE = 0.02  # largest relative gap to fp32's loss at any step for a bf16 variant to count as matching
QUICK_SIZES = {"model": "tiny-gemma2", "hidden_size": 32, "num_layers": 2, "head_dim": 16, "vocab_size": 1024,
               "batch_size": 2, "max_length": 64, "steps": 2, "max_train_examples": 24}


@dataclass
class BenchDtypeArgs(ModelArgs):
    model: str = field(default="embedded", metadata={
        "help": "embedded (Gemma-3-270M), gemma-3-270m (its architecture, random weights, a BPE tokenizer trained "
                "on the data) or tiny-gemma2."})
    batch_size: int = field(default=8, metadata={"help": "Packed rows per step (train_llm.py's default)."})
    steps: int = field(default=6, metadata={"help": "Optimiser steps per variant (the first is not timed)."})
    quick: bool = field(default=False, metadata={"help": f"Smoke test: {QUICK_SIZES}."})


def model_factory(args: BenchDtypeArgs, splits):
    """(fresh(dtype) -> model, tokenizer, description)."""
    if args.model == "gemma-3-270m":
        from transformers import AutoModelForCausalLM

        from hwtools.llm.known_configs import known_config

        texts = [t["content"] for split in splits.values() for conv in split for t in conv]
        tokenizer = train_bpe_tokenizer(texts, 32768)  # the model keeps its 262,144 embedding rows
        config = known_config("gemma-3-270m")
        torch.manual_seed(args.seed)
        state = AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()

        def fresh(dtype):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.load_state_dict(state)
            return model

        return fresh, tokenizer, "Gemma-3-270M architecture, random weights"
    make, tokenizer, desc = load_bench_model(args, splits)
    return (lambda dtype: make().to(dtype)), tokenizer, desc


def build_variant(name: str, fresh, tokenizer, seed: int):
    torch.manual_seed(seed)  # the same LoRA init in every variant
    weights = torch.bfloat16 if name == "bf16-weights" else torch.float32
    model = apply_method(fresh(weights), MethodConfig(method="lora", trainable_tokens="none"), tokenizer, log=None)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=default_lr("lora"))
    return {"model": model, "opt": opt, "autocast": name == "bf16-autocast",
            "trainable_dtypes": sorted({str(p.dtype) for p in trainable})}


def one_step(v: dict, batch) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one optimiser step. With --threads 1 the CPU seconds are
    the work itself, barely touched by other jobs on a shared machine."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if v["autocast"] else contextlib.nullcontext()
    start, cpu_start = time.perf_counter(), time.process_time()
    with ctx:
        loss, _ = causal_lm_loss(v["model"], batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in v["model"].parameters() if p.requires_grad], 1.0)
    v["opt"].step()
    v["opt"].zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu_start, loss.item()


def markdown_body(results: dict) -> str:
    rows = []
    base = results["variants"]["fp32"]["step_cpu_s"]["median"]
    for name, r in results["variants"].items():
        rows.append([name, r["step_cpu_s"]["median"], r["step_s"]["median"], f"{base / r['step_cpu_s']['median']:.2f}x",
                     f"{100 * r['max_rel_loss_gap']:.2f}%", " ".join(f"{x:.4f}" for x in r["losses"]),
                     ", ".join(r["trainable_dtypes"])])
    table = bench.markdown_table(["variant", "step (CPU s)", "step (wall s)", "speed vs fp32 (CPU)", "max loss gap",
                                  "losses", "trainable"], rows)
    return "\n".join([f"{results['model']}; {results['steps']} LoRA steps of {results['batch']} packed tokens; "
                      f"CPU bf16 instructions: {results['cpu_bf16']} (flags: {results['bf16_flags'] or 'none'}).",
                      "", table, "", results["finding"]])


@cli_main
def main(argv=None) -> dict:
    started = time.time()
    args = parse_config(BenchDtypeArgs, argv)
    if args.quick:
        args = BenchDtypeArgs(**{**asdict(args), **QUICK_SIZES})
    if args.steps < 2 or args.batch_size < 1:
        raise UserError("--steps must be >= 2 (the first is not timed) and --batch-size >= 1")
    bench.set_threads(args.threads)
    log = partial(print, flush=True)
    machine = bench.machine_info(torch.device("cpu"))
    splits, report = load_data(args)
    fresh, tokenizer, model_desc = model_factory(args, splits)
    _, blocks = prepare_examples(args, tokenizer, splits, report)
    batches = list(packed_loader(blocks, args.batch_size, tokenizer.pad_token_id))
    if len(batches) < args.steps:
        batches = (batches * args.steps)[: args.steps]
    built = {name: build_variant(name, fresh, tokenizer, args.seed) for name in VARIANTS}
    times = {n: [] for n in VARIANTS}
    cpu_times = {n: [] for n in VARIANTS}
    losses = {n: [] for n in VARIANTS}
    log(f"{model_desc}; batch {tuple(batches[0]['input_ids'].shape)}; {args.steps} steps; torch threads "
        f"{torch.get_num_threads()}; bf16 CPU: {cpu_has_bf16()}")
    for s in range(args.steps):
        for name in bench.order_for_repeat(VARIANTS, s):
            seconds, cpu_seconds, loss = one_step(built[name], batches[s])
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
            losses[name].append(loss)
        log(f"step {s + 1}: " + ", ".join(f"{n} {cpu_times[n][-1]:.2f} CPU s loss {losses[n][-1]:.4f}"
                                          for n in VARIANTS))
    variants = {}
    for name in VARIANTS:
        gap = max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses["fp32"]))
        variants[name] = {"step_s": bench.summarize(times[name][1:]),
                          "step_cpu_s": bench.summarize(cpu_times[name][1:]), "losses": losses[name],
                          "max_rel_loss_gap": gap, "matches_fp32": gap <= LOSS_TOLERANCE,
                          "trainable_dtypes": built[name]["trainable_dtypes"]}
    med = {n: variants[n]["step_cpu_s"]["median"] for n in VARIANTS}
    best = min(VARIANTS, key=lambda n: med[n] if variants[n]["matches_fp32"] else float("inf"))
    finding = (f"Fastest variant whose loss stays within {100 * LOSS_TOLERANCE:.0f}% of fp32's at every step: {best} "
               f"({med['fp32'] / med[best]:.2f}x fp32's speed). bf16 autocast "
               f"{med['fp32'] / med['bf16-autocast']:.2f}x, bf16 weights {med['fp32'] / med['bf16-weights']:.2f}x "
               f"fp32's speed (CPU time) on this CPU "
               f"({'with' if cpu_has_bf16() else 'without'} AVX512-BF16/AMX).")
    flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx") or f == "avx512f")
    results = {"model": model_desc, "batch": list(batches[0]["input_ids"].shape), "steps": args.steps,
               "cpu_bf16": cpu_has_bf16(), "bf16_flags": flags, "tolerance": LOSS_TOLERANCE,
               "variants": variants, "fastest_matching": best, "finding": finding}
    md, js = bench.write_results(args.output_dir, args.name or "cpu_dtype", "LoRA step on the CPU: fp32 vs bf16",
                                 results, markdown_body(results), settings=asdict(args), notes=args.notes,
                                 machine=machine, started_at=started)
    log(finding)
    log(f"wrote {md} and {js}")
    return results


if __name__ == "__main__":
    main()
