"""Fine-tuning methods: PEFT soft prompts and the LoRA family, QLoRA, partial (first/last layers) and full tuning.

`apply_method(model, cfg)` turns a loaded base model into the trainable model of `cfg.method`; `save_finetuned` and
`load_finetuned` write and rebuild it (`final/`) for generation.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from hwtools.errors import UserError
from hwtools.llm.models import EMBEDDED, find_decoder_layers, load_model_and_tokenizer, unwrap_model
from hwtools.train.meters import count_parameters, numel_of

# The method table, as PEFT maps a PeftType to its tuner and timm registers models: name -> builder(model, cfg,
# tokenizer, token ids of PEFT trainable tokens) -> the trainable model. Its order is the CLI's.
METHOD_BUILDERS: dict[str, Callable] = {
    "prompt-tuning": lambda model, cfg, tokenizer, ids: build_prompt_tuning(model, cfg, tokenizer),
    "prefix-tuning": lambda model, cfg, tokenizer, ids: build_prefix_tuning(model, cfg, tokenizer),
    "p-tuning": lambda model, cfg, tokenizer, ids: build_p_tuning(model, cfg),
    "lora": lambda model, cfg, tokenizer, ids: build_lora(model, cfg, token_ids=ids),
    "dora": lambda model, cfg, tokenizer, ids: build_lora(model, cfg, use_dora=True, token_ids=ids),
    "rslora": lambda model, cfg, tokenizer, ids: build_lora(model, cfg, use_rslora=True, token_ids=ids),
    "qlora": lambda model, cfg, tokenizer, ids: build_qlora(model, cfg, token_ids=ids),
    "partial": lambda model, cfg, tokenizer, ids: build_partial(model, cfg),
    "full": lambda model, cfg, tokenizer, ids: build_full(model),
}
METHODS = tuple(METHOD_BUILDERS)
SOFT_PROMPT_METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning")
LORA_METHODS = ("lora", "dora", "rslora", "qlora")
PEFT_METHODS = SOFT_PROMPT_METHODS + LORA_METHODS
DEFAULT_PROMPT_INIT_TEXT = "به پرسش‌های کاربر به زبان فارسی، دقیق و کامل پاسخ بده."
FINETUNE_META = "finetune.json"
PARTIAL_WEIGHTS = "partial_layers.safetensors"
# the turn markers of the chat formats hwtools renders (Gemma, Llama-3); --trainable-tokens chat picks those in the vocab
CHAT_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class MethodConfig:
    """The fine-tuning method and its knobs (every field is a CLI flag of the LLM recipe)."""

    method: str = field(default="lora", metadata={"help": f"Fine-tuning method: {', '.join(METHODS)}."})
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "Virtual tokens of prompt tuning, prefix tuning and P-tuning."}
    )
    prompt_init_text: str = field(
        default=DEFAULT_PROMPT_INIT_TEXT,
        metadata={"help": "Prompt tuning starts from this text's embeddings, prefix tuning from its keys/values in "
                          "every layer (empty: PEFT's random start)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (lora, dora, rslora, qlora)."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha (scale alpha/r, or alpha/sqrt(r) for rslora)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata={"help": "Comma-separated module names LoRA adapts, or all-linear."},
    )
    trainable_tokens: str = field(
        default="auto",
        metadata={"help": "LoRA family: also train these tokens' embedding rows (PEFT trainable tokens): 'auto' (the "
                  "chat turn markers when this checkpoint never trained them, judged from their embedding rows), "
                  "'chat' (the turn markers), 'none', or comma-separated tokens."},
    )
    unfreeze_first: int = field(default=2, metadata={"help": "partial: train the first N decoder layers."})
    unfreeze_last: int = field(default=2, metadata={"help": "partial: train the last N decoder layers."})


# usual starting points (PEFT's examples, the LoRA/QLoRA papers): soft prompts need far larger steps than weights
DEFAULT_LR = {
    "prompt-tuning": 3e-2,
    "prefix-tuning": 1e-2,
    "p-tuning": 1e-3,
    "lora": 2e-4,
    "dora": 2e-4,
    "rslora": 1e-4,  # alpha/sqrt(r) scales the update up by sqrt(r) relative to LoRA
    "qlora": 2e-4,
    "partial": 5e-5,
    "full": 2e-5,
}


def default_lr(method: str) -> float:
    """The peak learning rate used for `method` when --lr is not given."""
    if method not in DEFAULT_LR:
        raise UserError(f"--method {method}: unknown method; choose one of {', '.join(METHODS)}")
    return DEFAULT_LR[method]


def is_soft_prompt(method: str) -> bool:
    """Whether `method` adds virtual tokens (prompt tuning, prefix tuning, P-tuning)."""
    return method in SOFT_PROMPT_METHODS


def needs_4bit(method: str) -> bool:
    """Whether the base model must be loaded NF4-quantised for `method`."""
    return method == "qlora"


def supports_gradient_checkpointing(method: str) -> bool:
    """False for prefix tuning: transformers drops the cache under gradient checkpointing, and the prefix with it."""
    return method != "prefix-tuning"


def check_method_config(cfg: MethodConfig) -> None:
    """Raise UserError for an unknown method or an impossible knob value."""
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method}: unknown method; choose one of {', '.join(METHODS)}")
    if cfg.method in SOFT_PROMPT_METHODS and cfg.num_virtual_tokens < 1:
        raise UserError(f"--num-virtual-tokens {cfg.num_virtual_tokens}: must be at least 1")
    if cfg.method in LORA_METHODS:
        if cfg.lora_r < 1:
            raise UserError(f"--lora-r {cfg.lora_r}: must be at least 1")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")
        if not parse_target_modules(cfg.target_modules):
            raise UserError("--target-modules is empty; name modules (e.g. q_proj,v_proj) or use all-linear")
    if explicit_trainable_tokens(cfg.trainable_tokens) and cfg.method not in LORA_METHODS:
        raise UserError(f"--trainable-tokens works with {', '.join(LORA_METHODS)} (PEFT trainable tokens), "
                        f"not with --method {cfg.method}")
    if cfg.method == "partial" and (cfg.unfreeze_first < 0 or cfg.unfreeze_last < 0):
        raise UserError("--unfreeze-first / --unfreeze-last must not be negative")


def parse_target_modules(text: str):
    """"q_proj, v_proj" -> ["q_proj", "v_proj"]; "all-linear" stays a string (PEFT's shortcut)."""
    if text.strip() == "all-linear":
        return "all-linear"
    return [t.strip() for t in text.split(",") if t.strip()]


def explicit_trainable_tokens(text: str) -> bool:
    """Whether --trainable-tokens names tokens itself ('chat' or a list), rather than 'auto' or 'none'."""
    return text.strip().lower() not in ("", "auto", "none")


def resolve_trainable_tokens(text: str, tokenizer) -> list[int]:
    """Token ids for an explicit --trainable-tokens: 'chat' = the chat turn markers in the vocab, else comma-separated
    tokens; 'auto' and 'none' give [] here (see choose_trainable_tokens)."""
    text = text.strip()
    if not explicit_trainable_tokens(text):
        return []
    if tokenizer is None:
        raise UserError("--trainable-tokens needs the tokenizer to find the tokens (pass it to apply_method)")
    vocab = tokenizer.get_vocab()
    if text == "chat":
        ids = [vocab[t] for t in CHAT_TURN_TOKENS if t in vocab]
        if not ids:
            raise UserError(f"--trainable-tokens chat: the tokenizer has none of {', '.join(CHAT_TURN_TOKENS)}")
        return ids
    ids = []
    for token in (t.strip() for t in text.split(",")):
        if token not in vocab:
            raise UserError(f"--trainable-tokens: {token!r} is not one token of this tokenizer's vocabulary")
        ids.append(vocab[token])
    return sorted(set(ids))


# An embedding row that pretraining never updated keeps its initial value: zero (Llama-3's reserved tokens) or the
# value shared by every other untouched row (the base Gemma-3-270M's <end_of_turn> sits among hundreds of unused
# tokens at cosine > 0.99 to each other). A trained token has no such twins.
UNTRAINED_COSINE = 0.99
UNTRAINED_TWINS = 16
UNTRAINED_NORM_FRACTION = 0.05


@torch.no_grad()
def untrained_rows(weight: torch.Tensor, ids: list[int], chunk: int = 32768) -> dict[int, dict]:
    """For each row id of an embedding matrix: {"twins": rows at cosine > UNTRAINED_COSINE, "norm_ratio": its norm
    over the median row norm, "untrained": bool}, judged as in the comment above."""
    if not ids:
        return {}
    probe = weight[ids].float()
    probe_unit = probe / probe.norm(dim=1, keepdim=True).clamp_min(1e-12)
    twins = torch.zeros(len(ids), dtype=torch.long)
    norms = []
    for start in range(0, weight.shape[0], chunk):  # chunks: a bf16 weight is never copied whole to fp32
        rows = weight[start : start + chunk].float()
        n = rows.norm(dim=1)
        norms.append(n)
        cos = (rows @ probe_unit.T) / n.clamp_min(1e-12)[:, None]
        twins += (cos > UNTRAINED_COSINE).sum(dim=0).cpu()
    median = torch.cat(norms).median().clamp_min(1e-12)
    out = {}
    for j, i in enumerate(ids):
        ratio = float(probe[j].norm() / median)
        n_twins = int(twins[j]) - 1  # the row itself
        out[i] = {"twins": n_twins, "norm_ratio": ratio,
                  "untrained": ratio < UNTRAINED_NORM_FRACTION or n_twins >= UNTRAINED_TWINS}
    return out


@dataclass
class TokenChoice:
    """Which embedding rows a LoRA-family run also trains, and one line saying why."""

    ids: list[int]
    tokens: list[str]
    reason: str


def choose_trainable_tokens(cfg: MethodConfig, model: Optional[nn.Module], tokenizer) -> TokenChoice:
    """The rows --trainable-tokens asks for. 'auto': the chat turn markers, if this checkpoint never trained any of
    them (untrained_rows) and the method can train rows (LoRA family); otherwise none."""
    text = cfg.trainable_tokens.strip()
    if explicit_trainable_tokens(text):
        ids = resolve_trainable_tokens(text, tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(ids)
        return TokenChoice(ids, tokens, f"trainable tokens: {', '.join(tokens)} (--trainable-tokens {text})")
    if text.lower() == "none":
        return TokenChoice([], [], "trainable tokens: none (--trainable-tokens none)")
    if cfg.method not in LORA_METHODS:
        return TokenChoice([], [], f"trainable tokens (auto): none, {cfg.method} cannot train embedding rows")
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    markers = [t for t in CHAT_TURN_TOKENS if t in vocab]
    if model is None or not markers:
        return TokenChoice([], [], "trainable tokens (auto): none, the vocabulary has no chat turn markers")
    weight = unwrap_model(model).get_input_embeddings().weight
    if weight.device.type == "meta":
        return TokenChoice([], [], "trainable tokens (auto): none, the weights are not loaded")
    stats = untrained_rows(weight, [vocab[t] for t in markers])
    untrained = [t for t in markers if stats[vocab[t]]["untrained"]]
    if not untrained:
        return TokenChoice([], [], f"trainable tokens (auto): none, the turn markers {', '.join(markers)} are "
                                   f"trained embedding rows")
    why = ", ".join(f"{t} ({_untrained_evidence(stats[vocab[t]])})" for t in untrained)
    return TokenChoice([vocab[t] for t in markers], markers,
                       f"trainable tokens (auto): {', '.join(markers)}, because this checkpoint never trained {why}; "
                       f"--trainable-tokens none turns this off")


def _untrained_evidence(stat: dict) -> str:
    if stat["norm_ratio"] < UNTRAINED_NORM_FRACTION:
        return f"its embedding row is {stat['norm_ratio']:.3f}x the median row norm"
    return f"{stat['twins']:,} other embedding rows at cosine > {UNTRAINED_COSINE}: the never-trained cluster"


# ---- builders: one per method family --------------------------------------------------------------------------


def build_prompt_tuning(model: nn.Module, cfg: MethodConfig, tokenizer=None) -> nn.Module:
    """PEFT prompt tuning; the virtual tokens start as the embeddings of cfg.prompt_init_text (needs the tokenizer)."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    if cfg.prompt_init_text and getattr(tokenizer, "name_or_path", ""):
        # PEFT re-loads the tokenizer by name (a dir or hub id) to tokenize the init text
        init = dict(
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=cfg.prompt_init_text,
            tokenizer_name_or_path=tokenizer.name_or_path,
        )
    else:
        init = dict(prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)  # vocabulary-scale random start
    peft_cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, **init)
    return get_peft_model(model, peft_cfg)


def build_prefix_tuning(model: nn.Module, cfg: MethodConfig, tokenizer=None) -> nn.Module:
    """PEFT prefix tuning: trained keys/values for every layer (generate with use_cache=False, see generate.py),
    starting as the base model's own keys/values of cfg.prompt_init_text when a tokenizer is given."""
    from peft import PrefixTuningConfig, get_peft_model

    init_ids = None
    if cfg.prompt_init_text and tokenizer is not None:
        init_ids = prefix_init_ids(tokenizer, cfg.prompt_init_text, cfg.num_virtual_tokens)
        init = _keys_values_of(model, init_ids)  # from the plain model, before PEFT wraps it
    peft_model = get_peft_model(
        model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    )
    if init_ids is not None:
        weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        if init.shape != weight.shape:
            raise UserError(f"prefix init: keys/values of shape {tuple(init.shape)} do not fit PEFT's prefix "
                            f"{tuple(weight.shape)}; pass --prompt-init-text '' for a random start")
        with torch.no_grad():
            weight.copy_(init.to(weight.dtype))
    return peft_model


def prefix_init_ids(tokenizer, text: str, n: int) -> list[int]:
    """n token ids: <bos> (Gemma's attention sink: a prefix without it starts from outlier activations), then the
    text's tokens, repeated or cut to fit."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("--prompt-init-text tokenizes to nothing")
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = (ids * (n // len(ids) + 1))[: max(n - len(head), 0)]
    return (head + body)[:n]


def _keys_values_of(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's keys and values of `ids` in PEFT's prefix layout (tokens, layers x [key, value] x heads x dim):
    the prefix then acts exactly as if the text preceded every input."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()  # no dropout in the starting point
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    model.train(was_training)
    cache = out["cache"] if "cache" in out else out.past_key_values  # newer transformers renamed the field
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, heads, n, dim)
    kv = torch.cat(per_layer)  # (layers*2, heads, n, dim)
    return kv.permute(2, 0, 1, 3).reshape(len(ids), -1)


def build_p_tuning(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """PEFT P-tuning: virtual tokens produced by an MLP prompt encoder."""
    from peft import PromptEncoderConfig, get_peft_model

    return get_peft_model(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens))


def build_lora(
    model: nn.Module,
    cfg: MethodConfig,
    *,
    use_dora: bool = False,
    use_rslora: bool = False,
    token_ids: Optional[list[int]] = None,
) -> nn.Module:
    """PEFT LoRA on cfg.target_modules; DoRA (magnitude/direction) and rsLoRA (alpha/sqrt(r)) are its variants.
    token_ids: embedding rows trained as well (PEFT trainable tokens; a tied output head shares them)."""
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=parse_target_modules(cfg.target_modules),
        use_dora=use_dora,
        use_rslora=use_rslora,
        trainable_token_indices=list(token_ids) if token_ids else None,
    )
    try:
        return use_indexed_trainable_tokens(get_peft_model(model, lora_cfg))
    except ValueError as e:
        if "not found in the base model" not in str(e) and "Target module" not in str(e):
            raise
        modules = unwrap_model(model).named_modules()
        names = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, nn.Linear)})
        raise UserError(
            f"--target-modules {cfg.target_modules}: not in this model; its linear layers are {', '.join(names)}"
        ) from None


def use_indexed_trainable_tokens(model: nn.Module) -> nn.Module:
    """Give every PEFT trainable-tokens layer of `model` a forward that never builds the full-size weight.

    PEFT's own forward copies the whole weight with the trained rows swapped in (`index_copy`) on every call, so
    backward also forms a dense weight-sized gradient: for a tied 262k x 640 embedding and LM head that is a 671 MB
    copy per call and, for the head, a second vocabulary-sized matmul per loss chunk. Here the frozen weight serves
    every row and the few trained rows are put in by index: same values, same gradients (tested), a fraction of the
    work. Saving, merging and loading stay PEFT's."""
    from types import MethodType

    from peft.tuners.trainable_tokens import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            module.forward_adapters = MethodType(_indexed_forward_adapters, module)
    return model


def _indexed_forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
    base = self.base_layer
    plain = self.disable_adapters or not active_adapters or self.merged
    if plain or not isinstance(base, (nn.Embedding, nn.Linear)):
        return type(self).forward_adapters(self, x, active_adapters, *args, **kwargs)
    self._check_overlapping_tokens(active_adapters)
    weight = base.weight
    if isinstance(base, nn.Embedding):
        result = F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                             norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        for name in active_adapters:
            delta = self.trainable_tokens_delta[name].to(weight)
            for j, token in enumerate(self.token_indices[name]):
                result = torch.where((x == token).unsqueeze(-1), delta[j], result)
        scale = self._get_embed_scale()  # e.g. Gemma-3's scaled embedding, as PEFT applies it
        return result * scale.to(result.dtype) if scale is not None else result
    result = F.linear(x, weight)  # a tied LM head; PEFT's own path has no bias either
    for name in active_adapters:
        index = torch.tensor(self.token_indices[name], device=result.device)
        result = result.index_copy(-1, index, F.linear(x, self.trainable_tokens_delta[name].to(weight)))
    return result


def build_qlora(model: nn.Module, cfg: MethodConfig, token_ids: Optional[list[int]] = None) -> nn.Module:
    """QLoRA: LoRA over an NF4-quantised base, after PEFT's k-bit preparation (frozen base, fp32 norms)."""
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise UserError("qlora needs the base model loaded in 4-bit (load_model_and_tokenizer(quantize_4bit=True))")
    # gradient checkpointing stays the recipe's choice (--gradient-checkpointing), not a side effect of QLoRA
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return build_lora(model, cfg, token_ids=token_ids)


def build_partial(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Freeze everything, then unfreeze the first cfg.unfreeze_first and last cfg.unfreeze_last decoder layers."""
    layers = find_decoder_layers(model)[1]
    chosen = partial_layer_indices(len(layers), cfg.unfreeze_first, cfg.unfreeze_last)
    model.requires_grad_(False)
    for i in chosen:
        layers[i].requires_grad_(True)
    return model


def partial_layer_indices(num_layers: int, first: int, last: int) -> list[int]:
    """Indices of the first `first` and last `last` of num_layers layers (UserError if they do not fit)."""
    if first + last < 1 or first + last > num_layers:
        raise UserError(
            f"--unfreeze-first {first} --unfreeze-last {last}: need 1..{num_layers} layers in total "
            f"(the model has {num_layers})"
        )
    return sorted(set(range(first)) | set(range(num_layers - last, num_layers)))


def build_full(model: nn.Module) -> nn.Module:
    """Every parameter trainable (a reference point on small models)."""
    return model.requires_grad_(True)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _cast_floats(obj, dtype):
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def keep_trained_weights_fp32(model: nn.Module) -> int:
    """Cast trainable fp16/bf16 weights of partial / full tuning to fp32 (frozen ones keep the loaded dtype) and
    -> how many were cast. AdamW on 16-bit weights loses every update below their resolution (bf16: 0.4% of the
    weight), its epsilon rounds to zero in fp16, and the fp16 grad scaler refuses 16-bit gradients. Where frozen
    16-bit modules remain, each fully trained top-level block computes in fp32 and hands 16-bit outputs on."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in _LOW_PRECISION:
            p.data = p.data.float()
            cast += 1
    frozen_low = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype in _LOW_PRECISION}
    if not cast or not frozen_low:
        return cast
    low = frozen_low.pop()
    for module in _fully_trained_blocks(model):
        module.register_forward_pre_hook(lambda _m, args, kwargs: (_cast_floats(args, torch.float32),
                                                                    _cast_floats(kwargs, torch.float32)),
                                         with_kwargs=True)
        module.register_forward_hook(lambda _m, _args, out: _cast_floats(out, low))
    return cast


def _fully_trained_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose parameters are all trainable (partial tuning: the unfrozen decoder layers)."""
    blocks, covered = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in covered) or not name:
            continue
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params):
            blocks.append(module)
            covered.add(name)
    return blocks


def apply_method(model: nn.Module, cfg: MethodConfig, tokenizer=None, log: Optional[Callable[[str], None]] = print,
                 tokens: Optional[TokenChoice] = None):
    """Make `model` trainable the way cfg.method says; logs the token choice (choose_trainable_tokens, unless given
    as `tokens`), the trainable parameter groups and counts via `log`."""
    check_method_config(cfg)
    m = cfg.method
    tokens = tokens or choose_trainable_tokens(cfg, model, tokenizer)
    model = METHOD_BUILDERS[m](model, cfg, tokenizer, tokens.ids)
    if m in ("partial", "full"):
        keep_trained_weights_fp32(model)
    if log is not None:
        counts = count_parameters(model)
        groups = ", ".join(f"{g} ({n:,})" for g, n in trainable_groups(model))
        log(f"method {m}: trainable {counts['trainable']:,} of {counts['total']:,} parameters "
            f"({counts['trainable_pct']:.4f}%)")
        log(f"trainable parameter groups: {groups}")
        log(tokens.reason)
    return model


# ---- reporting ------------------------------------------------------------------------------------


_LAYER_INDEX = re.compile(r"^(.*?\.\d+)\.")


def trainable_groups(model: nn.Module) -> list[tuple[str, int]]:
    """(group, trainable parameters) in model order: one group per decoder layer, else the parameter's module."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _LAYER_INDEX.match(name)
        group = m.group(1) if m else name.rsplit(".", 1)[0]
        for prefix in ("base_model.model.", "base_model."):  # PEFT wrappers add these
            group = group[len(prefix):] if group.startswith(prefix) else group
        groups[group] = groups.get(group, 0) + numel_of(p)
    return list(groups.items())


# ---- saving and loading ----------------------------------------------------------------------------------------


def _method_fields(cfg) -> dict:
    names = {f.name for f in dataclasses.fields(MethodConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


def save_finetuned(
    model: nn.Module, tokenizer, out_dir, cfg: MethodConfig, *, base_model: Optional[str] = None,
    state_dict: Optional[dict] = None,
) -> Path:
    """Write into out_dir (the run's final/): the PEFT adapter, the trained layers (partial) or the model (full), plus
    the tokenizer and finetune.json naming the method and base model (default: cfg.model, else the model's path).
    state_dict: the model's full state dict when its own tensors are shards (FSDP / ZeRO-3: gathered by
    accelerator.get_state_dict on every rank, saved here by the main one)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    final = Path(out_dir)
    final.mkdir(parents=True, exist_ok=True)
    base_model = base_model or getattr(cfg, "model", None) or unwrap_model(model).config._name_or_path
    if base_model != EMBEDDED and Path(base_model).expanduser().is_dir():
        base_model = str(Path(base_model).expanduser().resolve())
    meta = {"method": cfg.method, "base_model": base_model, "quantize_4bit": needs_4bit(cfg.method),
            "method_config": _method_fields(cfg)}
    if state_dict is not None:
        state_dict = _without_tied_copies(model, state_dict)
    saved = {} if state_dict is None else {"state_dict": state_dict}
    if cfg.method in PEFT_METHODS:
        model.save_pretrained(final, **saved)
        meta["format"] = "peft-adapter"
    elif cfg.method == "partial":
        from safetensors.torch import save_file

        layers_path, layers = find_decoder_layers(model)
        chosen = partial_layer_indices(len(layers), cfg.unfreeze_first, cfg.unfreeze_last)
        if state_dict is None:
            state_dict = {f"{layers_path}.{i}.{k}": v for i in chosen for k, v in layers[i].state_dict().items()}
        prefixes = tuple(f"{layers_path}.{i}." for i in chosen)
        state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k.startswith(prefixes)}
        save_file(state, str(final / PARTIAL_WEIGHTS))
        meta.update(format="partial-layers", layers_path=layers_path, layers=chosen, num_layers=len(layers))
    else:
        model.save_pretrained(final, **saved)
        meta["format"] = "full-model"
    tokenizer.save_pretrained(final)
    (final / FINETUNE_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return final


def _without_tied_copies(model: nn.Module, state_dict: dict) -> dict:
    """state_dict less the second name of each shared parameter (a tied LM head): a gathered state dict holds a copy
    under both names, where the model's own save writes the tensor once."""
    seen, copies = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            copies.add(name)
        seen.add(id(p))
    return {k: v for k, v in state_dict.items() if k not in copies}


def load_finetuned(run_or_final_dir, cache_dir, *, dtype: Optional[torch.dtype] = None):
    """Rebuild (model, tokenizer) saved by save_finetuned from a run dir or its final/ dir, in eval mode."""
    final = Path(run_or_final_dir)
    if not (final / FINETUNE_META).is_file() and (final / "final" / FINETUNE_META).is_file():
        final = final / "final"
    meta_path = final / FINETUNE_META
    if not meta_path.is_file():
        raise UserError(f"{run_or_final_dir}: no {FINETUNE_META} (not a fine-tuned run or its final/ dir)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    if meta["format"] == "full-model":
        model, _ = load_model_and_tokenizer(str(final), cache_dir, dtype=dtype)
    else:
        model, base_tokenizer = load_model_and_tokenizer(
            meta["base_model"], cache_dir, quantize_4bit=meta["quantize_4bit"], dtype=dtype
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = base_tokenizer.pad_token
        if meta["format"] == "peft-adapter":
            from peft import PeftModel

            model = use_indexed_trainable_tokens(PeftModel.from_pretrained(model, final))
        else:
            _load_partial_layers(model, final, meta)
    return model.eval(), tokenizer


def _load_partial_layers(model: nn.Module, final: Path, meta: dict) -> None:
    from safetensors.torch import load_file

    layers_path, layers = find_decoder_layers(model)
    if layers_path != meta["layers_path"] or len(layers) != meta["num_layers"]:
        raise UserError(
            f"{final}: saved layers {meta['layers_path']} x{meta['num_layers']} do not match base model "
            f"{meta['base_model']} ({layers_path} x{len(layers)})"
        )
    state = load_file(str(final / PARTIAL_WEIGHTS))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise UserError(f"{final}: {len(result.unexpected_keys)} saved tensors do not fit the base model")
