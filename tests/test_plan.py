"""The memory planner: exact parameter counts of Gemma-2-2B and Llama-3.2-3B (by hand), the activation formula
against the tensors autograd really saves, and the whole estimate against the measured peak of real CPU steps."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwtools.errors import UserError
from hwtools.llm.known_configs import known_config
from hwtools.llm.methods import METHODS, SOFT_PROMPT_METHODS, MethodConfig, apply_method
from hwtools.llm.plan import (
    FP32,
    LOGITS_PER_CHUNK,
    MEMORY_KEYS,
    NF4_BITS_PER_PARAM,
    activation_breakdown,
    activation_bytes,
    build_meta_model,
    default_attention,
    plan_method,
    plan_methods,
    resolve_config,
)
from hwtools.train.meters import count_parameters
from tests.tiny_models import TINY_ARCHS, one_torch_thread, save_tiny_model, tiny_config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
R = 8  # LoRA rank of MethodConfig's defaults
VIRTUAL = 20

# (d_in, d_out) of q, k, v, o: Gemma-2-2B has 8 query heads and 4 kv heads of 256 on a 2304-wide stream
GEMMA2_ATTN = [(2304, 8 * 256), (2304, 4 * 256), (2304, 4 * 256), (8 * 256, 2304)]
GEMMA2_LAYERS, GEMMA2_HIDDEN, GEMMA2_VOCAB = 26, 2304, 256000
# Llama-3.2-3B: 24 query heads and 8 kv heads of 128 on a 3072-wide stream
LLAMA_ATTN = [(3072, 24 * 128), (3072, 8 * 128), (3072, 8 * 128), (24 * 128, 3072)]
LLAMA_LAYERS, LLAMA_HIDDEN = 28, 3072


def _layer_params(attn, hidden, intermediate, norms):
    return sum(i * o for i, o in attn) + 3 * hidden * intermediate + norms * hidden


GEMMA2_LAYER = _layer_params(GEMMA2_ATTN, GEMMA2_HIDDEN, 9216, norms=4)
LLAMA_LAYER = _layer_params(LLAMA_ATTN, LLAMA_HIDDEN, 8192, norms=2)


@pytest.fixture(scope="module")
def gemma2_plans():
    plans = plan_methods(known_config("gemma-2-2b"), MethodConfig(), batch_size=1, seq_len=512, dtype=torch.bfloat16)
    return {p["method"]: p for p in plans}


@pytest.fixture(scope="module")
def llama_plans():
    plans = plan_methods(known_config("llama-3.2-3b"), MethodConfig(), METHODS, batch_size=1, seq_len=512,
                         dtype=torch.bfloat16)
    return {p["method"]: p for p in plans}


# ---- parameter counts ---------------------------------------------------------------------------------------------


def test_known_configs_give_the_published_parameter_counts():
    # tied embeddings (all three): the input embedding is the LM head; + final norm
    gemma2 = GEMMA2_VOCAB * GEMMA2_HIDDEN + GEMMA2_LAYERS * GEMMA2_LAYER + GEMMA2_HIDDEN
    llama = 128256 * LLAMA_HIDDEN + LLAMA_LAYERS * LLAMA_LAYER + LLAMA_HIDDEN
    assert gemma2 == 2_614_341_888 and llama == 3_212_749_824
    for name, expected in (("gemma-2-2b", gemma2), ("llama-3.2-3b", llama), ("gemma-3-270m", 268_098_176)):
        config = known_config(name)
        model = build_meta_model(config, torch.bfloat16, default_attention(config))
        assert count_parameters(model)["total"] == expected, name
        assert all(p.device.type == "meta" for p in model.parameters())
    assert known_config("google/gemma-2-2b-it").to_dict() == known_config("gemma-2-2b").to_dict()
    assert known_config("gemma-2-2b").final_logit_softcapping == 30.0


def test_gemma2_2b_counts_by_hand(gemma2_plans):
    base = 2_614_341_888
    lora = GEMMA2_LAYERS * sum(R * (i + o) for i, o in GEMMA2_ATTN)
    assert lora == 3_194_880
    expected = {
        "prompt-tuning": VIRTUAL * GEMMA2_HIDDEN,
        "prefix-tuning": VIRTUAL * GEMMA2_LAYERS * 2 * 4 * 256,  # a key and a value (kv heads x head_dim) per layer
        "lora": lora,
        "rslora": lora,
        "qlora": lora,
        "dora": lora + GEMMA2_LAYERS * sum(o for _, o in GEMMA2_ATTN),  # + one magnitude per output feature
        "partial": 4 * GEMMA2_LAYER,  # layers 0, 1, 24, 25
        "full": base,
    }
    for method, trainable in expected.items():
        plan = gemma2_plans[method]
        assert plan["trainable"] == trainable, method
        assert plan["total"] == base + (trainable if method not in ("partial", "full") else 0), method
    assert gemma2_plans["p-tuning"]["trainable"] > VIRTUAL * GEMMA2_HIDDEN  # its MLP prompt encoder trains too


def test_llama_3_2_3b_counts_by_hand(llama_plans):
    lora = LLAMA_LAYERS * sum(R * (i + o) for i, o in LLAMA_ATTN)
    assert lora == 4_587_520
    assert llama_plans["lora"]["trainable"] == lora
    assert llama_plans["lora"]["total"] == 3_212_749_824 + lora
    assert llama_plans["partial"]["trainable"] == 4 * LLAMA_LAYER  # layers 0, 1, 26, 27
    assert llama_plans["prompt-tuning"]["trainable"] == VIRTUAL * LLAMA_HIDDEN


def test_gemma2_2b_memory_components_by_hand(gemma2_plans):
    n, lora = 2_614_341_888, 3_194_880
    m = gemma2_plans["lora"]["memory"]
    assert set(m) == set(MEMORY_KEYS)
    assert m["weights"] == 2 * n + FP32 * lora  # bf16 base, fp32 adapters
    assert (m["gradients"], m["master"], m["optimizer"]) == (FP32 * lora, 0, 8 * lora)
    full = gemma2_plans["full"]["memory"]
    # the recipe keeps trained weights in fp32: full fine-tuning holds fp32 weights and gradients, no master copy
    assert (full["weights"], full["gradients"], full["master"], full["optimizer"]) == (4 * n, 4 * n, 0, 8 * n)
    # full fine-tuning peaks at the optimizer step: 4 + 4 + 8 bytes + foreach AdamW's 4-byte temporary
    assert full["total"] == full["optimizer_step"] == 20 * n
    q = gemma2_plans["qlora"]["memory"]
    quantised = GEMMA2_LAYERS * (GEMMA2_LAYER - 4 * GEMMA2_HIDDEN)  # every Linear of the layers, not the tied head
    assert q["weights"] == pytest.approx(quantised * NF4_BITS_PER_PARAM / 8 + FP32 * (n - quantised + lora), abs=1)
    # hwtools' loss holds one chunk of label rows: 262 rows of 256k logits, fp32 x 4 (soft-capped) + the bf16 head
    rows = LOGITS_PER_CHUNK // GEMMA2_VOCAB
    assert rows == 262 and m["logits"] == rows * GEMMA2_VOCAB * (4 * FP32 + 2)
    assert m["logits_full"] == 512 * GEMMA2_VOCAB * (4 * FP32 + 2)
    for plan in gemma2_plans.values():
        mem = plan["memory"]
        if mem["total_gc"] is not None:
            assert mem["activations_gc"] < mem["activations"] / 5 and mem["total_gc"] <= mem["total"]
    assert gemma2_plans["prefix-tuning"]["memory"]["total_gc"] is None
    assert gemma2_plans["dora"]["memory"]["activations"] > gemma2_plans["lora"]["memory"]["activations"]


def test_activations_scale_with_the_batch():
    config = known_config("gemma-2-2b")
    one, two = (plan_method(config, MethodConfig(method="lora"), batch_size=b, seq_len=256, dtype=torch.bfloat16)
                for b in (1, 2))
    assert two["memory"]["activations"] == 2 * one["memory"]["activations"]


# ---- the activation formula against autograd ----------------------------------------------------------------------


def saved_tensor_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward of hwtools' loss."""
    from hwtools.llm.loss import causal_lm_loss

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, batch)
    return sum(seen.values())


def training_batch(method: str, batch_size: int, seq_len: int, vocab: int) -> dict:
    """What the recipe feeds: packed rows (position ids restart) for weight methods, padded rows for soft prompts."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (batch_size, seq_len), generator=g)
    if method in SOFT_PROMPT_METHODS:
        mask = torch.ones_like(ids)
        mask[0, -seq_len // 8:] = 0
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}
    cut = seq_len * 3 // 4
    pos = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)]).repeat(batch_size, 1)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


CASES = [(arch, m, "float32") for arch in TINY_ARCHS for m in METHODS if m != "qlora"]
CASES += [(arch, m, "bfloat16") for arch in TINY_ARCHS for m in ("prompt-tuning", "lora")]
# full with bf16 weights: the recipe keeps trained weights in fp32 (issue 20), so the whole model computes in fp32
CASES += [(arch, "full", "bfloat16") for arch in TINY_ARCHS]


@pytest.mark.parametrize("arch,method,dtype", CASES)
def test_activation_formula_matches_what_autograd_saves(arch, method, dtype):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    config = tiny_config(arch, 1000)
    attention = default_attention(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    model = apply_method(model, MethodConfig(method=method), None, log=None).train()
    batch = training_batch(method, 2, 48, 1000)
    measured = saved_tensor_bytes(model, batch)
    act_bytes = FP32 if method == "full" else dtype.itemsize  # full tuning computes in its fp32 trained weights
    parts = activation_breakdown(model, batch_size=2, seq_len=48, act_bytes=act_bytes, attention=attention,
                                 mask_bytes=FP32)  # CPU dropout keeps a mask in the (fp32) adapter dtype
    estimate = activation_bytes(parts)
    # DoRA's bookkeeping is only approximated (its per-module temporaries vary with dtype)
    assert estimate == pytest.approx(measured, rel=0.08 if method == "dora" else 0.05)


def test_qlora_estimate_matches_a_real_4bit_model(tmp_path):
    """On a bitsandbytes NF4 model: the analytic 4-bit bytes, fp32 elsewhere, and fp32 activations hold."""
    from hwtools.llm.models import load_model_and_tokenizer

    path = save_tiny_model("llama", tmp_path / "tiny")
    model, tok = load_model_and_tokenizer(str(path), tmp_path, quantize_4bit=True, dtype=torch.bfloat16)
    model = apply_method(model, MethodConfig(method="qlora"), tok, log=None).train()
    real = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            assert p.dtype == torch.float32  # prepare_model_for_kbit_training upcast the rest
            real += p.numel() * FP32
        else:  # packed codes, 8-bit block absmax, fp32 absmax of those
            real += p.numel() * p.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            real += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    plan = plan_method(model.config, MethodConfig(method="qlora"), batch_size=2, seq_len=48, dtype=torch.bfloat16,
                       attention="sdpa", device="cpu")
    assert plan["memory"]["weights"] == pytest.approx(real, rel=0.01)
    assert plan["trainable"] == count_parameters(model)["trainable"]
    measured = saved_tensor_bytes(model, training_batch("qlora", 2, 48, len(tok)))
    parts = activation_breakdown(model, batch_size=2, seq_len=48, act_bytes=FP32, attention="sdpa", mask_bytes=FP32)
    assert activation_bytes(parts) == pytest.approx(measured, rel=0.05)
    assert plan["memory"]["activations"] == activation_bytes(parts)


# ---- the whole estimate against measured peaks ----------------------------------------------------------------------

# big enough that weights, optimizer, activations and logits are tens of MiB each, far above allocator noise
MEASURE_SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                     pad_token_id=0, eos_token_id=1, bos_token_id=2)
MEASURE_BATCH, MEASURE_SEQ = 4, 128
MEASURE_CASES = [("llama", "lora", False), ("llama", "full", False),
                 ("gemma2", "lora", False), ("gemma2", "partial", False), ("gemma2", "lora", True)]


def measure_config(arch: str):
    from transformers import AutoConfig

    if arch == "gemma2":
        return AutoConfig.for_model("gemma2", **MEASURE_SHAPE, query_pre_attn_scalar=64, sliding_window=4096,
                                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    return AutoConfig.for_model("llama", **MEASURE_SHAPE, tie_word_embeddings=False)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_step_peaks(cases) -> list[dict]:
    """In this process: for each case, the peak RSS growth over two AdamW steps, with the model built and one
    forward/backward done (kernels warmed up) before the baseline. Run with glibc's mmap threshold fixed low, so
    freed tensors go back to the OS and RSS follows the bytes in use."""
    from transformers import AutoModelForCausalLM

    from hwtools.llm.loss import causal_lm_loss

    results = []
    for arch, method, checkpointing in cases:
        config = measure_config(arch)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=default_attention(config))
        model = apply_method(model, MethodConfig(method=method), None, log=None)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = training_batch(method, MEASURE_BATCH, MEASURE_SEQ, config.vocab_size)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        causal_lm_loss(model, batch)[0].backward()
        model.zero_grad(set_to_none=True)
        baseline = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
        for _ in range(2):  # the second step runs with the AdamW moments allocated
            causal_lm_loss(model, batch)[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append({"arch": arch, "method": method, "checkpointing": checkpointing,
                        "peak_growth": (_status_kib("VmHWM") - baseline) * 1024})
        del model, optimizer
    return results


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_estimate_within_30_percent_of_measured_cpu_peak():
    # PYTHONPATH: run as a script, this file imports tests.tiny_models from the repository root
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, __file__, json.dumps(MEASURE_CASES)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    for m in measured:
        plan = plan_method(measure_config(m["arch"]), MethodConfig(method=m["method"]), batch_size=MEASURE_BATCH,
                           seq_len=MEASURE_SEQ, dtype=torch.float32, device="cpu")["memory"]
        # the weights were allocated before the baseline
        estimate = (plan["total_gc"] if m["checkpointing"] else plan["total"]) - plan["weights"]
        ratio = estimate / m["peak_growth"]
        assert 0.7 <= ratio <= 1.3, f"{m}: estimate {estimate / 2**20:.1f} MiB, ratio {ratio:.2f}"


# ---- resolving the model ------------------------------------------------------------------------------------------


def test_resolve_config_sources(tmp_path):
    assert resolve_config("embedded", tmp_path).hidden_size == 640  # no converted cache: the Gemma-3-270M constant
    converted = tmp_path / "embedded-gemma3-270m"
    converted.mkdir()
    tiny_config("gemma3").save_pretrained(converted)
    assert resolve_config("embedded", tmp_path).hidden_size == tiny_config("gemma3").hidden_size
    local = tmp_path / "local"
    tiny_config("llama").save_pretrained(local)
    assert resolve_config(str(local), tmp_path).model_type == "llama"
    assert resolve_config("meta-llama/Llama-3.2-3B-Instruct", tmp_path).num_hidden_layers == 28
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_config("nobody/no-such-model", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_config(str(tmp_path / "empty"), tmp_path)


def test_cli_writes_the_table_and_rejects_bad_input(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import plan_llm
    finally:
        sys.path.remove(str(ROOT / "launch"))
    out = tmp_path / "plan.md"
    plan_llm.main(["--model", "gemma-2-2b", "--method", "lora,qlora,full", "--output", str(out),
                   "--cache-dir", str(tmp_path)])
    text = out.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["lora", "qlora", "full"]
    assert "| lora | 3,194,880 |" in text and "2,614,341,888" in text
    assert "### Training memory plan: gemma-2-2b" in capsys.readouterr().out
    for bad in (["--model", "nobody/nothing"], ["--method", "lora,magic"], ["--dtype", "int3"],
                ["--trainable-tokens", "chat"]):
        with pytest.raises(SystemExit) as e:
            plan_llm.main(bad + ["--cache-dir", str(tmp_path)])
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_knobs_flow_into_the_counts():
    config = known_config("gemma-2-2b")
    r16 = plan_method(config, dataclasses.replace(MethodConfig(method="lora"), lora_r=16, target_modules="q_proj"),
                      batch_size=1, seq_len=64, dtype=torch.bfloat16)
    assert r16["trainable"] == GEMMA2_LAYERS * 16 * (2304 + 2048)


if __name__ == "__main__":  # the subprocess of test_estimate_within_30_percent_of_measured_cpu_peak
    torch.set_num_threads(1)
    print(json.dumps(measure_step_peaks([tuple(c) for c in json.loads(sys.argv[1])])))
