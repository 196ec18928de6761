"""results/REPORT.md: the assignment's answers, rebuilt from the committed runs and explore outputs.

The prose lives in hwtools/assets/report_template.md with `{{name}}` placeholders; this module fills them from the
files under results/ (every number through `Quotes`, which records its source) and numbers the figures and tables:
`{{fig:PATH|caption}}` (PATH relative to the repository root, or `@name` for a figure drawn here) and
`{{tab:name|title}}`. Sentences that judge numbers (rankings, over- or underfitting) are generated from the numbers.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from hwtools.report_plots import loss_panels
from hwtools.report_sources import Quotes, errors_md_entries

TEMPLATE = Path(__file__).parent / "assets" / "report_template.md"
REF = "results/reference"
LLM_EXPLORE = "results/explore/llm"
CAP_EXPLORE = "results/explore/caption"
ARCH_MODEL = "gemma-2-2b"

# run folder suffix -> label, in the order of the assignment's parts
LLM_RUNS = {
    "prompt-tuning": "prompt tuning", "prefix-tuning": "prefix tuning", "p-tuning": "P-tuning",
    "lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "qlora": "QLoRA", "lora-chat-tokens": "LoRA + turn tokens",
    "partial": "partial (2 + 2 layers)", "full": "full",
}
SOFT = ["prompt-tuning", "prefix-tuning", "p-tuning"]
LORA_FAMILY = ["lora", "dora", "rslora", "qlora", "lora-chat-tokens"]
ARCHS = {"cnn-rnn": "Show and Tell (CNN-RNN)", "attention": "Show, Attend and Tell", "transformer": "CNN-Transformer"}
MISSING = "(not run)"
PERSIAN = re.compile(r"[\u0600-\u06FF]")


class Context(dict):
    """Placeholder values; each quote recorded since the previous assignment is tagged with the key assigned, so
    quotes behind a value the template does not use can be left out of REPORT.sources.json."""

    def __init__(self, quotes: Quotes):
        super().__init__()
        self.quotes, self.tagged = quotes, 0

    def __setitem__(self, key, value):
        for rec in self.quotes.records[self.tagged:]:
            rec["placeholder"] = key
        self.tagged = len(self.quotes.records)
        super().__setitem__(key, value)


class Report:
    """Collects placeholder values, figures and tables for one build."""

    def __init__(self, root: Path, out_dir: Path):
        self.root, self.out_dir = Path(root), Path(out_dir)
        self.q = Quotes(self.root)
        self.ctx = Context(self.q)
        self.used: set[str] = set()
        self.figures: dict[str, Path] = {}  # @name -> drawn file

    def link(self, repo_path: str) -> str:
        """A repository path as a link relative to the report's folder."""
        return os.path.relpath(self.root / repo_path, self.out_dir).replace(os.sep, "/")

    def has(self, repo_path: str) -> bool:
        return (self.root / repo_path).is_file()

    def get(self, source: str, selector: str, fmt: str = "s") -> str:
        if not self.has(source.split("*")[0]) and "*" not in source:
            return MISSING
        try:
            return self.q.get(source, selector, fmt)
        except (KeyError, IndexError, TypeError, StopIteration, ValueError):
            return MISSING


# ---------------------------------------------------------------------------------------------------- helpers


def summary(name: str) -> str:
    return f"{REF}/{name}/summary.json"


def metrics(name: str) -> str:
    return f"{REF}/{name}/metrics.jsonl"


def generations(name: str) -> str:
    return f"{REF}/{name}/generations.json"


def md_table(header: list[str], rows: list[list[str]], align: Optional[str] = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", sep] + ["| " + " | ".join(r) + " |" for r in rows])


def runs_present(r: Report, names) -> list[str]:
    """The LLM method keys (run folder llm-<key>) whose run is committed."""
    return [n for n in names if r.has(summary(f"llm-{n}"))]


def short(text: str, n: int = 140) -> str:
    text = " ".join((text or "").split()).replace("|", "/")
    return text if len(text) <= n else text[:n] + " …"


def repeats(text: str) -> bool:
    """The answer loops: a run of 1-4 words said three times in a row, or one line three times."""
    words = (text or "").split()
    for n in range(1, 5):
        for i in range(len(words) - 3 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n] == words[i + 2 * n:i + 3 * n]:
                return True
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return any(lines.count(ln) >= 3 for ln in set(lines))


def persian_share(text: str) -> float:
    letters = [c for c in (text or "") if c.isalpha()]
    return sum(bool(PERSIAN.match(c)) for c in letters) / len(letters) if letters else 0.0


def content_overlap(answer: str, reference: str) -> float:
    """Share of the reference's words (3+ letters) that the answer contains."""
    ref = {w for w in re.findall(r"\w+", reference or "") if len(w) >= 3}
    ans = set(re.findall(r"\w+", answer or ""))
    return len(ref & ans) / len(ref) if ref else 0.0


def answer_notes(answer: str, prompt: str, reference: str) -> str:
    """A short verdict on one answer, from checks a reader can redo."""
    notes = []
    user = prompt.split("] ", 1)[-1].split("\n")[0].strip()
    if user and (answer or "").strip().startswith(user[:20]):
        notes.append("repeats the question first")
    if repeats(answer):
        notes.append("loops (repeated words or lines)")
    share = persian_share(answer)
    if share < 0.6:
        notes.append(f"mostly not Persian ({100 * share:.0f}% Persian letters)")
    overlap = content_overlap(answer, reference)
    notes.append(f"has {100 * overlap:.0f}% of the reference's words")
    return "; ".join(notes)


# ---------------------------------------------------------------------------------------------------- LLM parts


def llm_results_table(r: Report, names: list[str]) -> str:
    rows = []
    for n in runs_present(r, names):
        s, g = summary(f"llm-{n}"), generations(f"llm-{n}")
        rows.append([LLM_RUNS[n], r.get(s, "json:/params/trainable", ","), r.get(s, "json:/params/trainable_pct", ".3f"),
                     r.get(s, "json:/train/steps", "d"),
                     r.get(s, "json:/resources/throughput * /resources/train_time_s", "k"),
                     r.get(s, "json:/resources/train_time_s", ".0f"),
                     r.get(s, "json:/resources/peak_memory_mb / 1024", ".1f"),
                     f"{r.get(s, 'json:/test/base_perplexity', '.2f')} → {r.get(s, 'json:/test/perplexity', '.2f')}",
                     f"{r.get(s, 'json:/test/base_chrf', '.1f')} → {r.get(s, 'json:/test/chrf', '.1f')}",
                     r.get(g, "chrfwins:", "d") if r.has(g) else MISSING])
    return md_table(["method", "trainable", "% of params", "steps", "tokens trained", "train time (s)",
                     "peak RSS (GiB)", "test perplexity base → after", "chrF base → after", "prompts with higher chrF"],
                    rows)


def curve_reading(r: Report, n: str) -> str:
    """One generated sentence on a run's loss curves: trend, noise, where validation bottomed out."""
    m = metrics(f"llm-{n}")
    if not r.has(m):
        return f"- **{LLM_RUNS[n]}**: {MISSING}"
    v = r.q.value
    ev_first, ev_last, ev_min = (v(m, f"jsonl:eval:loss:{a}") for a in ("first", "last", "min"))
    evs = [e["loss"] for e in r.q.load(m) if e.get("split") == "eval"]
    if ev_last > ev_min * 1.02:
        verdict = "validation loss rose after its lowest point: the first sign of overfitting"
    elif len(evs) >= 2 and evs[-1] < evs[-2] - 0.01 * evs[-2]:
        verdict = "validation loss was still falling at the last evaluation: under-trained, more steps would help"
    else:
        verdict = "validation loss flattened at the end: little left to gain at this learning rate"
    return (f"- **{LLM_RUNS[n]}**: train loss {r.get(m, 'jsonl:train:loss:q1mean', '.2f')} → "
            f"{r.get(m, 'jsonl:train:loss:q4mean', '.2f')} (mean of the first → last quarter of the logged steps; "
            f"step-to-step spread ±{r.get(m, 'jsonl:train:loss:q4std', '.2f')} in the last quarter); validation "
            f"{r.get(m, 'jsonl:eval:loss:first', '.3f')} → {r.get(m, 'jsonl:eval:loss:last', '.3f')}, lowest "
            f"{r.get(m, 'jsonl:eval:loss:min', '.3f')} at step {r.get(m, 'jsonl:eval:loss:argmin:step', 'd')}; "
            f"{verdict}.")


def prompts_table(r: Report, names: list[str]) -> str:
    """Per-prompt sentence chrF: base, then each method; ↻ marks an answer that loops."""
    names = [n for n in runs_present(r, names) if r.has(generations(f"llm-{n}"))]
    if not names:
        return MISSING
    base_src = generations("llm-lora") if r.has(generations("llm-lora")) else generations(f"llm-{names[0]}")
    base_rows = r.q.load(base_src)
    rows = []
    for i, row in enumerate(base_rows):
        pid = row["id"]
        cells = [pid, r.get(base_src, f"chrf:{pid}:before", ".1f") + (" ↻" if repeats(row["before"])
                                                                                    else "")]
        for n in names:
            after = r.q.load(generations(f"llm-{n}"))[i]
            cells.append(r.get(generations(f"llm-{n}"), f"chrf:{after['id']}:after", ".1f") + (" ↻" if repeats(after["after"])
                                                                                        else ""))
        rows.append(cells)
    return md_table(["prompt", "base"] + [LLM_RUNS[n] for n in names], rows)


def answer_quality_table(r: Report, names: list[str]) -> str:
    """Per method, how many of the test prompts' answers improved on the base's by checks a reader can redo:
    chrF (accuracy), the reference's words (completeness), loops and echoed questions (relevance), length."""
    rows = []
    for n in [n for n in runs_present(r, names) if r.has(generations(f"llm-{n}"))]:
        g = generations(f"llm-{n}")
        gens = r.q.load(g)

        def count(check, side, gens=gens):
            return sum(bool(check(x, side)) for x in gens)

        def loops(x, side):
            return repeats(x[side])

        def echoes(x, side):
            return answer_notes(x[side], x["prompt"], x["reference"]).startswith("repeats the q")

        def persian(x, side):
            return persian_share(x[side]) >= 0.6

        more_words = sum(content_overlap(x["after"], x["reference"]) > content_overlap(x["before"], x["reference"])
                         for x in gens)
        mean_len = {side: sum(len(x[side] or "") for x in gens) / len(gens) for side in ("before", "after")}
        rows.append([LLM_RUNS[n], f"{r.get(g, 'chrfwins:', 'd')} / {len(gens)}", f"{more_words} / {len(gens)}",
                     f"{count(loops, 'before')} → {count(loops, 'after')}",
                     f"{count(echoes, 'before')} → {count(echoes, 'after')}",
                     f"{count(persian, 'before')} → {count(persian, 'after')}",
                     f"{mean_len['before']:.0f} → {mean_len['after']:.0f}"])
    return md_table(["method", "higher chrF than the base", "more of the reference's words", "answers that loop",
                     "answers that repeat the question", "answers mostly in Persian",
                     "mean answer length (characters)"], rows) if rows else MISSING


def turn_token_effect(r: Report) -> str:
    """LoRA with and without the turn markers' embedding rows trained, in one generated sentence."""
    a, b = "lora", "lora-chat-tokens"
    if not (r.has(generations(f"llm-{a}")) and r.has(generations(f"llm-{b}"))):
        return MISSING

    def facts(n):
        s, gens = summary(f"llm-{n}"), r.q.load(generations(f"llm-{n}"))
        return {"ppl": r.get(s, "json:/test/perplexity", ".2f"), "chrf": r.get(s, "json:/test/chrf", ".1f"),
                "trainable": r.get(s, "json:/params/trainable", ","),
                "loops": sum(repeats(x["after"]) for x in gens), "n": len(gens),
                "length": sum(len(x["after"] or "") for x in gens) / len(gens)}

    x, y = facts(a), facts(b)
    return (f"LoRA alone ({x['trainable']} trainable) reached test perplexity {x['ppl']} and chrF {x['chrf']}, with "
            f"{x['loops']} of {x['n']} test answers looping and {x['length']:.0f} characters per answer on average; "
            f"with the two turn-marker rows trained as well ({y['trainable']} trainable) it reached {y['ppl']} and "
            f"{y['chrf']}, {y['loops']} looping answers and {y['length']:.0f} characters per answer")


def answers_list(r: Report, n: str, side: str, limit: int = 160) -> str:
    """Each test prompt with the reference and one run's answer (`before` = the base model), with checks."""
    g = generations(n)
    if not r.has(g):
        return MISSING
    out = []
    for row in r.q.load(g):
        ans = row[side]
        pid = row["id"]
        score = r.get(g, f"chrf:{pid}:{side}", ".1f")
        out.append(f"- **{pid}** ({row['skill']}): {short(row['prompt'], 120)}\n"
                   f"  - reference: {short(row['reference'], limit)}\n"
                   f"  - answer (chrF {score}): {short(ans, limit)}\n"
                   f"  - check: {answer_notes(ans, row['prompt'], row['reference'])}")
    return "\n".join(out)


def best_of(r: Report, names: list[str], key: str, lowest: bool) -> tuple[str, str]:
    """(run name, label) of the run in `names` with the lowest/highest summary value at `key`, recorded."""
    present = runs_present(r, names)
    if not present:
        return "", MISSING
    files = [summary(f"llm-{n}") for n in present]
    scored = [(r.q.value(f, f"json:{key}"), f.split("/")[-2]) for f in files]
    winner = (min if lowest else max)(scored)[1]
    r.q.records.append({"source": files, "selector": f"{'argmin' if lowest else 'argmax'}:{key}",
                        "fmt": "s", "value": winner, "text": LLM_RUNS[winner[4:]]})
    return winner[4:], LLM_RUNS[winner[4:]]


def llm_context(r: Report) -> None:
    c = r.ctx
    st = f"{LLM_EXPLORE}/stats.json"
    c["llm_rows_read"] = r.get(st, "json:/data_report/rows_read", ",")
    c["llm_rows_used"] = r.get(st, "json:/data_report/rows_used", ",")
    c["llm_rows_skipped"] = r.get(st, "json:/data_report/rows_skipped", ",")
    for split in ("train", "validation", "test"):
        c[f"llm_split_{split}"] = r.get(st, f"json:/splits/{split}", ",")
    c["llm_with_system"] = r.get(st, "json:/turns/with_system_prompt", ",")
    c["llm_distinct_system"] = r.get(st, "json:/turns/distinct_system_prompts", ",")
    c["llm_conversations"] = r.get(st, "json:/turns/conversations", ",")
    for p in ("p50", "p90", "p99", "p100"):
        c[f"llm_tokens_{p}"] = r.get(st, f"json:/tokens/tokens/{p}", ",")
    c["llm_tokens_mean"] = r.get(st, "json:/tokens/mean_tokens", ".0f")
    c["llm_tokens_total"] = r.get(st, "json:/tokens/total_tokens", ",")
    c["llm_label_share"] = r.get(st, "json:/tokens/label_token_share * 100", ".0f")
    c["llm_longer_256"] = r.get(st, "json:/tokens/longer_than_256", ",")
    for k in ("max_length", "examples", "tokens", "label_tokens", "packed_blocks"):
        c[f"epoch_{k}"] = r.get(st, f"json:/train_epoch/{k}", ",")
    c["epoch_steps_packed"] = r.get(st, "json:/train_epoch/packed_steps", "d")
    c["epoch_steps_unpacked"] = r.get(st, "json:/train_epoch/padded_steps", "d")
    c["epoch_batch"] = r.get(st, "json:/train_epoch/batch_size", "d")
    c["epoch_tokens_per_packed_step"] = r.get(st, "json:/train_epoch/tokens / /train_epoch/packed_blocks", ".0f")
    if r.has(st):
        stats = r.q.load(st)
        c["llm_schema"] = "```json\n" + json.dumps(stats["schema"], ensure_ascii=False, indent=1) + "\n```"
        roles = stats["turns"]["chars"]
        c["llm_chars_table"] = md_table(
            ["role", "mean characters", "median", "p90", "max"],
            [[role, r.get(st, f"json:/turns/chars/{role}/mean", ".0f"), r.get(st, f"json:/turns/chars/{role}/p50", ","),
              r.get(st, f"json:/turns/chars/{role}/p90", ","), r.get(st, f"json:/turns/chars/{role}/p100", ",")]
             for role in roles])
        c["llm_exchanges"] = ", ".join(f"{k} exchange(s): {r.get(st, f'json:/turns/exchanges_per_conversation/{k}', ',')}"
                                       for k in stats["turns"]["exchanges_per_conversation"])
        c["llm_samples"] = "\n\n".join(
            f"Sample {i}:\n\n" + "\n".join(f"> **{t['role']}**: {short(t['content'], 400)}  " for t in conv)
            for i, conv in enumerate(stats.get("samples", []), start=1))
        c["llm_rendered"] = "```text\n" + stats.get("rendered_sample", MISSING) + "\n```"
        c["llm_top_system"] = "\n".join(f"- ×{n}: {s}" for s, n in stats["turns"]["top_system_prompts"])
        c["llm_first_words"] = ", ".join(f"{w} ({n})" for w, n in stats["turns"]["top_first_words_of_questions"])
    prompts_file = r.root / "hwtools/llm/assets/test_prompts.jsonl"
    prompts = [json.loads(x) for x in prompts_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    c["n_prompts"] = str(len(prompts))
    skills: dict = {}
    for p in prompts:
        skills[p["skill"]] = skills.get(p["skill"], 0) + 1
    c["prompt_skills"] = ", ".join(f"{k} ({v})" for k, v in skills.items())

    # 1-1 base answers (the base answers are the same in every run but QLoRA's 4-bit base: read LoRA's)
    c["base_answers"] = answers_list(r, "llm-lora", "before")
    c["base_chrf"] = r.get(summary("llm-lora"), "json:/test/base_chrf", ".1f")
    c["base_ppl"] = r.get(summary("llm-lora"), "json:/test/base_perplexity", ".1f")
    if r.has(generations("llm-lora")):
        base = r.q.load(generations("llm-lora"))
        c["base_loops"] = str(sum(repeats(x["before"]) for x in base))
        c["base_echo"] = str(sum(answer_notes(x["before"], x["prompt"], x["reference"]).startswith("repeats the q")
                                 for x in base))

    # results tables and readings
    c["tab_all"] = llm_results_table(r, list(LLM_RUNS))
    c["tab_soft"] = llm_results_table(r, SOFT)
    c["tab_lora"] = llm_results_table(r, LORA_FAMILY)
    c["tab_partial"] = llm_results_table(r, ["partial", "full"])
    c["curves_soft"] = "\n".join(curve_reading(r, n) for n in runs_present(r, SOFT))
    c["curves_lora"] = "\n".join(curve_reading(r, n) for n in runs_present(r, LORA_FAMILY))
    c["curves_partial"] = "\n".join(curve_reading(r, n) for n in runs_present(r, ["partial", "full"]))
    c["prompts_soft"] = prompts_table(r, SOFT)
    c["prompts_lora"] = prompts_table(r, LORA_FAMILY)
    c["prompts_partial"] = prompts_table(r, ["partial", "full"])
    c["quality_soft"] = answer_quality_table(r, SOFT)
    c["quality_lora"] = answer_quality_table(r, LORA_FAMILY)
    c["quality_partial"] = answer_quality_table(r, ["partial", "full"])
    c["turn_tokens_effect"] = turn_token_effect(r)
    for group, names in (("soft", SOFT), ("lora", LORA_FAMILY), ("partial", ["partial", "full"]),
                         ("all", list(LLM_RUNS)), ("peft", SOFT + LORA_FAMILY)):
        run, label = best_of(r, names, "/test/perplexity", lowest=True)
        c[f"best_ppl_{group}"] = label
        c[f"best_ppl_{group}_value"] = r.get(summary(f"llm-{run}"), "json:/test/perplexity", ".2f") if run else MISSING
        run2, label2 = best_of(r, names, "/test/chrf", lowest=False)
        c[f"best_chrf_{group}"] = label2
        c[f"best_chrf_{group}_value"] = r.get(summary(f"llm-{run2}"), "json:/test/chrf", ".1f") if run2 else MISSING
        c[f"best_chrf_{group}_run"] = run2
    def beats(a: str, b: str, lower_is_better: bool) -> str:
        try:
            x, y = float(c[a]), float(c[b])
        except ValueError:
            return "cannot be compared with"
        better = x < y if lower_is_better else x > y
        return "beats" if better else ("ties with" if x == y else "does not beat")

    c["lora_vs_soft"] = (
        f"the best LoRA-family run by test perplexity ({c['best_ppl_lora']}, {c['best_ppl_lora_value']}) "
        f"{beats('best_ppl_lora_value', 'best_ppl_soft_value', True)} the best soft prompt "
        f"({c['best_ppl_soft']}, {c['best_ppl_soft_value']}), and by chrF ({c['best_chrf_lora']}, "
        f"{c['best_chrf_lora_value']}) it {beats('best_chrf_lora_value', 'best_chrf_soft_value', False)} "
        f"{c['best_chrf_soft']} ({c['best_chrf_soft_value']})")
    soft_best = c["best_chrf_soft_run"]
    c["answers_soft_best"] = answers_list(r, f"llm-{soft_best}", "after") if soft_best else MISSING
    lora_best = c["best_chrf_lora_run"]
    c["answers_lora_best"] = answers_list(r, f"llm-{lora_best}", "after") if lora_best else MISSING
    c["answers_partial"] = answers_list(r, "llm-partial", "after")
    for n in LLM_RUNS:
        s = summary(f"llm-{n}")
        key = n.replace("-", "_")
        c[f"{key}_ppl"] = r.get(s, "json:/test/perplexity", ".2f")
        c[f"{key}_chrf"] = r.get(s, "json:/test/chrf", ".1f")
        c[f"{key}_trainable"] = r.get(s, "json:/params/trainable", ",")
        c[f"{key}_pct"] = r.get(s, "json:/params/trainable_pct", ".3f")
        c[f"{key}_steps"] = r.get(s, "json:/train/steps", "d")
        c[f"{key}_tokens"] = r.get(s, "json:/resources/throughput * /resources/train_time_s", "k")
        c[f"{key}_mem"] = r.get(s, "json:/resources/peak_memory_mb / 1024", ".1f")
        c[f"{key}_time"] = r.get(s, "json:/resources/train_time_s", ".0f")
    c["qlora_base_ppl"] = r.get(summary("llm-qlora"), "json:/test/base_perplexity", ".1f")
    c["embedded_total"] = r.get(summary("llm-full"), "json:/params/total", ",")
    c["embedded_layers"] = r.get(f"{REF}/llm-lora/config.json", "json:/structure/num_layers", "d")
    c["embedded_hidden"] = r.get(f"{REF}/llm-lora/config.json", "json:/structure/hidden_size", "d")
    cfg = f"{REF}/llm-lora/config.json"
    for k in ("batch_size", "max_length", "seed", "eval_every", "gen_max_new_tokens", "chrf_samples"):
        c[f"ref_{k}"] = r.get(cfg, f"json:/{k}", "d")
    c["ref_epochs"] = r.get(cfg, "json:/epochs", "g")
    c["lr_partial"] = r.get(f"{REF}/llm-partial/config.json", "json:/lr", "g")
    c["lr_lora"] = r.get(cfg, "json:/lr", "g")
    tt, var = "results/bench/trainable_tokens.json", "/results/variants"
    for k, v in (("peft", "lora+tokens-peft"), ("indexed", "lora+tokens-indexed")):
        c[f"tt_{k}_ratio"] = r.get(tt, f"json:{var}/{v}/step_cpu_s/median / {var}/lora/step_cpu_s/median", ".2f")
    c["ref_eval_every_soft"] = r.get(f"{REF}/llm-prompt-tuning/config.json", "json:/eval_every", "d")
    c["lr_table"] = md_table(
        ["method", "learning rate", "LoRA r / alpha", "virtual tokens"],
        [[LLM_RUNS[n], r.get(f"{REF}/llm-{n}/config.json", "json:/lr", "g"),
          (f"{r.get(f'{REF}/llm-{n}/config.json', 'json:/lora_r', 'd')} / "
           f"{r.get(f'{REF}/llm-{n}/config.json', 'json:/lora_alpha', 'g')}" if n in LORA_FAMILY else "-"),
          r.get(f"{REF}/llm-{n}/config.json", "json:/num_virtual_tokens", "d") if n in SOFT else "-"]
         for n in runs_present(r, list(LLM_RUNS))])
    # loss-curve figures drawn here: one small panel per run
    for group, names in (("soft", SOFT), ("lora", LORA_FAMILY), ("partial", ["partial", "full"])):
        present = runs_present(r, names)
        if present:
            from hwtools.report import run_curves

            path = r.out_dir / "report_figures" / f"loss_{group}.png"
            loss_panels({LLM_RUNS[n]: run_curves(r.root / REF / f"llm-{n}") for n in present}, path,
                        xlabel="optimizer step", cols=min(3, len(present)))
            r.figures[f"loss_{group}"] = path


def architecture_context(r: Report) -> None:
    c = r.ctx
    a = f"{LLM_EXPLORE}/architecture_{ARCH_MODEL}.json"
    tree = r.root / LLM_EXPLORE / f"modules_{ARCH_MODEL}.txt"
    c["module_tree"] = "```text\n" + (tree.read_text(encoding="utf-8").rstrip() if tree.is_file() else MISSING) + "\n```"
    c["module_tree_file"] = r.link(f"{LLM_EXPLORE}/modules_{ARCH_MODEL}.txt")
    for k, fmt in (("num_layers", "d"), ("hidden_size", ","), ("intermediate_size", ","), ("num_attention_heads", "d"),
                   ("num_key_value_heads", "d"), ("queries_per_kv_head", "d"), ("head_dim", "d"), ("vocab_size", ","),
                   ("embedding_params", ","), ("embedding_share_pct", ".1f"), ("sliding_window", ","),
                   ("layer_types/sliding_attention", "d"), ("layer_types/full_attention", "d"),
                   ("attn_logit_softcapping", "g"), ("final_logit_softcapping", "g"), ("hidden_activation", "s"),
                   ("norm_class", "s"), ("total_params", ","), ("tie_word_embeddings", "s"), ("rms_norm_eps", "g")):
        c[f"arch_{k.replace('/', '_')}"] = r.get(a, f"json:/facts/{k}", fmt)
    c["arch_first_layer_types"] = ", ".join(r.get(a, f"json:/facts/first_layer_types/{i}") for i in range(4))
    if not r.has(a):
        return
    arch = r.q.load(a)
    c["partial_groups"] = md_table(["module", "trainable parameters"],
                                   [[f"`{g}`", r.get(a, f"json:/partial/groups/{g}", ",")] for g in arch["partial"]["groups"]])
    c["partial_trainable"] = r.get(a, "json:/partial/trainable", ",")
    c["partial_pct"] = r.get(a, "json:/partial/trainable / /facts/total_params", ".2%")
    c["partial_names"] = ", ".join(f"`{n.split('.', 3)[-1]}`" for n in arch["partial"]["parameter_names"]
                                   if n.startswith("model.layers.0."))
    rows = []
    for i, p in enumerate(arch["plan"]["methods"]):
        base = f"json:/plan/methods/{i}"
        rows.append([p["method"], r.get(a, f"{base}/trainable", ","), r.get(a, f"{base}/trainable_pct", ".3f"),
                     r.get(a, f"{base}/memory/weights / 1073741824", ".2f"),
                     r.get(a, f"{base}/memory/optimizer / 1073741824", ".2f"),
                     r.get(a, f"{base}/memory/activations / 1073741824", ".2f"),
                     r.get(a, f"{base}/memory/total / 1073741824", ".2f"),
                     r.get(a, f"{base}/memory/total_gc / 1073741824", ".2f") if p["memory"].get("total_gc") else "-"])
        c[f"plan_{p['method'].replace('-', '_')}_total"] = r.get(a, f"{base}/memory/total / 1073741824", ".1f")
        c[f"plan_{p['method'].replace('-', '_')}_trainable"] = r.get(a, f"{base}/trainable", ",")
        c[f"plan_{p['method'].replace('-', '_')}_pct"] = r.get(a, f"{base}/trainable_pct", ".3f")
        c[f"plan_{p['method'].replace('-', '_')}_act"] = r.get(a, f"{base}/memory/activations / 1073741824", ".2f")
    c["plan_table"] = md_table(["method", "trainable", "%", "weights", "AdamW states", "activations", "total",
                                "total with grad. checkpointing"], rows)
    s = arch["plan"]["settings"]
    c["plan_settings"] = (f"batch {r.get(a, 'json:/plan/settings/batch_size', 'd')} × "
                          f"{r.get(a, 'json:/plan/settings/seq_len', 'd')} tokens, "
                          f"{r.get(a, 'json:/plan/settings/dtype')} weights, {s['attention']} attention, "
                          f"LoRA r = {r.get(a, 'json:/plan/settings/lora_r', 'd')} on {s['target_modules']}, "
                          f"{r.get(a, 'json:/plan/settings/num_virtual_tokens', 'd')} virtual tokens")


# ---------------------------------------------------------------------------------------------------- captions


def caption_context(r: Report) -> None:
    c = r.ctx
    st = f"{CAP_EXPLORE}/stats.json"
    for k, fmt in (("images", ","), ("captions", ","), ("vocab_size", ","), ("word_types_train", ","),
                   ("min_freq", "d"), ("suggested_max_len", "d"), ("mean_length", ".1f"), ("word_types_all", ","),
                   ("word_tokens_all", ","), ("split_images/train", ","), ("split_images/validation", ","),
                   ("split_images/test", ","), ("length_percentiles/p50", "d"), ("length_percentiles/p100", "d")):
        c[f"cap_{k.replace('/', '_')}"] = r.get(st, f"json:/{k}", fmt)
    run_cfg = f"{REF}/caption-attention/config.json"
    c["cap_run_min_freq"] = r.get(run_cfg, "json:/min_freq", "d")
    c["cap_run_max_len"] = r.get(run_cfg, "json:/max_len", "d")
    c["cap_run_beam"] = r.get(run_cfg, "json:/beam_size", "d")
    c["cap_coverage"] = r.get(st, "json:/train_token_coverage * 100", ".2f")
    c["cap_oov"] = r.get(st, "json:/validation_oov_rate * 100", ".2f")
    c["cap_truncated"] = r.get(st, "json:/truncated_at_suggested * 100", ".2f")
    if r.has(st):
        stats = r.q.load(st)
        c["cap_top_words"] = ", ".join(f"{w} ({r.get(st, f'json:/top_words/{i}/1', ',')})"
                                       for i, (w, _) in enumerate(stats["top_words"]))
        c["cap_samples"] = "\n".join(f"{i}. `{s['image']}`: {s['caption']}"
                                     for i, s in enumerate(stats["samples"], start=1))
    enc = f"{CAP_EXPLORE}/encoders.json"
    if r.has(enc):
        rows = []
        for i, e in enumerate(r.q.load(enc)):
            b = f"json:/{i}"
            rows.append([f"`{e['name']}`", " × ".join(r.get(enc, f"{b}/data_config/input_size/{k}", "d") for k in (1, 2)),
                         r.get(enc, f"{b}/pooled_dim", ","),
                         " × ".join(r.get(enc, f"{b}/feature_map_shape/{k}", "d") for k in (2, 3, 1)),
                         " × ".join(r.get(enc, f"{b}/spatial_shape/{k}", ",") for k in (1, 2)),
                         r.get(enc, f"{b}/params", ","), r.get(enc, f"{b}/trainable_with_finetune_blocks", ",")])
        c["encoder_table"] = md_table(["encoder (random weights)", "input", "pooled output", "feature map H × W × C",
                                       "spatial output (regions × channels)", "parameters",
                                       "trained with --finetune-blocks 2"], rows)
        c["enc_pooled"] = r.get(enc, "json:/0/pooled_dim", ",")
        c["enc_h"] = r.get(enc, "json:/0/feature_map_shape/2", "d")
        c["enc_w"] = r.get(enc, "json:/0/feature_map_shape/3", "d")
        c["enc_c"] = r.get(enc, "json:/0/feature_map_shape/1", ",")
        c["enc_regions"] = r.get(enc, "json:/0/spatial_shape/1", "d")
        c["enc_input"] = r.get(enc, "json:/0/data_config/input_size/1", "d")
        c["enc_interp"] = r.get(enc, "json:/0/data_config/interpolation")
        c["enc_mean"] = r.get(enc, "json:/0/data_config/mean/0", "g")
        c["enc_std"] = r.get(enc, "json:/0/data_config/std/0", "g")
        c["enc_crop"] = r.get(enc, "json:/0/data_config/crop_pct", "g")
    archs = [a for a in ARCHS if r.has(summary(f"caption-{a}"))]
    rows, frows = [], []
    for a in archs:
        s = summary(f"caption-{a}")
        rows.append([ARCHS[a], r.get(s, "json:/params/trainable", ","), r.get(s, "json:/resources/train_time_s", ".0f"),
                     r.get(s, "json:/train/final_loss", ".3f"), r.get(s, "json:/eval/loss", ".3f")]
                    + [r.get(s, f"json:/test/{k}", ".3f") for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor",
                                                                     "rouge_l", "cider")]
                    + [r.get(s, "json:/test/beam_bleu4", ".3f")])
        fail = r.q.load(s)["test"].get("failures", {})
        frows.append([ARCHS[a]] + [f"{r.get(s, f'json:/test/failures/{k}', 'd')} "
                                   f"({r.get(s, f'json:/test/failures/{k} / /test/images', '.1%')})"
                                   for k in fail])
        for k in ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "beam_bleu4", "images"):
            c[f"cap_{a.replace('-', '_')}_{k}"] = r.get(s, f"json:/test/{k}", ".3f" if k != "images" else "d")
        c[f"cap_{a.replace('-', '_')}_trainable"] = r.get(s, "json:/params/trainable", ",")
        m = metrics(f"caption-{a}")
        c[f"cap_{a.replace('-', '_')}_curve"] = (
            f"validation loss {r.get(m, 'jsonl:eval:loss:first', '.3f')} after epoch 1 → "
            f"{r.get(m, 'jsonl:eval:loss:last', '.3f')} after epoch {r.get(m, 'jsonl:eval:epoch:last', 'g')}, lowest "
            f"{r.get(m, 'jsonl:eval:loss:min', '.3f')} after epoch {r.get(m, 'jsonl:eval:loss:argmin:epoch', 'g')}; "
            f"train loss {r.get(m, 'jsonl:train:loss:q1mean', '.2f')} → {r.get(m, 'jsonl:train:loss:q4mean', '.2f')}")
        c[f"cap_{a.replace('-', '_')}_epochs"] = r.get(f"{REF}/caption-{a}/config.json", "json:/epochs", "g")
    c["caption_metrics_table"] = md_table(["architecture", "trainable", "train time (s)", "final train loss",
                                           "val loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                           "CIDEr", "BLEU-4 (beam 3)"], rows)
    if archs:
        keys = list(r.q.load(summary(f"caption-{archs[0]}"))["test"].get("failures", {}))
        c["caption_failure_table"] = md_table(["architecture"] + [k.replace("_", " ") for k in keys], frows)
        scored = [(r.q.value(summary(f"caption-{a}"), "json:/test/bleu4"), a) for a in archs]
        best = max(scored)[1]
        r.q.records.append({"source": [summary(f"caption-{a}") for a in archs], "selector": "argmax:/test/bleu4",
                            "fmt": "s", "value": f"caption-{best}", "text": ARCHS[best]})
        c["cap_best_bleu4"] = ARCHS[best]
        scored = [(r.q.value(summary(f"caption-{a}"), "json:/test/failures/wrong_position"), a) for a in archs]
        fewest = min(scored)[1]
        r.q.records.append({"source": [summary(f"caption-{a}") for a in archs],
                            "selector": "argmin:/test/failures/wrong_position", "fmt": "s",
                            "value": f"caption-{fewest}", "text": ARCHS[fewest]})
        c["cap_fewest_position"] = ARCHS[fewest]
    c["side_by_side"] = side_by_side(r, archs)
    d = f"{REF}/caption-attention"
    heat = sorted((r.root / d).glob("attention_*.png"))
    c["attention_heatmap"] = f"{d}/{heat[0].name}" if heat else f"{d}/attention.png"
    for a in archs:
        fails = r.q.load(summary(f"caption-{a}"))["test"].get("failures") or {}
        if fails:
            top = max(fails, key=fails.get)
            c[f"cap_{a.replace('-', '_')}_top_failure"] = (
                f"{top.replace('_', ' ')} ({r.get(summary(f'caption-{a}'), f'json:/test/failures/{top}', 'd')} of "
                f"{r.get(summary(f'caption-{a}'), 'json:/test/images', 'd')} captions)")
            r.q.records.append({"source": [summary(f"caption-{a}")], "selector": "argmax-key:/test/failures",
                                "fmt": "s", "value": top, "text": top.replace("_", " ")})


def side_by_side(r: Report, archs: list[str]) -> str:
    """The same test images, the three captioners' captions: every image among at least two of the runs' ten
    lowest-BLEU-4 lists (errors.md), and the image each run captioned after every epoch."""
    entries = {a: errors_md_entries((r.root / REF / f"caption-{a}" / "errors.md").read_text(encoding="utf-8"))
               for a in archs if (r.root / REF / f"caption-{a}" / "errors.md").is_file()}
    images = sorted({img for e in entries.values() for img in e
                     if sum(img in other for other in entries.values()) >= 2})
    rows = []
    for img in images:
        cells = [f"`{img}`"]
        for a in archs:
            src = f"{REF}/caption-{a}/errors.md"
            if img in entries.get(a, {}):
                cells.append(f"{short(r.get(src, f'errorsmd:{img}:generated'), 90)} "
                             f"(BLEU-4 {r.get(src, f'errorsmd:{img}:bleu4', '.3f')})")
            else:
                cells.append("not among its 10 lowest")
        rows.append(cells)
    sample_row = ["sample image (after the last epoch)"]
    for a in archs:
        events = [e for e in r.q.load(metrics(f"caption-{a}")) if e.get("split") == "sample"]
        if events:
            sample_row[0] = f"`{Path(events[-1]['image']).name}` (per-epoch sample)"
            sample_row.append(short(events[-1]["caption"], 90))
        else:
            sample_row.append(MISSING)
    rows.append(sample_row)
    return md_table(["test image"] + [ARCHS[a] for a in archs], rows, align="l" * (len(archs) + 1))


# ---------------------------------------------------------------------------------------------------- rendering


def render(r: Report, template: str) -> str:
    counters = {"fig": 0, "tab": 0}
    missing_links = []

    def figure(m):
        path, _, caption = m.group(1).partition("|")
        if path.startswith("$"):
            r.used.add(path[1:])
            path = r.ctx.get(path[1:], MISSING)
        counters["fig"] += 1
        if path.startswith("@"):
            target = r.figures.get(path[1:])
            link = os.path.relpath(target, r.out_dir).replace(os.sep, "/") if target else path
        else:
            link = r.link(path)
            if not r.has(path):
                missing_links.append(path)
        return f"![Figure {counters['fig']}]({link})\n\n*Figure {counters['fig']}. {caption.strip()}*"

    def table(m):
        name, _, title = m.group(1).partition("|")
        r.used.add(name.strip())
        counters["tab"] += 1
        return f"*Table {counters['tab']}. {title.strip()}*\n\n{r.ctx.get(name.strip(), MISSING)}"

    def value(m):
        key = m.group(1).strip()
        if key.startswith("link:"):
            return r.link(key[5:])
        r.used.add(key)
        if key not in r.ctx:
            raise KeyError(f"report template: no value for {{{{{key}}}}}")
        return r.ctx[key]

    text = re.sub(r"\{\{fig:(.*?)\}\}", figure, template, flags=re.S)
    text = re.sub(r"\{\{tab:(.*?)\}\}", table, text, flags=re.S)
    text = re.sub(r"\{\{(.*?)\}\}", value, text)
    if missing_links:
        text += "\n\n*Missing figures: " + ", ".join(missing_links) + "*\n"
    return text


def build_report(root: Path, out_dir: Path, template: Optional[Path] = None) -> Path:
    """Write out_dir/REPORT.md and out_dir/REPORT.sources.json (every quoted value with its source)."""
    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    r = Report(root, out_dir)
    llm_context(r)
    architecture_context(r)
    caption_context(r)
    text = render(r, (template or TEMPLATE).read_text(encoding="utf-8"))
    out = out_dir / "REPORT.md"
    out.write_text(text, encoding="utf-8")
    used = [rec for rec in r.q.records if rec.get("placeholder") in r.used]
    (out_dir / "REPORT.sources.json").write_text(
        json.dumps(used, ensure_ascii=False, indent=0, default=str) + "\n", encoding="utf-8")
    return out
