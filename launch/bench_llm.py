"""Benchmark LLM fine-tuning: our loop with and without packing against transformers.Trainer + PEFT, and the
loop's own overhead against a bare forward/backward/step loop; on a GPU also Gemma-2-2B's real size.

    python launch/bench_llm.py                          # tiny random Gemma-2, 20 steps x 8 x 256, 3 repeats
    python launch/bench_llm.py --model embedded --batch-size 4 --steps 5     # the embedded Gemma-3-270M
    python launch/bench_llm.py --device cuda            # GPU: bf16 autocast, memory from max_memory_allocated
    python launch/bench_llm.py --real-size              # GPU: Gemma-2-2B architecture, random weights, 1 x 512
    python launch/bench_llm.py --quick --output-dir /tmp/bench                # smoke test, measures nothing

Every variant trains the same model (same seed, same LoRA config), on the same data (the embedded Persian sample,
tokenised with assistant-only labels), with the same batch size, steps, sequence length, learning-rate schedule and
clipping:

    loop-packed     hwtools' loop, examples packed into blocks of --max-length (the recipe's default)
    loop-padded     hwtools' loop, one example per row, length-grouped batches, padded (the recipe's --no-packing)
    trainer-padded  transformers.Trainer + PEFT with dynamic padding (DataCollatorForSeq2Seq), its defaults
    trainer-grouped the same with train_sampling_strategy=group_by_length (transformers 5's name for
                    group_by_length: batches of similar lengths, as loop-padded)
    trl-packed      TRL's SFTTrainer (pip install hwtools[bench]): packing=True (best-fit decreasing, padding-free
                    rows with position ids restarting per example), the same assistant-only labels, its own loss
    bare-packed     a bare forward + backward + clip + AdamW step loop over loop-packed's batches (overhead base)

Every variant's trained model is then scored on the same held-out tokens (the first validation conversations),
so no speed is bought with different masking or truncation; trl-packed reports the examples its packing cut.

The variants run interleaved in one process (the order rotates every repeat) and the median of --repeats is kept.
Throughput counts non-padding tokens; the timed window of every variant is its training loop (first batch to last
step), not model building or the loop's final checkpoint. Peak memory: torch.cuda.max_memory_allocated on a GPU; on
a CPU the rise of the resident set size in a fresh process that trains only that variant (an in-process figure
would mix the variants).
"""
from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from hwtools import bench
from hwtools.config import LoopConfig, parse_config
from hwtools.data_report import DataReport
from hwtools.device import bf16_supported, enable_tf32
from hwtools.errors import UserError, cli_main
from hwtools.llm import data as llm_data
from hwtools.llm.bench_models import ModelArgs, load_bench_model, load_data, prepare_examples, resolve_device
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import MethodConfig, apply_method, default_lr, needs_4bit
from hwtools.llm.models import load_model_and_tokenizer, weights_dtype
from hwtools.llm.pipeline import count_tokens, packed_loader, padded_loader
from hwtools.llm.tiny import train_bpe_tokenizer
from hwtools.train.accelerate_state import reset_accelerate
from hwtools.train.loop import build_optimizer, build_scheduler, make_accelerator, train
from hwtools.train.meters import count_parameters
from hwtools.train.tracking import Tracker

VARIANTS = ("loop-packed", "loop-padded", "trainer-padded", "trainer-grouped", "trl-packed", "bare-packed")
REFERENCE = "trainer-padded"
PACKED_TARGET = 1.5  # loop-packed tokens/s over trainer-padded
TRL_TARGET = 1.3  # loop-packed tokens/s over trl-packed
HELDOUT_EXAMPLES = 32
OVERHEAD_TARGET = 0.05  # loop-packed time over bare-packed time, minus 1
REAL_SIZE_METHODS = ("lora", "qlora", "prefix-tuning", "partial")
QUICK_SIZES = {"hidden_size": 32, "num_layers": 2, "head_dim": 16, "vocab_size": 1024, "batch_size": 2, "steps": 2,
               "max_length": 128, "repeats": 1, "warmup": 0, "memory": False, "max_train_examples": 48}


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def default_variants() -> list[str]:
    """Every variant; trl-packed only where trl is installed (an optional extra)."""
    return [v for v in VARIANTS if v != "trl-packed" or trl_available()]


@dataclass
class BenchLLMArgs(ModelArgs):
    variants: list[str] = field(default_factory=default_variants, metadata={
        "help": f"Variants to run (space separated): {' '.join(VARIANTS)} (default: all; trl-packed needs trl)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per micro-batch (packed blocks or examples)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    steps: int = field(default=20, metadata={"help": "Optimiser steps per timed run."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (cosine after a 5 percent warmup)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "LoRA target modules."})
    log_every: int = field(default=10, metadata={"help": "Loss logging interval of the loop and of Trainer."})
    repeats: int = field(default=3, metadata={"help": "Timed repeats of every variant; the median is reported."})
    warmup: int = field(default=1, metadata={"help": "Untimed runs of every variant before the repeats."})
    memory: bool = field(default=True, metadata={
        "help": "CPU: measure each variant's peak RSS rise in a fresh process (--no-memory to skip)."})
    real_size: bool = field(default=False, metadata={
        "help": "Instead: Gemma-2-2B's architecture, random weights, one step set per method at 1 x 512 (GPU)."})
    real_size_methods: list[str] = field(default_factory=lambda: list(REAL_SIZE_METHODS), metadata={
        "help": "Methods of the --real-size check."})
    real_size_length: int = field(default=512, metadata={"help": "--real-size: tokens per sequence (batch 1)."})
    real_size_steps: int = field(default=3, metadata={"help": "--real-size: optimiser steps per method."})
    allow_cpu_real_size: bool = field(default=False, metadata={
        "help": "Run --real-size on a CPU anyway (needs ~50 GB of RAM and hours)."})
    quick: bool = field(default=False, metadata={"help": f"Smoke test: {QUICK_SIZES}."})
    probe: Optional[str] = field(default=None, metadata={
        "help": "Internal: train only this variant once and write its memory figures to --probe-out."})
    probe_out: Optional[str] = field(default=None, metadata={"help": "Internal: the --probe result file."})


# ---------------------------------------------------------------------------------------------------- held out


def heldout_batches(args: BenchLLMArgs, tokenizer, splits) -> list[dict]:
    """The fixed held-out tokens every trained variant is scored on: the first validation conversations."""
    convs = (splits.get("validation") or splits.get("test") or [])[:HELDOUT_EXAMPLES]
    examples = llm_data.tokenize_all(tokenizer, convs, args.max_length, DataReport())
    return list(padded_loader(examples, 8, tokenizer.pad_token_id))


@torch.no_grad()
def heldout_loss(model, batches: list[dict], device) -> Optional[float]:
    """Mean next-token loss over the held-out label tokens (fp32, eval mode)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total = count = 0.0
    for batch in batches:
        loss, n = causal_lm_loss(model, send_to_device(batch, device))
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count if count else None


# ------------------------------------------------------------------------------------------------------ runs


def method_config(args: BenchLLMArgs, method: str = "lora") -> MethodConfig:
    # no token rows: the Trainer + PEFT variant trains the same LoRA adapters and nothing else
    return MethodConfig(method=method, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=args.target_modules, trainable_tokens="none")


def warmup_steps(steps: int) -> int:
    return int(round(0.05 * steps))


def loop_config(args: BenchLLMArgs, run_dir: Path, bf16: bool, *, steps: Optional[int] = None,
                batch_size: Optional[int] = None, lr: Optional[float] = None) -> LoopConfig:
    """The loop's config for a benchmark run: no evaluation, one checkpoint at the end (outside the timed window)."""
    steps = steps or args.steps
    return LoopConfig(output_dir=str(run_dir), overwrite=True, max_steps=steps, batch_size=batch_size or args.batch_size,
                      grad_accum=args.grad_accum, lr=lr or args.lr, lr_schedule="cosine", warmup_ratio=0.0,
                      warmup_steps=warmup_steps(steps), max_grad_norm=1.0, log_every=args.log_every,
                      eval_every=0, save_every=10**9, seed=args.seed, report_to="none",
                      mixed_precision="bf16" if bf16 else "no", cpu_threads=torch.get_num_threads())


def trainable_model(make_model: Callable, args: BenchLLMArgs, device: torch.device, method: str = "lora",
                    tokenizer=None):
    """A fresh base model with the method applied (same seed -> same LoRA init), on `device`."""
    from accelerate.utils import set_seed

    model = make_model()
    set_seed(args.seed)
    model = apply_method(model, method_config(args, method), tokenizer, log=None)
    return model if getattr(model, "is_loaded_in_4bit", False) else model.to(device)


def run_loop(args: BenchLLMArgs, make_model, loader: DataLoader, device, bf16: bool, heldout=()) -> dict:
    """hwtools' loop (make_accelerator + train) for args.steps."""
    reset_accelerate()
    counts: list[int] = []
    window, timing = bench.Window(device), {}
    last = args.steps * args.grad_accum

    def loss_fn(model, batch):
        window.start()
        return causal_lm_loss(model, batch)

    def count(batch):  # the loop calls it after each micro-batch's backward (and optimiser step)
        counts.append(count_tokens(batch))
        if len(counts) == last:
            timing.update(window.stop())
        return counts[-1]

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        cfg = loop_config(args, Path(tmp), bf16)
        accelerator = make_accelerator(cfg)
        model = trainable_model(make_model, args, device)
        bench.reset_peak_memory(device)
        tracker = Tracker(accelerator, Path(tmp), cfg, {})
        result = train(accelerator, model, loader, loss_fn, cfg, Path(tmp), tracker, count_fn=count,
                       throughput_unit="tokens/s")
    return {**timing, "tokens": sum(counts), "micro_batches": len(counts), "steps": result.steps,
            "final_loss": result.final_loss, "peak_cuda_mb": bench.peak_cuda_memory_mb(device),
            "heldout_loss": heldout_loss(result.model, heldout, device)}


def run_bare(args: BenchLLMArgs, make_model, loader: DataLoader, device, bf16: bool, heldout=()) -> dict:
    """The least a loop must do on the same batches: forward, backward, clip, AdamW step, LR schedule step."""
    from accelerate.utils import convert_outputs_to_fp32

    reset_accelerate()
    cfg = loop_config(args, Path("."), bf16)
    model = trainable_model(make_model, args, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if bf16:  # what accelerate's prepare does for mixed precision: autocast the forward, fp32 outputs
        model.forward = convert_outputs_to_fp32(torch.autocast(device.type, dtype=torch.bfloat16)(model.forward))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    bench.reset_peak_memory(device)
    model.train()
    tokens, micro, window = 0, 0, bench.Window(device)
    batches = iter(loader)
    batch = next(batches)
    for _ in range(cfg.max_steps):
        for _ in range(cfg.grad_accum):
            if batch is None:
                batches = iter(loader)
                batch = next(batches)
            window.start()
            tokens += count_tokens(batch)
            micro += 1
            batch = send_to_device(batch, device, non_blocking=True)
            with autocast:  # as the loop runs the loss (its LM head is outside the model's forward)
                loss, _ = causal_lm_loss(model, batch)
            (loss / cfg.grad_accum).backward()
            batch = next(batches, None)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    timing = window.stop()
    return {**timing, "tokens": tokens, "micro_batches": micro, "steps": cfg.max_steps,
            "final_loss": loss.detach().item(), "peak_cuda_mb": bench.peak_cuda_memory_mb(device),
            "heldout_loss": heldout_loss(model, heldout, device)}


def step_clock(window: bench.Window, timing: dict):
    """A Trainer callback that opens the timed window at a step's start and closes it into `timing` after the last
    step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            window.start()

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == state.max_steps:
                timing.update(window.stop())

    return Clock()


def trainer_arguments(args: BenchLLMArgs, output_dir: str, device, bf16: bool) -> dict:
    """TrainingArguments / SFTConfig fields both Trainer variants share: the loop's steps, schedule, clipping and
    seed, no saving or evaluation."""
    return dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
                lr_scheduler_type="cosine", warmup_steps=warmup_steps(args.steps), weight_decay=0.0, max_grad_norm=1.0,
                logging_steps=args.log_every, save_strategy="no", eval_strategy="no", report_to="none",
                seed=args.seed, data_seed=args.seed, use_cpu=device.type == "cpu", bf16=bf16)


def trainer_result(args: BenchLLMArgs, trainer, out, timing: dict, counts: list[int], model, heldout, device) -> dict:
    """A Trainer variant's figures; tokens of the micro-batches it trained on (prefetched extras cut off)."""
    used = args.steps * args.grad_accum
    return {**timing, "tokens": sum(counts[:used]), "micro_batches": used, "steps": trainer.state.global_step,
            "final_loss": out.training_loss, "peak_cuda_mb": bench.peak_cuda_memory_mb(device),
            "heldout_loss": heldout_loss(model, heldout, device)}


def run_trainer(args: BenchLLMArgs, make_model, examples: list[dict], tokenizer, device, bf16: bool, heldout=(),
                group_by_length: bool = False) -> dict:
    """The reference: transformers.Trainer on the PEFT model, DataCollatorForSeq2Seq dynamic padding (labels
    padded with -100: the same assistant-only labels), Trainer's defaults otherwise (random order, fused AdamW);
    `group_by_length`: Trainer's length-grouped sampler (train_sampling_strategy="group_by_length")."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    reset_accelerate()
    model = trainable_model(make_model, args, device)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=llm_data.IGNORE_INDEX)
    counts: list[int] = []

    def collate(features):
        batch = pad(features)
        counts.append(count_tokens(batch))  # in collation order; prefetched extras are cut off below
        return batch

    window, timing = bench.Window(device), {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        targs = TrainingArguments(
            **trainer_arguments(args, tmp, device, bf16), label_names=["labels"], remove_unused_columns=False,
            train_sampling_strategy="group_by_length" if group_by_length else "random")
        trainer = Trainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(examples),
                          data_collator=collate, callbacks=[step_clock(window, timing)])
        bench.reset_peak_memory(device)
        out = trainer.train()
    return trainer_result(args, trainer, out, timing, counts, model, heldout, device)


def run_trl(args: BenchLLMArgs, make_model, examples: list[dict], tokenizer, device, bf16: bool, heldout=()) -> dict:
    """TRL's SFTTrainer on the same PEFT model and tokenised examples (input_ids + the same assistant-only labels,
    so TRL builds no labels of its own), packing=True with its default best-fit-decreasing strategy (padding-free:
    a batch is one row, position ids restarting per example), max_length = --max-length, its own loss. What its
    packing cut (overflow past max_length) is counted against our examples."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    reset_accelerate()
    model = trainable_model(make_model, args, device)
    window, timing, counts = bench.Window(device), {}, []
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        cfg = SFTConfig(**trainer_arguments(args, tmp, device, bf16), packing=True, max_length=args.max_length,
                        dataset_num_proc=None)
        data = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer,
                             callbacks=[step_clock(window, timing)])
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            counts.append(sum(len(f["input_ids"]) for f in features))
            return batch

        trainer.data_collator = counting
        packed = trainer.train_dataset
        kept = sum(len(x) for x in packed["seq_lengths"])
        kept_tokens = sum(sum(x) for x in packed["seq_lengths"])
        bench.reset_peak_memory(device)
        out = trainer.train()
    total = sum(len(e["input_ids"]) for e in examples)
    return {**trainer_result(args, trainer, out, timing, counts, model, heldout, device),
            "packing": {"sequences": kept, "examples": len(examples), "tokens_kept": kept_tokens,
                        "tokens_cut": total - kept_tokens, "rows": len(packed)}}


def variant_fns(args: BenchLLMArgs, make_model, examples, blocks, tokenizer, device, bf16, heldout=()) -> dict:
    pad_id = tokenizer.pad_token_id

    def cleanup(result):
        bench.free_device_memory(device)
        return result

    fns = {
        "loop-packed": lambda: run_loop(args, make_model, packed_loader(blocks, args.batch_size, pad_id), device,
                                        bf16, heldout),
        "loop-padded": lambda: run_loop(args, make_model,
                                        padded_loader(examples, args.batch_size, pad_id, args.seed), device, bf16,
                                        heldout),
        "trainer-padded": lambda: run_trainer(args, make_model, examples, tokenizer, device, bf16, heldout),
        "trainer-grouped": lambda: run_trainer(args, make_model, examples, tokenizer, device, bf16, heldout,
                                               group_by_length=True),
        "trl-packed": lambda: run_trl(args, make_model, examples, tokenizer, device, bf16, heldout),
        "bare-packed": lambda: run_bare(args, make_model, packed_loader(blocks, args.batch_size, pad_id), device,
                                        bf16, heldout),
    }
    return {name: (lambda fn=fns[name]: cleanup(fn())) for name in args.variants}


# ---------------------------------------------------------------------------------------------------- memory


def run_probe(args: BenchLLMArgs, fns: dict) -> dict:
    """Train one variant once in this (fresh) process: its peak RSS and the rise over the RSS before training."""
    value, before, peak = bench.peak_rss_while(fns[args.probe])
    return {"variant": args.probe, "rss_before_mb": before, "peak_rss_mb": peak, "rise_mb": peak - before,
            "tokens": value["tokens"]}


def memory_by_probes(args: BenchLLMArgs, log) -> dict:
    """Each variant's peak RSS rise, measured in a fresh process of this script per variant."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-llm-probe-") as tmp:
        for variant in args.variants:
            cfg_path, out_path = Path(tmp) / f"{variant}.json", Path(tmp) / f"{variant}.out.json"
            fields = {**asdict(args), "probe": variant, "probe_out": str(out_path), "repeats": 1, "warmup": 0,
                      "memory": False}
            cfg_path.write_text(json.dumps(fields), encoding="utf-8")
            log(f"memory probe: {variant} in a fresh process")
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--config", str(cfg_path)],
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not out_path.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                log(f"memory probe {variant} failed: {' | '.join(tail)}")
                out[variant] = None
                continue
            out[variant] = json.loads(out_path.read_text(encoding="utf-8"))
    return out


# ------------------------------------------------------------------------------------------------ comparison


CLOCKS = {"wall": "seconds", "cpu": "cpu_seconds"}


def bench_variants(args: BenchLLMArgs, fns: dict, device, log) -> dict:
    """Interleaved repeats of every variant -> per variant and clock (wall, CPU) the medians; ratios to the
    reference and the loop's overhead, per clock."""
    runs = bench.interleaved_runs(fns, args.repeats, args.warmup, device)
    out: dict = {"variants": {}}
    for name, rs in runs.items():
        tokens = rs[0].value["tokens"]
        v = {"tokens_per_run": tokens, "tokens_per_step": tokens / args.steps,
             "rows_per_step": args.batch_size * args.grad_accum,
             "final_loss": [r.value["final_loss"] for r in rs],
             "heldout_loss": [r.value.get("heldout_loss") for r in rs],
             "peak_cuda_mb": max((r.value["peak_cuda_mb"] or 0.0) for r in rs) or None,
             "wall_s_incl_setup": bench.summarize([r.seconds for r in rs])}
        for clock, key in CLOCKS.items():
            secs = [r.value[key] for r in rs]
            v[clock] = {"tokens_per_s": bench.summarize([tokens / x for x in secs]),
                        "step_s": bench.summarize([x / args.steps for x in secs]), "seconds": bench.summarize(secs)}
        if "packing" in rs[0].value:
            v["packing"] = rs[0].value["packing"]
        out["variants"][name] = v
        log(f"{name}: {v['wall']['tokens_per_s']['median']:.0f} tokens/s wall, "
            f"{v['cpu']['tokens_per_s']['median']:.0f} per CPU-s, {v['wall']['step_s']['median']:.3f} s/step "
            f"({tokens} tokens per run)")
    variants = out["variants"]
    if REFERENCE in variants:
        for clock in CLOCKS:
            ref = variants[REFERENCE][clock]["tokens_per_s"]["median"]
            for v in variants.values():
                v[clock]["vs_reference"] = v[clock]["tokens_per_s"]["median"] / ref
        if "loop-packed" in variants:
            out["packed_over_reference"] = {c: variants["loop-packed"][c]["vs_reference"] for c in CLOCKS}
            out["packed_target"] = PACKED_TARGET
    if "loop-packed" in variants and "trl-packed" in variants:
        out["packed_over_trl"] = {c: variants["loop-packed"][c]["tokens_per_s"]["median"]
                                  / variants["trl-packed"][c]["tokens_per_s"]["median"] for c in CLOCKS}
        out["trl_target"] = TRL_TARGET
    if "loop-packed" in variants and "bare-packed" in variants:
        if variants["loop-packed"]["tokens_per_run"] != variants["bare-packed"]["tokens_per_run"]:
            raise RuntimeError("loop-packed and bare-packed trained on different batches")
        out["loop_overhead"] = {"target": OVERHEAD_TARGET}
        for clock in CLOCKS:
            # paired by repeat: both ran in the same rotation of the same repeat, the fairest pairing on a busy
            # machine; the median of the pairs
            loop_s = variants["loop-packed"][clock]["seconds"]["values"]
            bare_s = variants["bare-packed"][clock]["seconds"]["values"]
            per_repeat = [a / b - 1 for a, b in zip(loop_s, bare_s)]
            out["loop_overhead"][clock] = {"median": bench.summarize(per_repeat)["median"], "per_repeat": per_repeat}
    return out


def data_stats(examples: list[dict], blocks: list[dict], max_length: int) -> dict:
    lengths = sorted(len(e["input_ids"]) for e in examples)
    tokens = sum(lengths)
    return {"examples": len(examples), "tokens": tokens, "mean_length": tokens / len(lengths),
            "median_length": lengths[len(lengths) // 2], "max_length_seen": lengths[-1], "blocks": len(blocks),
            "block_fill": tokens / (len(blocks) * max_length),
            "label_tokens": sum(sum(x != llm_data.IGNORE_INDEX for x in e["labels"]) for e in examples)}


# ------------------------------------------------------------------------------------------------- real size


def real_size_check(args: BenchLLMArgs, device: torch.device, config=None, log=print) -> dict:
    """Each of args.real_size_methods on Gemma-2-2B's architecture (or `config`) with random weights: the recipe's
    load path (the weights dtype --dtype auto picks: bf16 on a bf16 GPU, fp32 for full tuning; NF4 with that compute
    dtype for QLoRA), the shared loop with bf16 autocast on a GPU, batch 1 x
    args.real_size_length, args.real_size_steps steps. -> per method: peak memory, step time, trainable params."""
    from transformers import AutoModelForCausalLM

    from hwtools.llm.known_configs import known_config

    config = config if config is not None else known_config("gemma-2-2b")
    bf16 = bf16_supported(device)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, config.vocab_size, (args.real_size_length,), generator=generator).tolist()
    example = {"input_ids": ids, "labels": ids}  # every position trained: the loss's worst case
    out = {"architecture": config.model_type, "params": None, "length": args.real_size_length,
           "steps": args.real_size_steps,
           "precision": ("the recipe's --dtype auto weights (bf16; trained weights of partial/full in fp32) + bf16 "
                         "autocast") if bf16 else "fp32",
           "methods": {}}
    with tempfile.TemporaryDirectory(prefix="bench-real-size-") as tmp:
        model_dir = Path(tmp) / "model"
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        with torch.device(device):  # initialised where it is, not on the CPU first
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32)
        out["params"] = count_parameters(model)["total"]
        model.save_pretrained(model_dir)
        del model
        gc.collect()
        train_bpe_tokenizer(["<start_of_turn>user\nسلام<end_of_turn>"], 300).save_pretrained(model_dir)
        log(f"real size: random {config.model_type} ({out['params']:,} parameters) saved in "
            f"{time.perf_counter() - start:.0f} s")
        for method in args.real_size_methods:
            out["methods"][method] = real_size_method(args, method, model_dir, [example], device, bf16, Path(tmp))
            m = out["methods"][method]
            log(f"real size {method}: peak {m['peak_memory_mb']:.0f} MiB ({m['memory_kind']}, reserved "
                f"{m['peak_reserved_mb']} MiB), {m['weights_dtype']} weights, {m['step_s']:.2f} s/step, "
                f"{m['trainable']:,} trainable")
    return out


def real_size_method(args: BenchLLMArgs, method: str, model_dir: Path, examples, device, bf16, tmp: Path) -> dict:
    reset_accelerate()
    bench.free_device_memory(device)
    dtype = weights_dtype("auto", device, method)  # what train_llm.py loads by default
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(str(model_dir), args.cache_dir, quantize_4bit=needs_4bit(method),
                                                dtype=dtype, device=device)
    load_s = time.perf_counter() - start
    run_dir = tmp / method
    run_dir.mkdir()
    cfg = loop_config(args, run_dir, bf16, steps=args.real_size_steps, batch_size=1, lr=default_lr(method))
    accelerator = make_accelerator(cfg)
    model = trainable_model(lambda loaded=model: loaded, args, accelerator.device, method, tokenizer)
    params = count_parameters(model)
    loader = padded_loader(examples * args.real_size_steps, 1, tokenizer.pad_token_id)
    result = train(accelerator, model, loader, causal_lm_loss, cfg, run_dir, Tracker(accelerator, run_dir, cfg, {}),
                   count_fn=count_tokens, throughput_unit="tokens/s")
    res = result.resources
    accelerator.free_memory()  # its references to the prepared model and optimizer would keep them alive
    del model, result, accelerator, loader
    bench.free_device_memory(device)
    # the loop's final checkpoint (accelerate save_state): its size is worth knowing, its disk space is not kept
    checkpoint_mb = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file()) / 2**20
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"peak_memory_mb": res["peak_memory_mb"], "memory_kind": res["memory_kind"],
            "peak_reserved_mb": res.get("peak_memory_reserved_mb"), "weights_dtype": str(dtype).replace("torch.", ""),
            "step_s": res["train_time_s"] / args.real_size_steps, "load_s": load_s, "checkpoint_mb": checkpoint_mb,
            "trainable": params["trainable"], "total": params["total"], "trainable_pct": params["trainable_pct"]}


# ---------------------------------------------------------------------------------------------------- report


def markdown_body(results: dict, args: BenchLLMArgs) -> str:
    cmp_ = results["comparison"]
    variants = cmp_["variants"]
    memory = results.get("memory") or {}
    cuda = results["device"].startswith("cuda")
    clocks = ["wall"] if cuda else ["wall", "cpu"]
    label = {"wall": "wall", "cpu": "CPU time"}
    headers = ["variant", "tokens/s (wall)", "wall range"] + ([] if cuda else ["tokens per CPU-s", "CPU range"]) \
        + ["s/step (wall)", "tokens/step", "held-out loss"] + (["peak CUDA MiB" if cuda else "peak RSS rise MiB"] if cuda or memory
                                                else []) \
        + [f"vs {REFERENCE} ({label[c]})" for c in clocks]
    rows = []
    for name, v in variants.items():
        row = [name]
        for c in clocks:
            t = v[c]["tokens_per_s"]
            row += [t["median"], f"{t['min']:.0f}-{t['max']:.0f}"]
        held = [x for x in v.get("heldout_loss", []) if x is not None]
        row += [v["wall"]["step_s"]["median"], v["tokens_per_step"],
                f"{sorted(held)[len(held) // 2]:.4f}" if held else ""]
        if cuda or memory:
            row.append(v["peak_cuda_mb"] if cuda else (memory.get(name) or {}).get("rise_mb"))
        row += [f"{v[c]['vs_reference']:.2f}x" if "vs_reference" in v[c] else "" for c in clocks]
        rows.append(row)
    d = results["data"]
    lines = [f"## Throughput ({results['model']})", "",
             f"LoRA r={args.lora_r} (alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g}) on "
             f"{args.target_modules}; {args.steps} steps of {args.batch_size} rows x grad accum {args.grad_accum}, "
             f"max length {args.max_length}, lr {args.lr:g} cosine, clip 1.0, seed {args.seed}; "
             f"{results['precision']} on `{results['device']}`. Median of {args.repeats} interleaved repeats after "
             f"{args.warmup} warm-up run(s). Tokens/s counts non-padding tokens over the window from the first "
             f"forward pass to the end of the last optimiser step."
             + ("" if cuda else " 'Per CPU-s' divides by this process's CPU time in that window instead of the "
                "wall clock: with one torch thread it is the work done, without the time spent waiting for a core "
                "that other jobs held."), "",
             bench.markdown_table(headers, rows), ""]
    if "packed_over_reference" in cmp_:
        got = cmp_["packed_over_reference"]
        lines += [f"- loop-packed over {REFERENCE}: " + ", ".join(
            f"**{got[c]:.2f}x** ({label[c]})" for c in clocks) + f"; target >= {PACKED_TARGET:g}x."]
    if "packed_over_trl" in cmp_:
        got = cmp_["packed_over_trl"]
        lines += ["- loop-packed over trl-packed: " + ", ".join(f"**{got[c]:.2f}x** ({label[c]})" for c in clocks)
                  + f"; target >= {TRL_TARGET:g}x."]
        lines += ["- Where trl-packed's time goes: its default packing (best-fit decreasing) is padding-free, so a batch "
                  "of packed sequences becomes ONE row (batch x max length tokens) whose position ids restart per "
                  "example. Flash-attention's variable-length kernel runs that at the cost of separate rows, but "
                  "Gemma-2 needs eager attention here (logit soft-capping), and eager attention computes the whole "
                  "row x row score matrix per head and masks the pairs across examples: batch-size times the score "
                  "elements of separate rows. The loop packs into separate rows of --max-length (collate_packed) and "
                  "flattens only for flash-attention (collate_flattened). TRL also runs its fused LM head (log-probs, "
                  "entropy, top-1) over every position, prompt included, where the loop's loss runs the head over "
                  "label positions only, and it reads three metrics and a token count with .item() every "
                  "micro-batch. What the loop took from TRL: its collator computes the flash-attention sequence "
                  "boundaries on the CPU; the loop's collators now give the loss its label positions "
                  "and counts the same way (no host sync per micro-step)."]
        pk = variants["trl-packed"].get("packing")
        if pk:
            lines += [f"- trl-packed's packing kept {pk['sequences']} of {pk['examples']} examples in {pk['rows']} "
                      f"rows; {pk['tokens_cut']} tokens cut (bfd truncates what overflows --max-length)."]
    if "loop_overhead" in cmp_:
        o = cmp_["loop_overhead"]
        lines += ["- Loop overhead (loop-packed time / bare-packed time - 1, same batches, paired by repeat, median): "
                  + "; ".join(f"**{100 * o[c]['median']:+.1f}%** ({label[c]}; per repeat "
                              f"{', '.join(f'{100 * x:+.1f}%' for x in o[c]['per_repeat'])})" for c in clocks)
                  + f"; target <= {100 * OVERHEAD_TARGET:g}%."]
    if "loop-packed" in variants and "loop-padded" in variants:
        clock = clocks[-1]
        packed, padded = (variants[n][clock]["tokens_per_s"]["median"] for n in ("loop-packed", "loop-padded"))
        if padded > packed:
            lines += [f"- loop-padded beats loop-packed here ({padded / packed:.2f}x, {label[clock]}). Length-grouped "
                      "batches already leave little padding, while a packed row attends over its whole block: "
                      "eager attention (Gemma-2's soft-capping needs it) computes the full block x block score "
                      "matrix and masks the pairs across examples, and at this width those score-sized element-wise "
                      "ops are a large share of the step (a profile of one step: the L x L multiplies, tanh and "
                      "batched matmuls took about 1.8x longer per token in 256-token blocks than in 160-token padded "
                      "rows). The wider the model, the smaller that share (score elements per token grow with the "
                      "number of heads, the linear layers with the square of the width)."]
    lines += ["", "Data: "
              f"{d['examples']} training conversations, {d['tokens']} tokens (mean {d['mean_length']:.0f}, median "
              f"{d['median_length']}, max {d['max_length_seen']}); packed into {d['blocks']} blocks of "
              f"{args.max_length} ({100 * d['block_fill']:.0f}% full). Packed rows hold several examples, so packed "
              "variants see more tokens per step at the same batch size; compare tokens/s, not s/step.", ""]
    if memory and not cuda:
        lines += ["CPU memory: each variant trained once more in a fresh process; the column is its peak resident "
                  "set size minus the size just before training (the weights and data already loaded), sampled "
                  "every 5 ms. Peak RSS of those processes: "
                  + ", ".join(f"{k} {v['peak_rss_mb']:.0f} MiB" for k, v in memory.items() if v) + ".", ""]
    return "\n".join(lines)


def real_size_markdown(results: dict) -> str:
    r = results["real_size"]
    rows = [[m, v.get("weights_dtype"), v["peak_memory_mb"], v.get("peak_reserved_mb"), v["memory_kind"], v["step_s"],
             f"{v['trainable']:,}", f"{v['trainable_pct']:.3f}%", v["load_s"], v["checkpoint_mb"]]
            for m, v in r["methods"].items()]
    return "\n".join([
        f"## Real size: {r['architecture']}, {r['params']:,} parameters, random weights", "",
        f"Batch 1 x {r['length']} tokens (every position a label), {r['steps']} steps per method through the shared "
        f"loop, the recipe's load path ({r['precision']}; QLoRA: NF4 weights). Peak memory is what the run's "
        f"summary.json reports (`resources.peak_memory_mb`: tensors allocated, weights included; reserved: what "
        f"torch's caching allocator held). Each method's model is freed and the peak counters reset before the "
        f"next one loads.", "",
        bench.markdown_table(["method", "weights", "peak memory MiB", "reserved MiB", "kind", "s/step", "trainable",
                              "trainable %", "load s", "checkpoint MiB"], rows), "",
        "Checkpoint MiB: the size of the loop's checkpoint (accelerate save_state) after those steps.", ""])


def auto_notes(machine: dict, args: BenchLLMArgs, device: torch.device) -> list[str]:
    notes = list(args.notes) + bench.busy_cpu_notes(machine, "tokens/s")
    if device.type != "cuda" and not args.real_size:
        notes.append("GPU section not run here (no CUDA device on this machine). On a GPU: "
                     "`python launch/bench_llm.py --device cuda` (bf16 autocast, memory from "
                     "torch.cuda.max_memory_allocated) and `python launch/bench_llm.py --real-size` (Gemma-2-2B "
                     "architecture, random weights; LoRA, QLoRA, prefix tuning, partial at 1 x 512).")
    if args.quick:
        notes.append("--quick: smoke-test sizes; these numbers measure nothing.")
    return notes


# ------------------------------------------------------------------------------------------------------ main


def check_args(args: BenchLLMArgs) -> BenchLLMArgs:
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise UserError(f"--variants {' '.join(args.variants)}: choose from {', '.join(VARIANTS)}")
    if "trl-packed" in args.variants and not trl_available():
        raise UserError("--variants trl-packed: trl is not installed (pip install 'hwtools[bench]')")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: must be >= 0")
    for name in ("batch_size", "grad_accum", "steps", "repeats", "max_length", "real_size_length",
                 "real_size_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: must be >= 0")
    if args.probe is not None and args.probe not in VARIANTS:
        raise UserError(f"--probe {args.probe}: choose from {', '.join(VARIANTS)}")
    return replace(args, **QUICK_SIZES) if args.quick else args


@cli_main
def main(argv=None) -> dict:
    started = time.time()
    args = check_args(parse_config(BenchLLMArgs, argv))
    device = resolve_device(args.device, args.threads)
    log = partial(print, flush=True)
    machine = bench.machine_info(device)
    if args.real_size:
        return main_real_size(args, device, machine, started, log)
    bf16 = bf16_supported(device)
    enable_tf32(device)

    splits, report = load_data(args)
    make_model, tokenizer, model_desc = load_bench_model(args, splits)
    examples, blocks = prepare_examples(args, tokenizer, splits, report)
    heldout = [] if args.probe else heldout_batches(args, tokenizer, splits)
    fns = variant_fns(args, make_model, examples, blocks, tokenizer, device, bf16, heldout)
    if args.probe:
        result = run_probe(args, fns)
        Path(args.probe_out).write_text(json.dumps(result), encoding="utf-8")
        return result

    stats = data_stats(examples, blocks, args.max_length)
    log(f"{model_desc}; {stats['examples']} examples -> {stats['blocks']} blocks; device {device}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}; variants {', '.join(args.variants)}")
    comparison = bench_variants(args, fns, device, log)
    memory = memory_by_probes(args, log) if args.memory and device.type == "cpu" else None
    results = {"model": model_desc, "device": str(device), "precision": "bf16 autocast" if bf16 else "fp32",
               "data": stats, "data_report": report.as_dict(), "comparison": comparison, "memory": memory}
    name = args.name or ("llm" if device.type == "cpu" else f"llm_{device.type}")
    md, js = bench.write_results(args.output_dir, name, "LLM fine-tuning benchmark: packing, loop overhead, "
                                 "Trainer + PEFT", results, markdown_body(results, args), settings=asdict(args),
                                 notes=auto_notes(machine, args, device), machine=machine, started_at=started)
    log(f"wrote {md} and {js}")
    return results


def main_real_size(args: BenchLLMArgs, device, machine, started, log) -> dict:
    if device.type != "cuda" and not args.allow_cpu_real_size:
        raise UserError("--real-size needs a CUDA GPU: Gemma-2-2B in fp32 is 10.5 GB of weights before gradients, "
                        "and a CPU step takes minutes (--allow-cpu-real-size runs it anyway)")
    results = {"real_size": real_size_check(args, device, log=log), "device": str(device)}
    name = args.name or f"llm_real_size_{device.type}"
    md, js = bench.write_results(args.output_dir, name, "LLM real-size memory check: Gemma-2-2B architecture",
                                 results, real_size_markdown(results), settings=asdict(args),
                                 notes=list(args.notes), machine=machine, started_at=started)
    log(f"wrote {md} and {js}")
    return results


if __name__ == "__main__":
    main()
