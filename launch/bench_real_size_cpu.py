"""Gemma-2-2B-it and Llama-3.2-3B-Instruct at full size on CPU, through the real CLI, with random weights.

    python launch/bench_real_size_cpu.py --root /big/disk/realsize            # both models, five methods
    python launch/bench_real_size_cpu.py --num-layers 2 --output-dir /tmp/b   # real width and vocab, 2 layers

For each model it writes a folder laid out as a hub download (config.json, generation_config.json, sharded
safetensors and their index, tokenizer.json, tokenizer_config.json with the instruct chat template; see
hwtools/llm/hub_folder.py), then for each method runs `launch/train_llm.py --model <folder>` in its own process
(a few steps at a short length, writing final/), reloads final/ with `hwtools.llm.methods.load_finetuned` in a
fresh process and answers one test prompt. Recorded per model and method: total and trainable parameters beside
the planner's exact counts, peak RSS beside the planner's estimate (hwtools/llm/plan.py, same device, dtype and
length), seconds per step, checkpoint and final/ sizes. Results go to <output-dir>/<name>.md|json.

Tens of GB of disk under --root and 8-14 GB of RAM per run: a benchmark, not CI. Before each heavy process it waits
(up to --wait-s) until --min-free-gb of memory is available, and skips the run if it never is.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

from hwtools import bench
from hwtools.config import default_cache_dir, parse_config
from hwtools.errors import UserError, cli_main
from hwtools.llm.hub_folder import INSTRUCT_MODELS, is_complete

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("lora", "qlora", "prefix-tuning", "p-tuning", "partial")
DTYPES = ("bf16", "fp32")
PROMPT = {"id": "fact-capital", "skill": "fact", "reference": "پایتخت ایران شهر تهران است.",
          "conversations": [{"from": "system", "value": "به فارسی و کوتاه پاسخ بده.", "weight": None},
                            {"from": "human", "value": "پایتخت ایران کجاست؟", "weight": None}]}


@dataclass
class RealSizeArgs:
    models: list[str] = field(default_factory=lambda: list(INSTRUCT_MODELS), metadata={
        "help": f"Models (space separated): {' '.join(INSTRUCT_MODELS)}."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={
        "help": f"Methods (space separated), each in its own train_llm.py process: {' '.join(METHODS)}."})
    root: Optional[str] = field(default=None, metadata={
        "help": "Where model folders, data and runs go (tens of GB; default <cache-dir>/real-size)."})
    num_layers: int = field(default=0, metadata={
        "help": "Decoder layers (0: the real depth); fewer keeps the real width and vocabulary for a quick check."})
    dtype: str = field(default="fp32", metadata={
        "help": "train_llm.py --dtype (the weights on disk are bf16, as the hub's): fp32, the recipe's CPU default, "
                "or bf16, fast only on CPUs with AVX512-BF16/AMX (on AVX2 torch emulates it, several times slower)."})
    steps: int = field(default=2, metadata={"help": "Optimiser steps per method (train_llm.py --max-steps)."})
    max_length: int = field(default=96, metadata={
        "help": "train_llm.py --max-length: 96 fits the shortest data rows with a system turn (Llama-3.2's "
                "header alone is about 30 tokens)."})
    conversations: int = field(default=10, metadata={
        "help": "Conversations in the data file (the shortest with a system turn; one each for validation, test)."})
    max_new_tokens: int = field(default=4, metadata={"help": "Tokens generated for the test prompt."})
    threads: int = field(default=1, metadata={
        "help": "OMP_NUM_THREADS of every child process (0: torch's default, one per core). On a CPU shared with "
                "other jobs one thread avoids OpenMP threads spinning while they wait for a core."})
    min_free_gb: float = field(default=16.0, metadata={"help": "Available memory to wait for before a heavy run."})
    wait_s: int = field(default=600, metadata={"help": "Longest wait for that memory (polled every 30 s)."})
    rerun: bool = field(default=False, metadata={
        "help": "Run every method again (default: a method whose finished result is under --root is reused, so an "
                "interrupted benchmark resumes)."})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "Keep each run's checkpoints/ (default: measured, then deleted; final/ is kept)."})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={
        "help": "hwtools cache (the embedded Gemma-3 tokenizer, from which Gemma-2's is built)."})
    output_dir: str = field(default="results/bench", metadata={"help": "Where the .md and .json results go."})
    name: str = field(default="real_size_cpu", metadata={"help": "Base name of the result files."})
    notes: list[str] = field(default_factory=list, metadata={"help": "Free-text notes written into the results."})

    def __post_init__(self):
        unknown = [m for m in self.models if m not in INSTRUCT_MODELS] + [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown model or method {', '.join(unknown)}: models {', '.join(INSTRUCT_MODELS)}; "
                            f"methods {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose {' or '.join(DTYPES)}")


# ---- work done in fresh processes (spawned: the parent stays small while they load gigabytes) --------------------


def _write_folder(name: str, folder: str, num_layers: int, cache_dir: str) -> dict:
    import torch

    from hwtools.llm.hub_folder import gemma2_it_tokenizer, llama32_instruct_tokenizer, write_random_model
    from hwtools.llm.models import embedded_model_dir

    start = time.perf_counter()
    tokenizer = (gemma2_it_tokenizer(embedded_model_dir(cache_dir)) if name.startswith("gemma")
                 else llama32_instruct_tokenizer())
    out = write_random_model(name, folder, tokenizer, num_layers=num_layers or None, dtype=torch.bfloat16)
    return {**out, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": _peak_rss_mb()}


def _reload_and_answer(run_dir: str, cache_dir: str, dtype: str, prompts_file: str, max_new_tokens: int) -> dict:
    import torch

    from hwtools.llm.evaluate import load_test_prompts
    from hwtools.llm.generate import generate_token_ids
    from hwtools.llm.methods import load_finetuned

    start = time.perf_counter()
    model, tokenizer = load_finetuned(run_dir, cache_dir, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    loaded = time.perf_counter()
    import psutil

    # resident now, and how much of it is file-backed (the bf16 shards mapped while they were read and upcast)
    mem = psutil.Process().memory_info()
    after_load = {"rss_mb": round(mem.rss / 2**20, 1), "file_backed_mb": round(mem.shared / 2**20, 1)}
    method = json.loads((Path(run_dir) / "final" / "finetune.json").read_text(encoding="utf-8"))["method"]
    turns = load_test_prompts(prompts_file)[0]["turns"]
    ids = generate_token_ids(model, tokenizer, [turns], max_new_tokens, 1, method=method)[0]
    # random weights: the tokens are noise; special ones are kept visible (a plain answer would drop them)
    answer = tokenizer.decode(ids, skip_special_tokens=False)
    return {"answer": answer, "answer_ids": ids, "load_s": round(loaded - start, 1),
            "generate_s": round(time.perf_counter() - loaded, 1), "peak_rss_mb": _peak_rss_mb(),
            "after_load": after_load,
            "model_class": type(model).__name__}


def _peak_rss_mb() -> float:
    from hwtools.train.meters import peak_rss_mb

    return round(peak_rss_mb(), 1)


def thread_env(threads: int) -> dict:
    """Environment that gives a child process `threads` OpenMP threads (0: leave torch's default)."""
    return {"OMP_NUM_THREADS": str(threads)} if threads > 0 else {}


def in_fresh_process(fn, *args, threads: int = 0):
    """fn(*args) in a new spawned process (its memory is returned to the system when it ends)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.update(thread_env(threads))  # a spawned child starts with the parent's environment
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        if threads > 0:
            os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.update(OMP_NUM_THREADS=saved)


# ---- the parent ----------------------------------------------------------------------------------------------------


def wait_for_memory(min_free_gb: float, wait_s: int, log=print) -> tuple[bool, float]:
    """Poll available memory every 30 s until min_free_gb is there or wait_s has passed -> (ok, available GB)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        free = psutil.virtual_memory().available / 2**30
        if free >= min_free_gb:
            return True, round(free, 1)
        if time.monotonic() >= deadline:
            return False, round(free, 1)
        log(f"waiting for memory: {free:.1f} GB available, want {min_free_gb:g}")
        time.sleep(30)


def total_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def write_data(root: Path, tokenizers: dict, n: int, max_length: int) -> tuple[Path, Path, dict]:
    """The n shortest embedded conversations with a system turn that fit max_length with every tokenizer, as a
    SlimOrca-schema JSONL, and a one-prompt test file (system + user) -> (data, prompts, label check per model)."""
    from hwtools.data_report import DataReport
    from hwtools.llm import data as D

    convs = [c for c in D.load_conversations("embedded", DataReport()) if c[0]["role"] == "system"]
    lengths = [max(_length(D.tokenize_conversation(t, c, 100000)) for t in tokenizers.values()) for c in convs]
    chosen = [c for _, c in sorted(zip(lengths, convs), key=lambda x: x[0]) if _ <= max_length][:n]
    if len(chosen) < n:
        raise UserError(f"only {len(chosen)} conversations with a system turn fit --max-length {max_length}")
    back = {"system": "system", "user": "human", "assistant": "gpt"}
    root.mkdir(parents=True, exist_ok=True)
    data = root / "persian_chat_short.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": back[t["role"]], "value": t["content"],
                                                           "weight": None} for t in c]}, ensure_ascii=False) + "\n"
                            for c in chosen), encoding="utf-8")
    prompts = root / "test_prompt.jsonl"
    prompts.write_text(json.dumps(PROMPT, ensure_ascii=False) + "\n", encoding="utf-8")
    return data, prompts, {m: label_check(t, chosen) for m, t in tokenizers.items()}


def _length(example) -> int:
    return len(example["input_ids"]) if isinstance(example, dict) else 10**9


def label_check(tokenizer, convs: list) -> dict:
    """Tokenise with hwtools' assistant-only labels and check that the labelled runs decode to exactly the
    assistant replies plus the end-of-turn token (nothing of the system header, its date lines or user turns)."""
    from hwtools.llm import data as D

    eot = "<|eot_id|>" if "<|eot_id|>" in tokenizer.get_vocab() else "<end_of_turn>"
    ok, labelled, total, first = 0, 0, 0, None
    for turns in convs:
        ex = D.tokenize_conversation(tokenizer, turns, 100000)
        runs, cur = [], []
        for tok, lab in zip(ex["input_ids"], ex["labels"]):
            if lab == D.IGNORE_INDEX:
                runs, cur = (runs + [cur] if cur else runs), []
            else:
                cur.append(lab)
        runs += [cur] if cur else []
        decoded = [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]
        ok += decoded == [t["content"].strip() + eot for t in turns if t["role"] == "assistant"]
        labelled += sum(len(r) for r in runs)
        total += len(ex["input_ids"])
        first = first or tokenizer.decode(ex["input_ids"], skip_special_tokens=False)
    return {"conversations": len(convs), "labels_exactly_replies": ok, "labelled_tokens": labelled,
            "tokens": total, "first_rendered": first}


def folder_name(model: str, num_layers: int) -> str:
    return model + (f"-{num_layers}layers" if num_layers else "")


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1) if path.exists() else 0.0


def run_train(args: RealSizeArgs, folder: Path, method: str, data: Path, prompts: Path, run_dir: Path, log) -> dict:
    """launch/train_llm.py in its own process; -> its exit status, whole-process peak RSS and wall time."""
    n = args.conversations
    frac = 1.0 / n  # one conversation each for validation and test
    cmd = [sys.executable, str(ROOT / "launch" / "train_llm.py"), "--model", str(folder), "--method", method,
           "--data", str(data), "--val-frac", str(frac), "--test-frac", str(frac), "--max-steps", str(args.steps),
           "--max-length", str(args.max_length), "--batch-size", "1", "--dtype", args.dtype, "--log-every", "1",
           "--prompts-file", str(prompts), "--gen-max-new-tokens", str(args.max_new_tokens), "--gen-batch-size", "1",
           "--chrf-samples", "0", "--report-to", "none", "--output-dir", str(run_dir), "--overwrite",
           "--cache-dir", args.cache_dir]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), **thread_env(args.threads)}
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    log(f"  train_llm.py {method}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s")
    return {"command": " ".join(cmd), "exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "process_peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "log": str(log_path),
            "log_tail": tail if proc.returncode else []}


def plan_for(folder: Path, methods, dtype: str, max_length: int) -> dict:
    """The planner's counts and memory estimate (cpu, this dtype, batch 1 x max_length) per method."""
    from hwtools.llm.methods import MethodConfig
    from hwtools.llm.plan import DTYPES as PLAN_DTYPES
    from hwtools.llm.plan import plan_method, resolve_config

    config = resolve_config(str(folder), None)
    plans = {}
    for m in methods:
        try:
            plans[m] = plan_method(config, MethodConfig(method=m), batch_size=1, seq_len=max_length,
                                   dtype=PLAN_DTYPES[dtype], device="cpu")
        except UserError as e:  # e.g. partial's 2 + 2 layers on a 2-layer quick check: train_llm.py says the same
            plans[m] = {"error": str(e)}
    return plans


def bench_model(args: RealSizeArgs, model: str, root: Path, data: Path, prompts: Path, log) -> dict:
    folder = root / folder_name(model, args.num_layers)
    out = {"folder": str(folder), "methods": {}}
    plans = plan_for(folder, args.methods, args.dtype, args.max_length)
    out["files"] = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    for method in args.methods:
        log(f"{model} {method}")
        saved = root / "runs" / f"{folder.name}-{method}-{args.dtype}.result.json"
        if saved.is_file() and not args.rerun:
            out["methods"][method] = json.loads(saved.read_text(encoding="utf-8"))
            log("  reused the finished result (--rerun runs it again)")
            continue
        plan = plans[method]
        # the planner's tensors plus ~2 GB of Python, torch and tokenizer, and never less than --min-free-gb
        need = max(args.min_free_gb, plan.get("memory", {}).get("total", 0) / 2**30 + 2)
        ok, free = wait_for_memory(need, args.wait_s if need < total_gb() - 1 else 0, log)
        row = {"available_gb_at_start": free, "load_average_1m": bench.load_average(),
               "plan": plan if "error" in plan else {
                   "total": plan["total"], "trainable": plan["trainable"],
                   "memory_mb": {k: _mb(v) for k, v in plan["memory"].items()}}}
        out["methods"][method] = row
        if not ok:
            row["skipped"] = f"needs about {need:.0f} GB, {free} GB available (machine: {total_gb():.0f} GB)"
            log(f"  skipped: {row['skipped']}")
            continue
        run_dir = root / "runs" / f"{folder.name}-{method}-{args.dtype}"
        row["train"] = run_train(args, folder, method, data, prompts, run_dir, log)
        summary_path = run_dir / "summary.json"
        if row["train"]["exit"] != 0 or not summary_path.is_file():
            continue
        s = json.loads(summary_path.read_text(encoding="utf-8"))
        res = s["resources"]
        row.update(params=s["params"], steps=s["train"]["steps"], final_loss=s["train"]["final_loss"],
                   peak_rss_train_mb=res["peak_memory_mb"], train_time_s=res["train_time_s"],
                   step_s=round(res["train_time_s"] / max(s["train"]["steps"], 1), 2),
                   tokens_per_s=res["throughput"], phases=res.get("phases"),
                   final_mb=dir_mb(run_dir / "final"), checkpoint_mb=dir_mb(run_dir / "checkpoints"),
                   counts_match_plan=(s["params"]["total"] == plan.get("total")
                                      and s["params"]["trainable"] == plan.get("trainable")),
                   data_report=s["data_report"])
        if not args.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        ok, free = wait_for_memory(max(args.min_free_gb, plan["memory"]["weights"] / 2**30 + 2), args.wait_s, log)
        if not ok:
            row["reload"] = {"skipped": f"only {free} GB available"}
            continue
        try:
            row["reload"] = in_fresh_process(_reload_and_answer, str(run_dir), args.cache_dir, args.dtype,
                                             str(prompts), args.max_new_tokens, threads=args.threads)
        except Exception as e:  # noqa: BLE001 - a failed reload is a result worth recording, not a crash
            row["reload"] = {"error": f"{type(e).__name__}: {e}"}
        if "answer" in row["reload"]:
            saved.write_text(json.dumps(row, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        log(f"  params {row['params']['trainable']:,} / {row['params']['total']:,} (plan "
            f"{plan['trainable']:,} / {plan['total']:,}); peak RSS {row['train']['process_peak_rss_mb']:.0f} MiB "
            f"(plan {_mb(plan['memory']['total']):.0f}); {row['step_s']} s/step; reload: {row['reload']}")
    return out


def _mb(n):
    return None if n is None else round(n / 2**20, 1)


def markdown(results: dict, args: RealSizeArgs) -> str:
    lines = [f"## Runs: {args.steps} steps of 1 x {args.max_length} tokens, --dtype {args.dtype}, CPU", "",
             "Each method ran `launch/train_llm.py --model <folder>` in its own process (the real CLI: load, base "
             "generation and test loss, training, validation, test, saving final/), then `load_finetuned(run_dir)` "
             "in a fresh process answered the test prompt (system + user turn, greedy, "
             f"{args.max_new_tokens} new tokens; random weights, so the answer is noise). Parameters are "
             "summary.json's; `plan` is `launch/plan_llm.py`'s exact count on the meta device. Peak RSS: the "
             "training process's whole-life maximum resident set (os.wait4), and summary.json's (to the end of "
             "training); planned: hwtools/llm/plan.py's total for device cpu, the same dtype, batch 1 x "
             f"{args.max_length}, which counts tensors only (no Python/torch runtime, no tokenizer). Checkpoint: "
             "the loop's last checkpoint (accelerate save_state: trainable weights, AdamW state, RNG); final: the "
             "adapter or trained layers plus tokenizer.", ""]
    for model, r in results["models"].items():
        w = r.get("written") or {}
        lines += [f"### {model}", "",
                  f"Folder `{Path(r['folder']).name}`: "
                  + ", ".join(f"`{k}` {v / 2**20:.1f} MiB" for k, v in r["files"].items())
                  + (f"; written in {w['seconds']} s" if w.get("seconds") else "") + ".", ""]
        lc = r.get("label_check")
        if lc:
            lines += [f"Labels with its tokenizer and template: {lc['labels_exactly_replies']} of "
                      f"{lc['conversations']} conversations label exactly their assistant replies + end-of-turn "
                      f"({lc['labelled_tokens']} of {lc['tokens']} tokens). First rendered conversation:", "",
                      "```", lc["first_rendered"], "```", ""]
        rows = []
        for method, m in r["methods"].items():
            if "params" not in m:
                why = m.get("skipped") or f"train_llm.py exit {m.get('train', {}).get('exit')}"
                rows.append([method, why] + [""] * 12)
                continue
            p, plan = m["params"], m["plan"]
            reload = m.get("reload", {})
            answer = reload.get("answer")
            rows.append([
                method, f"{p['total']:,}", f"{p['trainable']:,}",
                "yes" if m["counts_match_plan"] else f"no (plan {plan['total']:,} / {plan['trainable']:,})",
                m["train"]["process_peak_rss_mb"], m["peak_rss_train_mb"], plan["memory_mb"]["total"],
                plan["memory_mb"]["weights"], m["step_s"], m["train"]["cpu_s"], m["load_average_1m"],
                m["checkpoint_mb"], m["final_mb"],
                _reload_cell(reload),
                "" if answer is None else repr(answer)])
        lines += [bench.markdown_table(["method", "total params", "trainable", "= plan", "peak RSS MiB",
                                        "peak RSS to end of training", "planned MiB", "planned weights MiB",
                                        "s/step", "process CPU s", "load avg", "checkpoint MiB", "final/ MiB",
                                        "reload", "answer"], rows), ""]
    return "\n".join(lines)


def _reload_cell(reload: dict) -> str:
    if "load_s" not in reload:
        return reload.get("error") or reload.get("skipped") or ""
    cell = f"loaded in {reload['load_s']} s; peak {reload['peak_rss_mb']:.0f} MiB"
    after = reload.get("after_load")
    if after:
        cell += f", {after['rss_mb']:.0f} after loading ({after['file_backed_mb']:.0f} of it file-backed)"
    return cell


@cli_main
def main(argv=None):
    args = parse_config(RealSizeArgs, argv)
    started = time.time()
    machine = bench.machine_info("cpu")
    root = Path(args.root or Path(args.cache_dir) / "real-size").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results = {"models": {}}
    written = {}
    for model in args.models:
        folder = root / folder_name(model, args.num_layers)
        if not is_complete(folder):
            ok, free = wait_for_memory(args.min_free_gb, args.wait_s, log)
            if not ok:
                raise UserError(f"only {free} GB of memory available; writing {model} needs --min-free-gb")
            log(f"writing {model} into {folder}")
            written[model] = in_fresh_process(_write_folder, model, str(folder), args.num_layers, args.cache_dir,
                                              threads=args.threads)
            log(f"  {written[model]['params']:,} parameters in {written[model]['seconds']} s")
    from transformers import AutoTokenizer

    tokenizers = {m: AutoTokenizer.from_pretrained(root / folder_name(m, args.num_layers))
                  for m in args.models}
    data, prompts, checks = write_data(root / "data", tokenizers, args.conversations, args.max_length)
    del tokenizers
    for model in args.models:
        results["models"][model] = bench_model(args, model, root, data, prompts, log)
        results["models"][model]["label_check"] = checks[model]
        results["models"][model]["written"] = written.get(model)
    md, js = bench.write_results(args.output_dir, args.name,
                                 "Gemma-2-2B-it and Llama-3.2-3B-Instruct at full size on CPU (random weights)",
                                 results, markdown(results, args), settings=asdict(args), notes=args.notes,
                                 machine=machine, started_at=started)
    log(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
