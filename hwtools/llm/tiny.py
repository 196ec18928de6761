"""Tiny stand-ins for the real models, for benchmarks and tests that cannot download any: a byte-level BPE tokenizer
with Gemma's special tokens and chat template, and small configs of the architectures the recipe trains (Gemma-2,
Llama, Gemma-3) with that tokenizer's ids."""
from __future__ import annotations

from typing import Optional

TINY_ARCHS = ("gemma2", "llama", "gemma3")
# Gemma's order: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then the turn markers
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def train_bpe_tokenizer(texts: list[str], vocab_size: int, prepend_bos: bool = False):
    """A byte-level BPE tokenizer trained on `texts`, with Gemma's special tokens and chat template; `prepend_bos`:
    it prepends <bos> to what it encodes, as Gemma's does (otherwise only the chat template writes it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if prepend_bos:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 6, head_dim: int = 16,
                intermediate_size: Optional[int] = None, num_heads: Optional[int] = None,
                num_kv_heads: Optional[int] = None, sliding_window: int = 32, max_position_embeddings: int = 512):
    """A small config of `arch` (gemma2 | llama | gemma3) with the tiny tokenizer's special ids. Unset sizes take
    Gemma-2-2B's ratios: a 4x MLP, hidden / head_dim query heads and half as many KV heads. Gemma-2 keeps its
    soft-capping (eager attention applies it); Gemma-3 gets a final soft-cap the real one lacks, so the loss's
    soft-capping path runs on two architectures."""
    heads = num_heads or max(1, hidden_size // head_dim)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=heads,
                  num_key_value_heads=num_kv_heads or max(1, heads // 2), head_dim=head_dim,
                  max_position_embeddings=max_position_embeddings, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(**common, query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        # Gemma-3's 5 sliding : 1 full layer pattern
        return Gemma3TextConfig(**common, query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
                                final_logit_softcapping=20.0)
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
