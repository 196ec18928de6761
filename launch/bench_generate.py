"""Benchmark chat generation on the Persian test prompts: batched KV-cache greedy decoding against one prompt at a
time, with the recipe's own generation code (hwtools.llm.generate.generate_answers) and the same model as
bench_llm.py.

    python launch/bench_generate.py                    # tiny random Gemma-2, 15 prompts, 96 new tokens, 3 repeats
    python launch/bench_generate.py --model embedded   # the embedded Gemma-3-270M
    python launch/bench_generate.py --device cuda      # GPU: bf16 weights
    python launch/bench_generate.py --quick --output-dir /tmp/bench      # smoke test, measures nothing

Every batch size generates the answers to all the prompts (left-padded batches, greedy, KV cache, stopping at the
end-of-turn token); variants run interleaved and the median of --repeats is reported. Tokens/s counts the answer
tokens kept (up to the stop token), so rows that stop early in a batch are not credited for the padding after them.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Optional

import torch

from hwtools import bench
from hwtools.config import parse_config
from hwtools.device import bf16_supported, enable_tf32
from hwtools.errors import UserError, cli_main
from hwtools.llm.bench_models import ModelArgs, load_bench_model, load_data, resolve_device
from hwtools.llm.evaluate import load_test_prompts
from hwtools.llm.generate import generate_token_ids

BATCHED_TARGET = 3.0  # batched over one-at-a-time
QUICK_SIZES = {"hidden_size": 32, "num_layers": 2, "vocab_size": 1024, "max_new_tokens": 4, "repeats": 1,
               "warmup": 0, "max_train_examples": 48, "batch_sizes": [1, 4]}


@dataclass
class BenchGenerateArgs(ModelArgs):
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 15], metadata={
        "help": "Prompts per generate() call; 1 is one at a time, the baseline (8 is train_llm.py's default; 15 = all the shipped prompts at once)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Answer tokens per prompt (train_llm.py's default)."})
    prompts_file: Optional[str] = field(default=None, metadata={"help": "Test prompts JSONL (default: the shipped ones)."})
    repeats: int = field(default=3, metadata={"help": "Timed repeats of every batch size; the median is reported."})
    warmup: int = field(default=1, metadata={"help": "Untimed passes of every batch size before the repeats."})
    quick: bool = field(default=False, metadata={"help": f"Smoke test: {QUICK_SIZES}."})


def check_args(args: BenchGenerateArgs) -> BenchGenerateArgs:
    if not args.batch_sizes or any(b < 1 for b in args.batch_sizes):
        raise UserError(f"--batch-sizes {args.batch_sizes}: give one or more sizes >= 1")
    for name in ("max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        raise UserError("--warmup and --threads must be >= 0")
    args = replace(args, **QUICK_SIZES) if args.quick else args
    if 1 not in args.batch_sizes:  # the baseline every ratio is taken against
        args = replace(args, batch_sizes=[1, *args.batch_sizes])
    return args


def bench_generation(model, tokenizer, conversations, args: BenchGenerateArgs, device) -> dict:
    """Every batch size over the same prompts, interleaved -> tokens/s, speed-up over batch 1, same answers."""
    fns = {f"batch {b}": partial(generate_token_ids, model, tokenizer, conversations, args.max_new_tokens, b)
           for b in args.batch_sizes}
    runs = bench.interleaved_runs(fns, args.repeats, args.warmup, device)
    single = runs["batch 1"]
    out = {"prompts": len(conversations), "max_new_tokens": args.max_new_tokens, "batch_sizes": {}}
    for b, (name, rs) in zip(args.batch_sizes, runs.items()):
        ids = rs[0].value
        tokens = sum(map(len, ids))
        seconds = bench.summarize([r.seconds for r in rs])
        cpu = bench.summarize([r.cpu_seconds for r in rs])
        out["batch_sizes"][b] = {
            "seconds": seconds, "tokens": tokens, "tokens_per_s": bench.rate(tokens, seconds["median"]),
            "cpu_seconds": cpu, "tokens_per_cpu_s": bench.rate(tokens, cpu["median"]),
            "prompts_per_s": bench.rate(len(ids), seconds["median"]),
            "stopped_early": sum(len(x) < args.max_new_tokens for x in ids),
            # greedy on left-padded rows should give the answers a lone prompt gets; a random model's near-tied
            # logits can flip on the last bits of a different matmul shape, so this is reported, not required
            "same_answers_as_single": sum(a == s for a, s in zip(ids, single[0].value)),
        }
    base, base_cpu = out["batch_sizes"][1]["tokens_per_s"], out["batch_sizes"][1]["tokens_per_cpu_s"]
    for v in out["batch_sizes"].values():
        v["speedup"], v["speedup_cpu"] = v["tokens_per_s"] / base, v["tokens_per_cpu_s"] / base_cpu
    best = max(out["batch_sizes"], key=lambda b: out["batch_sizes"][b]["tokens_per_s"])
    out["best_batch_size"], out["best_speedup"] = best, out["batch_sizes"][best]["speedup"]
    out["target"], out["meets_target"] = BATCHED_TARGET, out["best_speedup"] >= BATCHED_TARGET
    return out


def markdown_body(results: dict, args: BenchGenerateArgs) -> str:
    g = results["generation"]
    cpu = not results["device"].startswith("cuda")  # on a GPU the host's CPU time says little
    rows = [[b, v["tokens_per_s"], v["prompts_per_s"], f"{v['seconds']['min']:.2f}-{v['seconds']['max']:.2f}"]
            + ([v["tokens_per_cpu_s"]] if cpu else [])
            + [v["tokens"], v["stopped_early"], f"{v['same_answers_as_single']}/{g['prompts']}", f"{v['speedup']:.2f}x"]
            + ([f"{v['speedup_cpu']:.2f}x"] if cpu else [])
            for b, v in g["batch_sizes"].items()]
    headers = ["batch size", "tokens/s (wall)", "prompts/s", "pass s (min-max)"] + (["tokens per CPU-s"] if cpu else []) \
        + ["answer tokens", "stopped early", "same answers as batch 1", "vs batch 1 (wall)"] \
        + (["vs batch 1 (CPU time)"] if cpu else [])
    return "\n".join([
        f"## Greedy generation ({results['model']})", "",
        f"{g['prompts']} Persian test prompts, up to {g['max_new_tokens']} new tokens each, greedy with the KV cache "
        f"(hwtools.llm.generate, as train_llm.py calls it), {results['precision']} on `{results['device']}`. "
        f"Median of {args.repeats} interleaved repeats after {args.warmup} warm-up pass(es) over all prompts.", "",
        bench.markdown_table(headers, rows), "",
        f"- Best: batch {g['best_batch_size']}, **{g['best_speedup']:.2f}x** one prompt at a time (wall"
        + (f"; {g['batch_sizes'][g['best_batch_size']]['speedup_cpu']:.2f}x in CPU time" if cpu else "")
        + f"; target >= {BATCHED_TARGET:g}x: {'met' if g['meets_target'] else 'NOT met'}).",
        "- CPU time is this process's, over the same pass: on a CPU shared with other jobs it leaves out the time "
        "spent waiting for a core." if cpu else "", ""])


def auto_notes(machine: dict, args: BenchGenerateArgs, device) -> list[str]:
    notes = list(args.notes) + bench.busy_cpu_notes(machine, "rates")
    if device.type != "cuda":
        notes.append("GPU section not run here (no CUDA device on this machine); on a GPU run "
                     "`python launch/bench_generate.py --device cuda` (bf16 weights).")
    if args.quick:
        notes.append("--quick: smoke-test sizes; these numbers measure nothing.")
    return notes


@cli_main
def main(argv=None) -> dict:
    started = time.time()
    args = check_args(parse_config(BenchGenerateArgs, argv))
    device = resolve_device(args.device, args.threads)
    log = partial(print, flush=True)
    machine = bench.machine_info(device)
    bf16 = bf16_supported(device)
    enable_tf32(device)
    splits, _ = load_data(args)
    make_model, tokenizer, model_desc = load_bench_model(args, splits)
    model = make_model().to(device, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    conversations = [p["turns"] for p in load_test_prompts(args.prompts_file)]
    log(f"{model_desc}; {len(conversations)} prompts; device {device}, {'bf16' if bf16 else 'fp32'}; "
        f"batch sizes {args.batch_sizes}")
    generation = bench_generation(model, tokenizer, conversations, args, device)
    for b, v in generation["batch_sizes"].items():
        log(f"batch {b}: {v['tokens_per_s']:.1f} tokens/s, {v['speedup']:.2f}x batch 1")
    results = {"model": model_desc, "device": str(device), "precision": "bf16" if bf16 else "fp32",
               "generation": generation}
    name = args.name or ("generate" if device.type == "cpu" else f"generate_{device.type}")
    md, js = bench.write_results(args.output_dir, name, "LLM generation benchmark: batched vs one prompt at a time",
                                 results, markdown_body(results, args), settings=asdict(args),
                                 notes=auto_notes(machine, args, device), machine=machine, started_at=started)
    log(f"wrote {md} and {js}")
    return results


if __name__ == "__main__":
    main()
