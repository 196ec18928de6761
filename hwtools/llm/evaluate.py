"""Answer quality before/after fine-tuning: the fixed Persian test prompts, chrF on the test split, test loss."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from hwtools.errors import UserError
from hwtools.llm.data import ROLE_ALIASES

TEST_PROMPTS = Path(__file__).parent / "assets" / "test_prompts.jsonl"


def load_test_prompts(path: Optional[str] = None) -> list[dict]:
    """The Persian test prompts: [{id, skill, turns (ending with a user turn), reference}] from a JSONL file."""
    path = Path(path) if path else TEST_PROMPTS
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = [{"role": ROLE_ALIASES[t["from"]], "content": t["value"]} for t in row["conversations"]]
            prompts.append({"id": row["id"], "skill": row.get("skill", ""), "turns": turns,
                            "reference": row["reference"]})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{i}: not a test prompt row ({e})") from None
        if turns[-1]["role"] != "user":
            raise UserError(f"{path}:{i}: a test prompt must end with a user turn")
    return prompts


def prompt_and_reference(turns: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant reply: (turns to answer, the reference reply)."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:last], turns[last]["content"]


def generate_shared(model, tokenizer, conversations: list[list[dict]], gen_kwargs: dict, accelerator=None) -> list[str]:
    """generate_answers over `conversations`, each process answering its own share when there are several (the
    answers are gathered, in order, on every process). A model sharded by FSDP / DeepSpeed needs every rank in
    every forward pass: there (gen_kwargs["together"]) all ranks answer everything together."""
    from hwtools.llm.generate import generate_answers

    gen_kwargs = dict(gen_kwargs)
    together = gen_kwargs.pop("together", False)
    if accelerator is None or accelerator.num_processes == 1 or together:
        return generate_answers(model, tokenizer, conversations, **gen_kwargs)
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(list(conversations)) as mine:
        answers = generate_answers(model, tokenizer, mine, **gen_kwargs) if mine else []
    return gather_object(answers)


def shards_weights(accelerator) -> bool:
    """Whether a prepared model's weights are split across ranks (FSDP, DeepSpeed) rather than whole on each."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def answer_prompts(model, tokenizer, prompts: list[dict], gen_kwargs: dict, accelerator=None) -> list[str]:
    """Generate answers to the test prompts with fixed decoding settings (split across processes, see
    generate_shared)."""
    return generate_shared(model, tokenizer, [p["turns"] for p in prompts], gen_kwargs, accelerator)


def chrf_on_conversations(model, tokenizer, convs: list[list[dict]], n: int, gen_kwargs: dict,
                          accelerator=None) -> dict:
    """chrF of generated answers to the first `n` conversations' last user turn against their reference reply."""
    from hwtools.metrics import chrf

    pairs = [prompt_and_reference(t) for t in convs[: max(n, 0)]]
    if not pairs:
        return {"chrf": None, "n": 0, "samples": []}
    hyps = generate_shared(model, tokenizer, [p for p, _ in pairs], gen_kwargs, accelerator)
    refs = [r for _, r in pairs]
    samples = [{"prompt": p[-1]["content"], "reference": r, "answer": h} for (p, r), h in zip(pairs, hyps)]
    return {"chrf": chrf(hyps, refs), "n": len(pairs), "samples": samples}


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", "<br>")


def write_generations(run_dir: Path, prompts: list[dict], before: list[str], after: Optional[list[str]]) -> Path:
    """generations.md (prompt | reference | before | after) and generations.json with the same data."""
    after = after if after is not None else [None] * len(prompts)
    rows = []
    for p, b, a in zip(prompts, before, after):
        prompt = "\n".join(f"[{t['role']}] {t['content']}" for t in p["turns"])
        rows.append({"id": p["id"], "skill": p["skill"], "prompt": prompt, "reference": p["reference"],
                     "before": b, "after": a})
    (Path(run_dir) / "generations.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    lines = ["# Persian test prompts: base model (before) vs fine-tuned (after)", "",
             "| id | skill | prompt | reference | before | after |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['skill']} | {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['before'])} | "
              f"{_cell(r['after']) if r['after'] is not None else '-'} |" for r in rows]
    md = Path(run_dir) / "generations.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
