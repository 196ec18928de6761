"""The architecture configs of the models this project targets, as in their official config.json files.

They let the planner build the real architecture on the meta device with no network and no weights. Only the
fields that shape the network (and the special token ids) are kept; the rest are transformers' defaults.
Parameter counts they give (checked in tests/test_plan.py): Gemma-2-2B 2,614,341,888; Llama-3.2-3B 3,212,749,824;
Gemma-3-270M 268,098,176.
"""
from __future__ import annotations

from typing import Optional

# google/gemma-2-2b and google/gemma-2-2b-it (same architecture; -it adds <end_of_turn> = 107 as an eos)
GEMMA_2_2B = {
    "model_type": "gemma2",
    "architectures": ["Gemma2ForCausalLM"],
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

# meta-llama/Llama-3.2-3B and meta-llama/Llama-3.2-3B-Instruct (same architecture)
LLAMA_3_2_3B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# google/gemma-3-270m: the architecture of the embedded default (the PyPI GGUF is this model, quantised)
GEMMA_3_270M = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

# short names and the hub ids whose architecture is one of the constants above
KNOWN_CONFIGS = {
    "gemma-2-2b": GEMMA_2_2B,
    "google/gemma-2-2b": GEMMA_2_2B,
    "google/gemma-2-2b-it": GEMMA_2_2B,
    "llama-3.2-3b": LLAMA_3_2_3B,
    "meta-llama/Llama-3.2-3B": LLAMA_3_2_3B,
    "meta-llama/Llama-3.2-3B-Instruct": LLAMA_3_2_3B,
    "gemma-3-270m": GEMMA_3_270M,
    "google/gemma-3-270m": GEMMA_3_270M,
    "google/gemma-3-270m-it": GEMMA_3_270M,
}


def known_config(name: str) -> Optional["PretrainedConfig"]:  # noqa: F821 - transformers is imported lazily
    """The transformers config of a known model name or hub id (case-insensitive), else None."""
    from transformers import AutoConfig

    fields = {k.lower(): v for k, v in KNOWN_CONFIGS.items()}.get(name.lower())
    if fields is None:
        return None
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
