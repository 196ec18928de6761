"""Model loading (local dirs, hub ids offline, 4-bit, the embedded GGUF cache) and structure discovery."""
from __future__ import annotations

import gc
import json
import time

import pytest
import torch

from hwtools.errors import UserError
from hwtools.llm import models
from hwtools.llm.methods import MethodConfig, apply_method
from hwtools.llm.models import decoder_layers, describe_model, embedded_model_dir, load_model_and_tokenizer
from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE, render_chat
from tests.tiny_models import (  # noqa: F401
    TINY_ARCHS,
    TINY_HIDDEN,
    TINY_LAYERS,
    build_tiny_model,
    build_tiny_tokenizer,
    one_torch_thread,
)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_decoder_layers_found_plain_and_under_peft(arch, tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    layers = decoder_layers(model)
    assert layers is model.model.layers and len(layers) == TINY_LAYERS
    lora = apply_method(model, MethodConfig(method="lora"), tok, log=None)
    assert decoder_layers(lora) is layers
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    prefix = apply_method(model, MethodConfig(method="prefix-tuning", num_virtual_tokens=3), tok, log=None)
    assert decoder_layers(prefix) is model.model.layers


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_describe_model(arch, tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    summary = describe_model(apply_method(model, MethodConfig(method="lora"), tok, log=None))
    json.dumps(summary)  # goes into summary.json
    assert summary["num_layers"] == TINY_LAYERS and summary["hidden_size"] == TINY_HIDDEN
    assert summary["vocab_size"] == len(tok) and summary["layers_path"] == "model.layers"
    assert summary["attention"]["module"] == "self_attn"
    assert summary["attention"]["linears"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert summary["mlp"]["module"] == "mlp" and summary["mlp"]["linears"] == ["gate_proj", "up_proj", "down_proj"]
    assert summary["architecture"].lower().startswith(arch[:5])


def test_gemma2_gets_eager_attention_others_keep_the_default(tiny_dirs, tmp_path):
    gemma2, _ = load_model_and_tokenizer(str(tiny_dirs["gemma2"]), tmp_path)
    llama, _ = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    assert gemma2.config._attn_implementation == "eager"
    assert llama.config._attn_implementation == "sdpa"
    forced, _ = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path, attn_implementation="eager",
                                         dtype=torch.bfloat16)
    assert forced.config._attn_implementation == "eager" and forced.dtype == torch.bfloat16


def test_missing_pad_token_and_gemma_template_are_supplied(tmp_path):
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.chat_template = None
    for arch in ("gemma3", "llama"):
        build_tiny_model(arch, len(tok)).save_pretrained(tmp_path / arch)
        tok.save_pretrained(tmp_path / arch)
    model, loaded = load_model_and_tokenizer(str(tmp_path / "gemma3"), tmp_path)
    assert loaded.pad_token == "<pad>"  # a reserved pad token of the vocabulary beats reusing EOS
    assert model.config.pad_token_id == loaded.pad_token_id == model.generation_config.pad_token_id
    assert loaded.chat_template == GEMMA_CHAT_TEMPLATE
    _, llama_tok = load_model_and_tokenizer(str(tmp_path / "llama"), tmp_path)
    assert llama_tok.pad_token_id is not None and not llama_tok.chat_template  # no Gemma template for Llama


def test_hub_id_offline_and_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError) as err:
        load_model_and_tokenizer("meta-llama/Llama-3.2-3B-Instruct", tmp_path)
    message = str(err.value)
    assert "offline" in message and "--model /path/to/DIR" in message and "\n" not in message
    with pytest.raises(UserError, match="no such directory"):
        load_model_and_tokenizer(str(tmp_path / "nope" / "model"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty"), tmp_path)


def test_quantize_4bit_on_cpu_loads_nf4_double_quant(tiny_dirs, tmp_path):
    import bitsandbytes as bnb

    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma3"]), tmp_path, quantize_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in full precision
    out = model(**tok(["<start_of_turn>user\nسلام"], return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_qlora_gradients_unchanged_by_an_eval_forward(tiny_dirs, tmp_path):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on the first no-grad eval forward, and that
    kernel has no backward: training after the base model's generations then silently lost every gradient that
    crosses a frozen 4-bit layer (the QLoRA reference run's loss rose). Loading turns that repacking off."""
    import bitsandbytes as bnb

    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma3"]), tmp_path, quantize_4bit=True)
    torch.manual_seed(0)
    model = apply_method(model, MethodConfig(method="qlora", lora_dropout=0.0), tok, log=None)
    ids = tok(["<start_of_turn>user\nسلام، حالت چطور است؟<end_of_turn>"], return_tensors="pt")["input_ids"]

    def lora_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what the base model's test generations and evaluation do
    after = lora_grads()
    first_layer = [n for n in before if ".layers.0." in n and "lora_B" in n]  # lora_A starts with zero grad (B = 0)
    assert first_layer and all(before[n].abs().sum() > 0 for n in first_layer)
    for n in before:
        torch.testing.assert_close(after[n], before[n], msg=n)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_embedded_conversion_is_atomic_and_happens_once(tmp_path, monkeypatch):
    calls = []

    def fake_convert(out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed half way
        for name in models._EMBEDDED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(models, "_convert_embedded_gguf", fake_convert)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temp dir is left
    path = embedded_model_dir(tmp_path)
    assert path == tmp_path / models.EMBEDDED_DIRNAME and (path / "model.safetensors").is_file()
    assert embedded_model_dir(tmp_path) == path and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [models.EMBEDDED_DIRNAME]


@pytest.mark.integration
def test_embedded_model_converts_once_then_loads_fast(tmp_path):
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer("embedded", tmp_path)
    first = time.perf_counter() - start
    cache = tmp_path / models.EMBEDDED_DIRNAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [models.EMBEDDED_DIRNAME]
    assert (cache / "model.safetensors").stat().st_size > 1_000_000_000 and not (cache / "gguf").exists()
    assert len(tok) == 262144 and model.config.vocab_size == 262144
    summary = describe_model(model)
    assert (summary["architecture"], summary["num_layers"], summary["hidden_size"]) == ("Gemma3ForCausalLM", 18, 640)
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    text = render_chat(tok, [{"role": "system", "content": "فارسی"}, {"role": "user", "content": "سلام"}],
                       add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nفارسی\n\nسلام<end_of_turn>\n<start_of_turn>model\n"
    assert tok.pad_token == "<pad>"
    # the de-quantised base model still knows Persian facts (FACTS.md's few-shot check)
    prompt = "سوال: پایتخت فرانسه کجاست؟\nپاسخ: پاریس\nسوال: پایتخت ایران کجاست؟\nپاسخ:"
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "تهران" in tok.decode(out[0, enc["input_ids"].shape[1]:])
    del model, out
    gc.collect()

    start = time.perf_counter()
    model, tok = load_model_and_tokenizer("embedded", tmp_path)
    second = time.perf_counter() - start
    print(f"embedded model: first load (conversion) {first:.1f} s, second load {second:.1f} s")
    assert second < 20 and second < first / 3
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE and len(tok) == 262144
