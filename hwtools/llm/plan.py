"""Training-memory planner: exact parameter counts of each method on the real architecture, built on the meta device
(no weights, no network), and an estimate of the memory one training step needs.

Memory model (bytes; `dtype` = --dtype, B = its size, F = 4 for fp32):
- weights: every parameter at its own dtype on the meta model (base in `dtype`, PEFT adapters in fp32, as PEFT keeps
  them). QLoRA: the base Linear layers bitsandbytes quantises (all but the LM head) at NF4 with double quantisation,
  NF4_BITS_PER_PARAM bits each; everything else fp32, because `prepare_model_for_kbit_training` upcasts it.
- gradients: one per trainable parameter, at that parameter's dtype.
- master weights: an fp32 copy of trainable parameters stored in 16 bits. None in practice: adapters are fp32 and
  partial/full tuning cast their trained weights to fp32 (`keep_trained_weights_fp32`).
- optimizer: AdamW's two fp32 moments per trainable parameter (8 bytes).
- activations: what autograd saves for backward, per decoder layer (`layer_activation_bytes`, derived by listing the
  tensors each op of a Llama/Gemma decoder layer saves; tests/test_plan.py checks it against the tensors autograd
  really saves), plus the final norm. With gradient checkpointing each layer keeps only its input and one layer at a
  time is recomputed. Activations are in `dtype` (QLoRA: fp32, its upcast embeddings carry fp32 through the stack;
  full: fp32, its trained weights are kept in fp32; partial: `dtype`, its four fp32 blocks are not modelled);
  RMSNorm and softmax work in fp32 whatever the dtype.
- logits: hwtools computes the loss on label positions only, in checkpointed chunks of at most LOGITS_PER_CHUNK logits
  (hwtools/llm/loss.py), so one chunk is alive at a time: rows x vocab x 4 x 3 (fp32 log-softmax, its gradient and
  its input's gradient; x 4 with Gemma's soft-capping tanh), + B per logit for the head output when B is not 4. The
  total counts this; `logits_full` is the same term over every position, what a plain `model(labels=...)` would
  hold, shown for comparison. Rows: every next token counted as a label (an upper bound).
- total: the larger of two moments. Backward: weights + gradients + master + optimizer + activations + logits, a
  conservative sum (gradients appear while activations are freed; with gradient accumulation they really coexist).
  With gradient checkpointing the logits chunk is freed before the first layer is recomputed, so total_gc counts
  the larger of the two there. Optimizer step (`optimizer_step`): weights + gradients + master + optimizer + 4 bytes
  per trainable parameter, the one fp32 temporary of torch's foreach AdamW (its default on GPU); it decides the
  total of full fine-tuning. Not counted: the CUDA context (~0.3-0.5 GiB), allocator fragmentation, workspaces.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hwtools.errors import UserError
from hwtools.llm.loss import LOGITS_PER_CHUNK
from hwtools.llm.methods import METHODS, MethodConfig, apply_method, needs_4bit, supports_gradient_checkpointing
from hwtools.llm.models import EMBEDDED, EMBEDDED_DIRNAME, decoder_layers, text_config, unwrap_model
from hwtools.train.meters import count_parameters

FP32 = 4
# NF4 code (4 bits) + one 8-bit absmax per 64-weight block + one fp32 absmax per 256 of those (double quantisation)
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
MEMORY_KEYS = ("weights", "gradients", "master", "optimizer", "activations", "logits", "optimizer_step", "total",
               "activations_gc", "total_gc", "logits_full")


# ---- the architecture ---------------------------------------------------------------------------------------------


def resolve_config(model: str, cache_dir):
    """The transformers config of `model`: a known name or hub id (constants), embedded, a local dir, or a hub id
    already in the local Hugging Face cache."""
    from transformers import AutoConfig

    from hwtools.llm.known_configs import known_config

    if model == EMBEDDED:
        converted = Path(cache_dir).expanduser() / EMBEDDED_DIRNAME / "config.json"
        return AutoConfig.from_pretrained(converted.parent) if converted.is_file() else known_config("gemma-3-270m")
    config = known_config(model)
    if config is not None:
        return config
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"--model {model}: directory has no config.json (not a transformers model dir)")
        return AutoConfig.from_pretrained(local)
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise UserError(f"--model {model}: no such directory")
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: the planner never goes to the network
        raise UserError(
            f"--model {model}: config not in the local Hugging Face cache (the planner works offline); use "
            "gemma-2-2b, llama-3.2-3b, embedded, or a local dir holding its config.json"
        ) from None


def default_attention(config) -> str:
    """The attention implementation hwtools trains with: eager for Gemma-2 (soft-capping), else transformers' sdpa."""
    return "eager" if config.model_type == "gemma2" else "sdpa"


def build_meta_model(config, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The architecture of `config` with every parameter on the meta device (shapes and dtypes, no storage)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def _apply_quietly(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT calls a deprecated transformers property
        return apply_method(model, cfg, None, log=None)


# ---- activations --------------------------------------------------------------------------------------------------


def _soft_prompt(model: nn.Module) -> tuple[Optional[str], int]:
    """(PEFT type, virtual tokens) of a soft-prompt model, else (None, 0)."""
    cfg = getattr(model, "active_peft_config", None)
    kind = str(getattr(getattr(cfg, "peft_type", None), "value", "")) if cfg is not None else ""
    if kind in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        return kind, int(cfg.num_virtual_tokens)
    return None, 0


def _projection(module: nn.Module) -> dict:
    """Sizes of a Linear (maybe LoRA-wrapped): d_in, d_out, whether its base weight trains, and its adapter."""
    base = getattr(module, "base_layer", module)
    info = {"d_in": base.in_features, "d_out": base.out_features, "trains": bool(base.weight.requires_grad),
            "lora_r": 0, "dropout": False, "dora": False, "adapter_bytes": FP32}
    adapters = [a for a in getattr(module, "active_adapters", []) if a in getattr(module, "lora_A", {})]
    if adapters:
        name = adapters[0]
        drop = module.lora_dropout[name]
        info.update(lora_r=module.r[name], dropout=isinstance(drop, nn.Dropout) and drop.p > 0,
                    dora=bool(module.use_dora.get(name, False)),
                    adapter_bytes=module.lora_A[name].weight.element_size())
    return info


def _layer_parts(layer: nn.Module) -> dict:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ATTENTION_PROJ + MLP_PROJ
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in ATTENTION_PROJ) \
            or not all(hasattr(mlp, n) for n in MLP_PROJ):
        raise UserError(
            f"{type(layer).__name__}: the planner models Llama/Gemma-style decoder layers (self_attn.{{q,k,v,o}}_proj, "
            f"mlp.{{gate,up,down}}_proj); this architecture is not one"
        )
    proj = {n: _projection(getattr(attn if n in ATTENTION_PROJ else mlp, n)) for n in names}
    norms = [m for m in layer.children() if type(m).__name__.endswith("RMSNorm")]
    # Gemma's norms scale by (1 + weight) in fp32 and save that product; Llama's cast first and save it in the dtype
    scale_fp32 = all(type(m).__name__.startswith("Gemma") for m in norms)
    qk_norms = [getattr(attn, n) for n in ("q_norm", "k_norm") if isinstance(getattr(attn, n, None), nn.Module)]
    return {
        "proj": proj,
        "norms_trainable": [bool(any(p.requires_grad for p in m.parameters())) for m in norms],
        "norm_scale_fp32": scale_fp32,
        "qk_norm_trainable": any(p.requires_grad for m in qk_norms for p in m.parameters()) if qk_norms else None,
        "trains": any(p.requires_grad for p in layer.parameters()),
    }


# Korthikanti et al. (2022) count what one transformer layer saves for backward; this is that count redone for
# Llama/Gemma layers (GQA, RMSNorm, gated MLP) and for frozen weights: a frozen projection saves nothing, its input
# is only needed for its own weight gradient. Per token, with B = activation bytes, F = 4, a / g query / kv heads of
# size d, h hidden, i intermediate, s queries and S keys per row (S > s with prefix tuning):
#   RMSNorm (fp32 inside)   F*(h+1); + F*h (Gemma scales in fp32) or B*h (Llama) when its weight trains
#   q/k norms (Gemma-3)     F*(a+g)*(d+1); + F*(a+g)*d when trained
#   eager attention         B*a*d rotated q + 2*B*a*d*S/s for k and v repeated to a heads
#                           + a*S*(F + B) softmax in fp32 and its cast (fp32 dtype: a*S*F)
#                           + B*a*S tanh output with logit soft-capping (Gemma-2)
#                           + B*a*d o_proj input when o_proj trains
#   sdpa attention          hwtools' packed rows (and padding) always give it a mask, so transformers repeats k and v
#                           and torch keeps the memory-efficient kernel's inputs: 2*B*a*d (q, output = o_proj input)
#                           + 2*B*a*d*S/s (k, v) + F*a log-sum-exp + B*S the mask as a float bias
#   gated MLP               3*B*i: activation input and output, up projection; + B*i down_proj input when it trains
#   trained projections     B*h shared input of q/k/v, B*h of gate/up (the norm outputs)
#   each LoRA module        P*(d_in + r) input cast to the adapter dtype P and the rank-r product
#                           + mask_bytes*d_in dropout mask when dropout > 0
#                           DoRA: + 2*P*d_out per token and one P*d_out*d_in weight-sized product per module
# tests/test_plan.py checks the sum against the tensors autograd really saves.
def layer_activation_bytes(
    config, parts: dict, *, batch_size: int, seq_len: int, kv_len: int, act_bytes: int, attention: str,
    mask_bytes: int,
) -> int:
    """Bytes autograd keeps for backward in one decoder layer that gradients flow through (`parts` from
    `_layer_parts`; seq_len queries and kv_len keys per row), by the count above."""
    cfg = text_config_of(config)
    h, i = cfg.hidden_size, cfg.intermediate_size
    a, g = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or h // a
    B, F = act_bytes, FP32
    tokens = batch_size * seq_len
    keys = kv_len / seq_len
    proj = parts["proj"]
    per_token = 0.0
    for trains in parts["norms_trainable"]:
        per_token += F * (h + 1) + ((F if parts["norm_scale_fp32"] else B) * h if trains else 0)
    if parts["qk_norm_trainable"] is not None:
        per_token += F * (a + g) * (d + 1) + (F * (a + g) * d if parts["qk_norm_trainable"] else 0)
    if attention == "eager":
        per_token += B * a * d + 2 * B * a * d * keys + a * kv_len * (F + (B if B != F else 0))
        if getattr(cfg, "attn_logit_softcapping", None):
            per_token += B * a * kv_len
        per_token += B * a * d if proj["o_proj"]["trains"] else 0
    else:  # hwtools' packed rows (and padding) always give sdpa a mask, so k and v are repeated to a heads
        per_token += 2 * B * a * d + 2 * B * a * d * keys + F * a + B * kv_len
    per_token += 3 * B * i
    per_token += B * h if any(proj[n]["trains"] for n in ("q_proj", "k_proj", "v_proj")) else 0
    per_token += B * h if any(proj[n]["trains"] for n in ("gate_proj", "up_proj")) else 0
    per_token += B * i if proj["down_proj"]["trains"] else 0
    fixed = 0
    for p in proj.values():
        if p["lora_r"]:
            P = p["adapter_bytes"]
            per_token += P * (p["d_in"] + p["lora_r"]) + (mask_bytes * p["d_in"] if p["dropout"] else 0)
            if p["dora"]:
                per_token += 2 * P * p["d_out"]
                fixed += P * p["d_out"] * p["d_in"]
    return int(tokens * per_token + fixed)


def text_config_of(config):
    """The text part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def activation_breakdown(
    model: nn.Module, *, batch_size: int, seq_len: int, act_bytes: int, attention: str, mask_bytes: int = 1,
) -> dict:
    """Activation bytes of one training forward of `model` (a method already applied; meta or real), by part:
    `layers` (per decoder layer; 0 below the lowest trainable layer), `outside` (final norm and the label rows
    hwtools' chunked loss keeps) and `checkpoint_inputs` (the layer inputs gradient checkpointing keeps instead).
    mask_bytes: bytes per dropout-mask element (CUDA keeps a bool mask: 1; CPU a mask in the adapter dtype)."""
    cfg = text_config(model)
    kind, virtual = _soft_prompt(model)
    seq = seq_len + (virtual if kind in ("PROMPT_TUNING", "P_TUNING") else 0)
    kv_len = seq + (virtual if kind == "PREFIX_TUNING" else 0)
    parts = [_layer_parts(layer) for layer in decoder_layers(model)]
    base = unwrap_model(model)
    # gradients flow from the loss down to the lowest trainable thing; layers below it need nothing saved
    inputs_train = kind is not None or base.get_input_embeddings().weight.requires_grad
    lowest = 0 if inputs_train else next((k for k, p in enumerate(parts) if p["trains"]), len(parts))
    layers = [
        layer_activation_bytes(cfg, p, batch_size=batch_size, seq_len=seq, kv_len=kv_len, act_bytes=act_bytes,
                               attention=attention, mask_bytes=mask_bytes) if k >= lowest else 0
        for k, p in enumerate(parts)
    ]
    h = cfg.hidden_size
    final_norm = getattr(getattr(base, "model", None), "norm", None)
    final_norm_trains = final_norm is not None and any(p.requires_grad for p in final_norm.parameters())
    outside = batch_size * seq * (FP32 * (h + 1) + (FP32 * h if final_norm_trains else 0))
    outside += batch_size * (seq_len - 1) * h * act_bytes  # label rows (upper bound: every next token is a label)
    flowing = sum(1 for b in layers if b)
    return {"layers": layers, "outside": int(outside), "checkpoint_inputs": flowing * batch_size * seq * h * act_bytes}


def activation_bytes(parts: dict, *, gradient_checkpointing: bool = False) -> int:
    """Activations alive at the end of the forward (without checkpointing) or while the layer being recomputed
    is alive (with it: every layer's input plus one layer's full activations)."""
    if gradient_checkpointing:
        return parts["outside"] + parts["checkpoint_inputs"] + max(parts["layers"], default=0)
    return parts["outside"] + sum(parts["layers"])


def logits_bytes(config, *, batch_size: int, seq_len: int, act_bytes: int, chunked: bool = True) -> int:
    """Logits alive at once, for one chunk of label rows (hwtools' loss) or every position (plain HF loss): in
    backward the fp32 log-softmax output, its gradient and its input's gradient (+ the tanh output with Gemma's
    soft-capping), and in forward the head output in the dtype when that is not fp32."""
    cfg = text_config_of(config)
    vocab = cfg.vocab_size
    if chunked:  # upper bound: every next token is a label
        rows = min(batch_size * (seq_len - 1), max(1, LOGITS_PER_CHUNK // vocab))
    else:
        rows = batch_size * seq_len
    copies = FP32 * (3 + (1 if getattr(cfg, "final_logit_softcapping", None) else 0))
    return int(rows * vocab * (copies + (act_bytes if act_bytes != FP32 else 0)))


# ---- weights, gradients, optimizer --------------------------------------------------------------------------------


def _quantised_weight_ids(model: nn.Module) -> set[int]:
    """Parameters bitsandbytes would store in 4 bits: the weights of every base nn.Linear except the output head."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    skip = {id(head.weight)} if head is not None else set()
    skip |= {id(p) for n, m in base.named_modules() if "lora_" in n for p in m.parameters()}
    return {id(m.weight) for m in base.modules() if isinstance(m, nn.Linear) and id(m.weight) not in skip}


def state_bytes(model: nn.Module, *, quantise_4bit: bool) -> dict:
    """Bytes of weights, gradients, fp32 master copies and AdamW moments of `model` (method applied)."""
    quantised = _quantised_weight_ids(model) if quantise_4bit else set()
    seen, weights, grads, master, trainable = set(), 0.0, 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue  # tied embeddings count once
        seen.add(id(p))
        n = p.numel()
        if id(p) in quantised:
            weights += n * NF4_BITS_PER_PARAM / 8
        else:
            weights += n * (FP32 if quantise_4bit else p.element_size())
        if p.requires_grad:
            trainable += n
            size = FP32 if quantise_4bit else p.element_size()
            grads += n * size
            master += n * FP32 if size < FP32 else 0
    return {"weights": int(weights), "gradients": grads, "master": master, "optimizer": 2 * FP32 * trainable}


# ---- the plan -----------------------------------------------------------------------------------------------------


def plan_method(
    config, method_cfg: MethodConfig, *, batch_size: int, seq_len: int, dtype: torch.dtype,
    attention: Optional[str] = None, device: str = "cuda",
) -> dict:
    """Parameter counts and memory estimate (bytes, MEMORY_KEYS) of one method on the meta-device architecture,
    for training on `device` ("cuda", or "cpu": dropout masks in the adapter dtype, single-tensor AdamW)."""
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device {device}: choose cuda or cpu")
    if batch_size < 1 or seq_len < 2:
        raise UserError(f"--batch-size {batch_size} --seq-len {seq_len}: need a batch of at least 1 and 2 tokens")
    attention = attention or default_attention(config)
    quantise = needs_4bit(method_cfg.method)
    model = build_meta_model(config, dtype, attention)
    # a meta model cannot be quantised; QLoRA trains the same adapters as LoRA, its base is counted at 4 bits below
    cfg = dataclasses.replace(method_cfg, method="lora") if quantise else method_cfg
    model = _apply_quietly(model, cfg)
    counts = count_parameters(model)
    # QLoRA's upcast embeddings carry fp32 through the stack; full tuning keeps every weight in fp32 (see
    # keep_trained_weights_fp32), so it computes in fp32 whatever --dtype says
    act_bytes = FP32 if quantise or method_cfg.method == "full" else dtype.itemsize
    memory = state_bytes(model, quantise_4bit=quantise)
    # CUDA's fused dropout keeps a bool mask; CPU multiplies by a mask in the input's dtype (LoRA: the fp32 adapter's)
    mask_bytes = 1 if device == "cuda" else FP32
    acts = activation_breakdown(model, batch_size=batch_size, seq_len=seq_len, act_bytes=act_bytes,
                                attention=attention, mask_bytes=mask_bytes)
    memory["activations"] = activation_bytes(acts)
    memory["logits"] = logits_bytes(config, batch_size=batch_size, seq_len=seq_len, act_bytes=act_bytes)
    memory["logits_full"] = logits_bytes(config, batch_size=batch_size, seq_len=seq_len, act_bytes=act_bytes,
                                         chunked=False)
    static = memory["weights"] + memory["gradients"] + memory["master"] + memory["optimizer"]
    # foreach AdamW (torch's default on GPU) takes sqrt of the second moments into one fp32 temporary for all params;
    # on CPU torch steps one parameter at a time
    memory["optimizer_step"] = static + (memory["optimizer"] // 2 if device == "cuda" else 0)
    # without checkpointing every layer's activations are alive while the loss chunks run backward
    memory["total"] = max(static + memory["activations"] + memory["logits"], memory["optimizer_step"])
    if supports_gradient_checkpointing(method_cfg.method):
        memory["activations_gc"] = activation_bytes(acts, gradient_checkpointing=True)
        # with it, the logits chunk is gone before the first layer is recomputed: the larger of the two counts
        kept = acts["outside"] + acts["checkpoint_inputs"]
        memory["total_gc"] = max(static + kept + max(max(acts["layers"], default=0), memory["logits"]),
                                 memory["optimizer_step"])
    else:  # prefix tuning: transformers drops the prefix cache under checkpointing (see methods.py)
        memory["activations_gc"] = memory["total_gc"] = None
    return {"method": method_cfg.method, "total": counts["total"], "trainable": counts["trainable"],
            "trainable_pct": counts["trainable_pct"], "memory": memory}


def plan_methods(config, base_cfg: MethodConfig, methods=METHODS, **kwargs) -> list[dict]:
    """plan_method for each of `methods`, all with the knobs of base_cfg."""
    return [plan_method(config, dataclasses.replace(base_cfg, method=m), **kwargs) for m in methods]


# ---- the table ----------------------------------------------------------------------------------------------------


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def plan_table(plans: list[dict], *, title: str, settings: str, gradient_checkpointing: bool = False) -> str:
    """The plan as a markdown table (GiB) with the assumptions under it; the total of the chosen setting in bold."""
    bold_plain, bold_gc = ("", "**") if gradient_checkpointing else ("**", "")
    lines = [
        f"### {title}",
        "",
        settings,
        "",
        "| method | trainable | % | total params | weights | grads | master | AdamW | activations | logits chunk "
        f"| {bold_plain}total{bold_plain} | activations (GC) | {bold_gc}total (GC){bold_gc} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in plans:
        m = p["memory"]
        lines.append(
            f"| {p['method']} | {p['trainable']:,} | {p['trainable_pct']:.3f} | {p['total']:,} | {_gib(m['weights'])} "
            f"| {_gib(m['gradients'])} | {_gib(m['master'])} | {_gib(m['optimizer'])} | {_gib(m['activations'])} "
            f"| {_gib(m['logits'])} | {bold_plain}{_gib(m['total'])}{bold_plain} | {_gib(m['activations_gc'])} "
            f"| {bold_gc}{_gib(m['total_gc'])}{bold_gc} |"
        )
    full_logits = plans[0]["memory"]["logits_full"] if plans else 0
    lines += [
        "",
        "GiB. Weights in the chosen dtype (PEFT adapters fp32; QLoRA: NF4 + double quantisation for the Linear "
        "layers, fp32 for the rest, which `prepare_model_for_kbit_training` upcasts); grads: one per trainable "
        "parameter; master: fp32 copy of 16-bit trainable weights; AdamW: two fp32 moments per trainable parameter. "
        "Activations: what autograd saves in the decoder layers (GC: with gradient checkpointing, which prefix "
        "tuning cannot use). Logits chunk: hwtools' loss runs on label positions in chunks; computing all logits "
        f"at once (plain `model(labels=...)`) would take {_gib(full_logits)} GiB instead. Total: the larger of the "
        "backward peak (the sum of the columns before it) and the optimizer step (weights, grads, master, AdamW and, "
        "on GPU, foreach AdamW's fp32 temporary, which decides full fine-tuning). Not counted: the CUDA context, "
        "allocator fragmentation, library workspaces. Model: hwtools/llm/plan.py.",
    ]
    return "\n".join(lines) + "\n"
