"""Tiny random Gemma-2 / Llama / Gemma-3 causal LMs and a tiny byte-level BPE tokenizer, for fast CPU tests (built
with hwtools.llm.tiny, at the sizes and weights the tests expect).

The tokenizer mimics Gemma's: ids 0..3 are <pad>, <eos>, <bos>, <unk>, then <start_of_turn> / <end_of_turn>; it
prepends <bos> like Gemma's and carries the Gemma chat template. The models share its vocabulary and special ids.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwtools.llm.tiny import TINY_ARCHS, SPECIAL_TOKENS, train_bpe_tokenizer  # noqa: F401  (re-exported)
from hwtools.llm.tiny import tiny_config as hwtools_tiny_config

TINY_LAYERS = 6  # enough for partial tuning's 2 + 2 trained layers to leave 2 frozen in the middle
TINY_HIDDEN = 64
TINY_INTERMEDIATE = 128
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_HEAD_DIM = 16
TINY_VOCAB = 512

# Persian and English text so that the BPE merges cover both scripts (the pipeline's data is Persian).
_CORPUS = [
    "به پرسش‌های کاربر به زبان فارسی، دقیق و کامل پاسخ بده.",
    "پایتخت ایران تهران است و پایتخت فرانسه پاریس است.",
    "سلام! چطور می‌توانم کمکت کنم؟ لطفاً سوال خود را بپرس.",
    "آب در دمای صد درجه می‌جوشد و در صفر درجه یخ می‌زند.",
    "کتاب خواندن ذهن را روشن می‌کند و واژگان را گسترش می‌دهد.",
    "یک، دو، سه، چهار، پنج، شش، هفت، هشت، نه، ده.",
    "You are a helpful assistant. Answer the user's question in Persian.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Import this fixture into a test module to run it single-threaded: tiny models gain nothing from threads,
    and with other jobs on the machine OpenMP's spinning threads made a 1 s test take 30 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer (vocab_size entries) with Gemma's special tokens and chat template, prepending
    <bos> like Gemma's."""
    return train_bpe_tokenizer(_CORPUS * 4, vocab_size, prepend_bos=True)


def tiny_config(arch: str, vocab_size: int = TINY_VOCAB):
    """The config of a 6-layer, 64-wide model of `arch` (gemma2 | llama | gemma3) with the tiny tokenizer's ids."""
    return hwtools_tiny_config(arch, vocab_size, hidden_size=TINY_HIDDEN, num_layers=TINY_LAYERS,
                               head_dim=TINY_HEAD_DIM, intermediate_size=TINY_INTERMEDIATE, num_heads=TINY_HEADS,
                               num_kv_heads=TINY_KV_HEADS)


def build_tiny_model(arch: str, vocab_size: int = TINY_VOCAB, seed: int = 0):
    """A randomly initialised fp32 causal LM of `arch` (eager attention, as Gemma-2 requires)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # HF's std 0.02 makes a random model's logits nearly uniform and, with tied embeddings, its greedy output
    # repeats one token; strong layers over weak embeddings give varied generations that depend on their input
    # (what the prefix-tuning and save/load tests compare).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.05 if ("embed" in name or "lm_head" in name) else 0.3)
    return model.eval()


def save_tiny_model(arch: str, out_dir, seed: int = 0) -> Path:
    """Write a tiny model of `arch` and the tiny tokenizer to out_dir (a local model dir) and return its path."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(arch, vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


CHATS = [
    [{"role": "user", "content": "پایتخت ایران کجاست؟"}, {"role": "assistant", "content": "تهران."}],
    [{"role": "system", "content": "به زبان فارسی پاسخ بده."},
     {"role": "user", "content": "آب در چند درجه می‌جوشد؟"},
     {"role": "assistant", "content": "در صد درجه."}],
    [{"role": "user", "content": "یک، دو، سه"}, {"role": "assistant", "content": "چهار، پنج، شش."}],
    [{"role": "user", "content": "سلام!"}, {"role": "assistant", "content": "سلام! چطور می‌توانم کمکت کنم؟"}],
]


def tiny_chat_batch(tokenizer, chats=CHATS) -> dict:
    """A right-padded batch of chats with labels only on the assistant answers (-100 on prompt and padding)."""
    from hwtools.llm.templates import render_chat

    rows = []
    for turns in chats:
        prompt = render_chat(tokenizer, turns[:-1], add_generation_prompt=True)
        full = render_chat(tokenizer, turns)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(p_ids)] == p_ids
        rows.append((ids, [-100] * len(p_ids) + ids[len(p_ids):]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def prompts_of(chats=CHATS) -> list[list[dict]]:
    """The chats without their final assistant turn (generation prompts)."""
    return [turns[:-1] for turns in chats]


def write_llm_cli_inputs(base: Path, rows: int) -> dict:
    """Inputs for fast train_llm.py CLI runs: a tiny saved Gemma-2, the first `rows` of the shipped Persian data and
    one test prompt."""
    from hwtools.llm.data import EMBEDDED_TRAIN
    from hwtools.llm.evaluate import TEST_PROMPTS

    data = base / "persian.jsonl"
    data.write_text("".join(EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines(True)[:rows]), encoding="utf-8")
    prompts = base / "prompts.jsonl"
    prompts.write_text(TEST_PROMPTS.read_text(encoding="utf-8").splitlines(True)[0], encoding="utf-8")
    return {"model": save_tiny_model("gemma2", base / "gemma2"), "data": data, "prompts": prompts}
