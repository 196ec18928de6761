"""What the first GPU run would meet, exercised on the CPU: mixed precision (bf16 autocast runs on this CPU), 16-bit
weights, the shipped accelerate config, device placement, bf16 detection, fused AdamW, TF32, memory peaks, the full
state dict of sharded models, flattened rows for flash-attention, captioning loaders and result names."""
from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from hwtools.config import LoopConfig
from hwtools.errors import UserError
from hwtools.llm import data as llm_data
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import MethodConfig, apply_method, save_finetuned
from hwtools.llm.models import load_model_and_tokenizer, quantized_device_map, weights_dtype
from hwtools.train.accelerate_state import reset_accelerate
from hwtools.train.loop import build_optimizer, make_accelerator, train, use_fused_adamw
from hwtools.train.tracking import Tracker
from tests.tiny_models import CHATS, one_torch_thread, tiny_chat_batch  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]




def chat_examples(tok) -> list[dict]:
    batch = tiny_chat_batch(tok)
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    return rows


def train_steps(model, tok, tmp_path, mixed_precision: str, steps: int = 2):
    """`steps` optimiser steps of the shared loop on the tiny chats -> TrainResult."""
    reset_accelerate()
    cfg = LoopConfig(output_dir=str(tmp_path), max_steps=steps, batch_size=2, lr=1e-2, warmup_steps=0,
                     save_every=10**6, log_every=1, report_to="none", mixed_precision=mixed_precision)
    accelerator = make_accelerator(cfg)
    loader = DataLoader(chat_examples(tok), batch_size=2, collate_fn=partial(llm_data.collate_padded, pad_id=0))
    result = train(accelerator, model, loader, causal_lm_loss, cfg, tmp_path, Tracker(accelerator, tmp_path, cfg, {}),
                   eval_loader=loader)
    reset_accelerate()
    return result


# ------------------------------------------------------------------------------------------- crash points 1-4


def test_shipped_accelerate_config_takes_the_gpu_and_falls_back_to_the_cpu(tmp_path):
    cfg = yaml.safe_load((ROOT / "accelerate_config.yaml").read_text())
    assert cfg["use_cpu"] is False  # true exports ACCELERATE_USE_CPU=True: a GPU machine would train on the CPU
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom accelerate import Accelerator\n"
                     "print('device', Accelerator().device, os.environ.get('ACCELERATE_USE_CPU'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_config.yaml"), str(probe)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("device")][-1]
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # no GPU here: the fallback
    assert line.split()[1].startswith(expected) and line.split()[2] in ("None", "False", "false")


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
def test_lora_trains_under_bf16_mixed_precision(weights, tiny_gemma2, tmp_path):
    """accelerate's autocast hands fp32 hidden states back; the LM head (outside the forward) is bf16 for bf16
    weights: the first step used to fail with 'expected m1 and m2 to have the same dtype'."""
    model, tok = load_model_and_tokenizer(str(tiny_gemma2), tmp_path, dtype=weights)
    model = apply_method(model, MethodConfig(method="lora", lora_r=4, lora_dropout=0.0), tok, log=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_steps(model, tok, tmp_path, "bf16")
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    assert result.eval_loss is not None and result.eval_loss > 0
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all("lora_" in n for n in changed)  # the adapters learned, the base stayed frozen
    assert all(p.dtype == torch.float32 for n, p in result.model.named_parameters() if p.requires_grad)
    assert result.model.get_base_model().lm_head.weight.dtype == weights


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("method", ["partial", "full"])
def test_16bit_weights_train_their_trained_weights_in_fp32(method, mixed_precision, tiny_gemma2, tmp_path):
    """fp16 weights: AdamW's epsilon rounds to zero in fp16 (NaN updates) and bf16 loses small updates: the
    trained weights become fp32, the frozen ones keep the loaded dtype, and training moves every trained weight."""
    model, tok = load_model_and_tokenizer(str(tiny_gemma2), tmp_path, dtype=torch.float16)
    model = apply_method(model, MethodConfig(method=method, unfreeze_first=1, unfreeze_last=1), tok, log=None)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert all(v.dtype == torch.float16 for v in frozen.values()) and bool(frozen) == (method == "partial")
    result = train_steps(model, tok, tmp_path, mixed_precision)
    assert torch.isfinite(torch.tensor(result.final_loss))
    params = dict(result.model.named_parameters())
    assert all(torch.isfinite(params[n]).all() for n in trained)
    moved = [n for n in trained if not torch.equal(params[n].detach(), trained[n]) and params[n].ndim == 2]
    assert len(moved) == sum(1 for v in trained.values() if v.ndim == 2)
    assert all(torch.equal(params[n].detach(), v) and params[n].dtype == torch.float16 for n, v in frozen.items())


def test_fp16_adamw_step_would_have_broken_without_fp32_weights():
    """The issue's numbers: one AdamW step on fp16 weights with grads [0, 1e-3, 1, 0] gives NaN/inf."""
    p16 = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p16.grad = torch.tensor([0, 1e-3, 1, 0], dtype=torch.float16)
    torch.optim.AdamW([p16], lr=1e-3, foreach=False).step()
    assert not torch.isfinite(p16).all()  # the failure mode the fp32 trained weights avoid
    p32 = torch.nn.Parameter(torch.ones(4))
    p32.grad = torch.tensor([0, 1e-3, 1, 0])
    torch.optim.AdamW([p32], lr=1e-3, foreach=False).step()
    assert torch.isfinite(p32).all()


def test_qlora_is_placed_on_the_accelerator_device_not_on_cuda_whenever_it_exists(monkeypatch, tiny_gemma2, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert quantized_device_map(torch.device("cpu")) == "cpu"
    assert quantized_device_map(torch.device("cuda", 1)) == {"": 1}
    from transformers import AutoModelForCausalLM

    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        load_model_and_tokenizer(str(tiny_gemma2), tmp_path, quantize_4bit=True, device=torch.device("cpu"))
    assert seen["device_map"] == "cpu"


def test_base_model_moves_to_the_device_before_it_answers(monkeypatch, tiny_gemma2, tmp_path, fresh_accelerate):
    """The recipe moves the model first, then the base answers and chrF run (on the device, with the accelerator
    splitting the prompts between processes)."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train_llm
    finally:
        sys.path.pop(0)
    from hwtools.llm import pipeline

    events = []
    real_load, real_answer, real_chrf = (train_llm.load_model_and_tokenizer, pipeline.answer_prompts,
                                         pipeline.chrf_on_conversations)

    def load(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        real_to = model.to
        model.to = lambda *a, **k: (events.append(("to", str(a[0]) if a else None)), real_to(*a, **k))[1]
        return model, tok

    def answer(model, tok, prompts, gen, accelerator=None):
        events.append(("answer", str(next(model.parameters()).device), accelerator is not None))
        return real_answer(model, tok, prompts, gen, accelerator)

    def chrf(model, tok, convs, n, gen, accelerator=None):
        events.append(("chrf", str(next(model.parameters()).device), accelerator is not None))
        return real_chrf(model, tok, convs, n, gen, accelerator)

    monkeypatch.setattr(train_llm, "load_model_and_tokenizer", load)
    monkeypatch.setattr(pipeline, "answer_prompts", answer)
    monkeypatch.setattr(pipeline, "chrf_on_conversations", chrf)
    out = tmp_path / "run"
    train_llm.main(["--method", "lora", "--model", str(tiny_gemma2), "--output-dir", str(out), "--max-steps", "1",
                    "--batch-size", "2", "--max-length", "96", "--max-train-examples", "8", "--chrf-samples", "1",
                    "--gen-max-new-tokens", "2", "--report-to", "none"])
    assert events[0] == ("to", "cpu")
    assert events[1][0] == "answer" and events[2][0] == "chrf"
    assert all(e[1] == "cpu" and e[2] for e in events[1:])
    assert (out / "summary.json").is_file()


def test_bf16_detection_needs_compute_capability_8(monkeypatch):
    from hwtools.device import bf16_supported, low_precision_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # T4: true through emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert not bf16_supported(cuda) and low_precision_dtype(cuda) == torch.float16
    assert weights_dtype("auto", cuda, "lora") == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert bf16_supported(cuda) and weights_dtype("auto", cuda, "lora") == torch.bfloat16
    assert weights_dtype("auto", cuda, "full") == torch.float32  # every weight trains: fp32 master weights
    monkeypatch.setattr("hwtools.device.cpu_has_bf16", lambda: False)
    assert not bf16_supported(cpu) and weights_dtype("auto", cpu, "lora") == torch.float32
    assert weights_dtype("fp16", cpu) == torch.float16
    with pytest.raises(UserError, match="--dtype"):
        weights_dtype("half", cpu)


# ------------------------------------------------------------------------------------------------- crawls


def test_tf32_is_enabled_on_cuda_only():
    from hwtools.device import enable_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not enable_tf32(torch.device("cpu")) and torch.get_float32_matmul_precision() == "highest"
        assert enable_tf32(torch.device("cuda")) and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_adamw_is_fused_on_cuda_without_sharding():
    from accelerate.utils import DistributedType

    def acc(device, kind):
        return SimpleNamespace(device=torch.device(device), distributed_type=kind)

    assert use_fused_adamw(acc("cuda", DistributedType.NO)) and use_fused_adamw(acc("cuda", DistributedType.MULTI_GPU))
    assert not use_fused_adamw(acc("cuda", DistributedType.FSDP)) and not use_fused_adamw(acc("cpu", DistributedType.NO))
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, LoopConfig(), fused=True).defaults["fused"] is True
    assert not build_optimizer(model, LoopConfig()).defaults["fused"]


def test_peak_memory_reports_every_rank_and_the_reserved_peak():
    from hwtools.train.meters import ResourceMeter

    meter = ResourceMeter(torch.device("cpu"))
    single = meter.as_dict("tokens/s", 1, rank_peaks=meter.peaks_of_all_ranks(SimpleNamespace(num_processes=1)))
    assert single["peak_memory_mb"] > 0 and single["peak_memory_reserved_mb"] is None  # RSS: nothing reserved
    assert single["peak_memory_per_rank_mb"] == [single["peak_memory_mb"]]
    two = meter.as_dict("tokens/s", 2, rank_peaks=[(100.0, 300.0), (150.0, 200.0)])
    assert two["peak_memory_mb"] == 150.0 and two["peak_memory_reserved_mb"] == 300.0
    assert two["peak_memory_per_rank_mb"] == [100.0, 150.0] and "2 processes" in two["peak_memory_scope"]


# --------------------------------------------------------------------------------------------- FSDP save


@pytest.mark.parametrize("method", ["lora", "partial", "full"])
def test_final_weights_save_from_a_gathered_state_dict(method, tiny_gemma2, tmp_path):
    """Under FSDP / ZeRO-3 the main process saves a state dict that accelerate gathered on every rank; saved that
    way, final/ holds the same tensors as when the model saves its own."""
    from safetensors.torch import load_file

    model, tok = load_model_and_tokenizer(str(tiny_gemma2), tmp_path)
    model = apply_method(model, MethodConfig(method=method, lora_r=4, unfreeze_first=1, unfreeze_last=1), tok,
                         log=None)
    cfg = MethodConfig(method=method, lora_r=4, unfreeze_first=1, unfreeze_last=1)
    own = save_finetuned(model, tok, tmp_path / "own", cfg, base_model=str(tiny_gemma2))
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    given = save_finetuned(model, tok, tmp_path / "given", cfg, base_model=str(tiny_gemma2), state_dict=gathered)
    files = sorted(p.name for p in own.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in given.glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(own / name)), load_file(str(given / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "prefix-tuning"])
def test_sharded_models_take_the_same_loss_from_their_own_logits(method, monkeypatch, tiny_gemma2, tmp_path):
    """Under FSDP / DeepSpeed the LM head runs inside the model's forward (the weights are whole only there): that
    loss, its token count and its gradients equal the chunked hidden-state path's."""
    import hwtools.llm.loss as loss_mod

    model, tok = load_model_and_tokenizer(str(tiny_gemma2), tmp_path)
    model = apply_method(model, MethodConfig(method=method, lora_r=4, num_virtual_tokens=4), tok, log=None)
    model.eval()  # no dropout: both passes see the same network (gradients still flow)
    batch = tiny_chat_batch(tok)
    results = []
    for sharded in (False, True):
        monkeypatch.setattr(loss_mod, "_params_sharded", lambda m, s=sharded: s)
        model.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), n, grads))
    (a, n_a, g_a), (b, n_b, g_b) = results
    assert n_a == n_b > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_only_fsdp_and_deepspeed_models_count_as_sharded():
    from hwtools.llm.loss import _params_sharded

    assert not _params_sharded(torch.nn.Linear(2, 2))
    assert not _params_sharded(torch.nn.parallel.DataParallel(torch.nn.Linear(2, 2)))
    assert _params_sharded(type("DeepSpeedEngine", (torch.nn.Module,), {})())


def test_recipe_gathers_the_state_dict_only_for_sharded_models():
    from accelerate.utils import DistributedType

    from hwtools.llm.pipeline import gathered_state_dict

    calls = []

    def acc(kind):
        return SimpleNamespace(distributed_type=kind, get_state_dict=lambda m: calls.append(m) or {"w": 1})

    model = torch.nn.Linear(2, 2)
    assert gathered_state_dict(acc(DistributedType.FSDP), model) == {"w": 1}
    assert gathered_state_dict(acc(DistributedType.DEEPSPEED), model) == {"w": 1}
    assert gathered_state_dict(acc(DistributedType.MULTI_GPU), model) is None
    assert calls == [model, model]


# ------------------------------------------------------------------------------------- attention kernels


def test_attention_implementation_defaults_and_flag(tiny_gemma2, tiny_llama, tmp_path):
    gemma, _ = load_model_and_tokenizer(str(tiny_gemma2), tmp_path)
    llama, _ = load_model_and_tokenizer(str(tiny_llama), tmp_path)
    assert gemma.config._attn_implementation == "eager"  # soft-capping
    assert llama.config._attn_implementation == "sdpa"
    eager_llama, _ = load_model_and_tokenizer(str(tiny_llama), tmp_path, attn_implementation="eager")
    assert eager_llama.config._attn_implementation == "eager"
    with pytest.raises(UserError, match="--attn-implementation"):
        load_model_and_tokenizer(str(tiny_llama), tmp_path, attn_implementation="fast")


def test_flattened_rows_keep_examples_apart_like_packed_rows(tiny_gemma2, tmp_path):
    """collate_flattened (flash-attention's layout) puts a batch of blocks in one row whose position ids restart
    per example; the model's loss on it equals the loss on the same blocks as separate packed rows."""
    model, tok = load_model_and_tokenizer(str(tiny_gemma2), tmp_path)
    blocks = llm_data.pack_examples(chat_examples(tok), 40)
    assert len(blocks) >= 2
    flat = llm_data.collate_flattened(blocks, pad_id=0)
    packed = llm_data.collate_packed(blocks, pad_id=0)
    total = sum(len(b["input_ids"]) for b in blocks)
    assert flat["input_ids"].shape == (1, total) and int(flat["num_tokens"]) == total
    assert (flat["position_ids"][0] == 0).sum() == len(CHATS)  # one restart per example
    # the varlen kernel's boundaries, made on the CPU: the example starts and the end
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert flat["cu_seq_lens_q"].tolist() == starts + [total] and flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == max(b - a for a, b in zip(starts, starts[1:] + [total]))
    with torch.no_grad():
        a, n_a = causal_lm_loss(model.eval(), flat)
        b, n_b = causal_lm_loss(model, packed)
    assert n_a == n_b and abs(a.item() - b.item()) < 1e-5


def test_recipe_flattens_packed_batches_under_flash_attention(tiny_gemma2):
    from transformers import AutoTokenizer

    from hwtools.data_report import DataReport
    from hwtools.llm.pipeline import build_loaders

    tok = AutoTokenizer.from_pretrained(tiny_gemma2)
    convs = [list(c) for c in CHATS] * 3
    for attn, rows in (("flash_attention_2", 1), ("eager", 2)):
        loaders = build_loaders(tok, {"train": convs}, DataReport(), max_length=64, batch_size=2, seed=42,
                                packing=True, attn_implementation=attn)
        batch = next(iter(loaders["train"]))
        assert batch["input_ids"].shape[0] == rows


# ------------------------------------------------------------------------------------------------ captions


def test_caption_loaders_use_workers_for_live_images_on_cuda():
    from hwtools.caption import pipeline as cap_run

    live = cap_run.ImageInputs(None, None, lambda x: x, "live")
    cached = cap_run.ImageInputs({"a": torch.zeros(1)}, None, lambda x: x, "cached")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cap_run.loader_workers(-1, "cuda", live) == max(0, min(4, cores - 1))
    assert cap_run.loader_workers(-1, "cuda", cached) == 0 and cap_run.loader_workers(-1, "cpu", live) == 0
    assert cap_run.loader_workers(3, "cpu", cached) == 3
    loader = cap_run.make_loader([0, 1], 2, shuffle=False, num_workers=2, pin_memory=True)
    assert loader.num_workers == 2 and loader.pin_memory


def test_bench_result_names_carry_the_device_and_keep_the_committed_cpu_files():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import bench_caption
    finally:
        sys.path.pop(0)
    assert bench_caption.result_name(None, torch.device("cpu")) == "caption"  # the committed CPU results
    assert bench_caption.result_name(None, torch.device("cuda")) == "caption_cuda"
    assert bench_caption.result_name("mine", torch.device("cuda")) == "mine"
    committed = {p.stem for p in (ROOT / "results" / "bench").glob("*.json")}
    assert {"caption", "llm", "generate"} <= committed
    script = (ROOT / "launch" / "bench_gpu.sh").read_text()
    named = {script.split("--name", 1)[1].split()[0]} if "--name" in script else set()
    assert not named & committed
