"""What the report says about a model's architecture, read from code: the module tree built on the meta device, the
config facts behind it, what partial fine-tuning trains and the planner's numbers (no weights, no network)."""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

import torch

from hwtools.llm.methods import MethodConfig, apply_method
from hwtools.llm.plan import build_meta_model, default_attention, plan_methods
from hwtools.train.meters import count_parameters


def module_tree(model: torch.nn.Module) -> str:
    """PyTorch's own printout of the model (repeated decoder layers folded as `(0-25): 26 x ...`)."""
    return str(model)


def architecture_facts(config, model: torch.nn.Module) -> dict:
    """The config fields that define the architecture, with the counts and layer kinds they imply."""
    text = getattr(config, "text_config", config)
    layer_types = list(getattr(text, "layer_types", None) or [])
    counts = count_parameters(model)
    embed = model.get_input_embeddings().weight
    return {
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "num_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "queries_per_kv_head": text.num_attention_heads // text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", text.hidden_size // text.num_attention_heads),
        "vocab_size": text.vocab_size,
        "embedding_params": int(embed.numel()),
        "embedding_share_pct": 100.0 * embed.numel() / counts["total"],
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "sliding_window": getattr(text, "sliding_window", None),
        "layer_types": dict(Counter(layer_types)),
        "first_layer_types": layer_types[:4],
        "attn_logit_softcapping": getattr(text, "attn_logit_softcapping", None),
        "final_logit_softcapping": getattr(text, "final_logit_softcapping", None),
        "hidden_activation": getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None),
        "rms_norm_eps": getattr(text, "rms_norm_eps", None),
        "norm_class": type(model.model.norm).__name__,
        "total_params": counts["total"],
    }


def trained_modules(model: torch.nn.Module) -> dict:
    """{module prefix: trainable parameter count}, grouped at the decoder-layer level (`model.layers.0`) and at
    top-level modules otherwise; plus the total."""
    groups: Counter = Counter()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        key = ".".join(parts[:3]) if len(parts) > 2 and parts[1] == "layers" else ".".join(parts[:-1])
        groups[key] += p.numel()
    return {"groups": dict(groups), "trainable": int(sum(groups.values())),
            "parameter_names": [n for n, p in model.named_parameters() if p.requires_grad]}


def explore_model(config, *, batch_size: int = 1, seq_len: int = 512, dtype=torch.bfloat16) -> dict:
    """Module tree, architecture facts, partial fine-tuning's trained modules and the planner's numbers for
    every method, all from the meta-device model of `config`."""
    attention = default_attention(config)
    model = build_meta_model(config, dtype, attention)
    facts = architecture_facts(config, model)
    tree = module_tree(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        partial = apply_method(model, MethodConfig(method="partial"), None, log=None)
    trained = trained_modules(partial)
    base = MethodConfig(trainable_tokens="none")
    plans = plan_methods(config, base, batch_size=batch_size, seq_len=seq_len, dtype=dtype, attention=attention,
                         device="cuda")
    settings = {"batch_size": batch_size, "seq_len": seq_len, "dtype": str(dtype).replace("torch.", ""),
                "attention": attention, "device": "cuda", **{k: v for k, v in dataclasses.asdict(base).items()
                                                            if k != "prompt_init_text"}}
    return {"facts": facts, "tree": tree, "partial": trained, "plan": {"settings": settings, "methods": plans}}


def encoder_shapes(names, finetune_blocks: int = 2) -> list[dict]:
    """For each timm encoder name (random weights: shapes do not depend on them): pooled and spatial output shapes
    for one image at its default input size, the preprocessing timm prescribes, and the parameters that train when
    the last `finetune_blocks` blocks are unfrozen."""
    from hwtools.caption.encoders import build_encoder

    rows = []
    for name in names:
        row = {"name": name}
        for kind in ("pooled", "spatial"):
            enc, data_config, dim = build_encoder(name, output=kind, pretrained=False, log=None)
            with torch.no_grad():
                row[f"{kind}_shape"] = list(enc(torch.zeros(1, *data_config["input_size"])).shape)
            row[f"{kind}_dim"] = int(dim)
        feats = enc.backbone.forward_features(torch.zeros(1, *data_config["input_size"]))
        row["feature_map_shape"] = list(feats.shape)
        row["data_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
        row["params"] = sum(p.numel() for p in enc.parameters())
        tuned, _, _ = build_encoder(name, output="spatial", pretrained=False, finetune_blocks=finetune_blocks,
                                    log=None)
        row["finetune_blocks"] = finetune_blocks
        row["trainable_with_finetune_blocks"] = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
        row["finetuned_modules"] = list(tuned.trainable_modules)
        rows.append(row)
    return rows
