"""causal_lm_loss equals the models' own full-logits loss for every method, without materialising full logits."""
from __future__ import annotations

import pytest
import torch

from hwtools.errors import UserError
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import METHODS, MethodConfig, apply_method, needs_4bit, supports_gradient_checkpointing
from hwtools.llm.models import load_model_and_tokenizer
from tests.tiny_models import CHATS, TINY_ARCHS, one_torch_thread, tiny_chat_batch  # noqa: F401

CFG = dict(num_virtual_tokens=5, lora_r=4, lora_alpha=8.0, lora_dropout=0.0)


def method_model(tiny_dirs, arch, method, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path, quantize_4bit=needs_4bit(method))
    # full/partial train a random model whose base is otherwise frozen; soft prompts get a non-trivial init
    model = apply_method(model, MethodConfig(method=method, **CFG), tok, log=None)
    return model.eval(), tok


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loss_equals_full_logits_loss(arch, method, tiny_dirs, tmp_path):
    model, tok = method_model(tiny_dirs, arch, method, tmp_path)
    batch = tiny_chat_batch(tok)
    with torch.no_grad():
        reference = model(**batch).loss
        ours, n = causal_lm_loss(model, batch)
        chunked, n_chunked = causal_lm_loss(model, batch, chunk_size=7)
    assert n == n_chunked == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(ours.item() - reference.item()) < 1e-5
    assert abs(chunked.item() - reference.item()) < 1e-5


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "prefix-tuning", "full"])
def test_gradients_equal_full_logits_gradients(method, tiny_dirs, tmp_path):
    model, tok = method_model(tiny_dirs, "gemma2", method, tmp_path)  # gemma2: tied head + final softcap
    batch = tiny_chat_batch(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "lora":  # lora_B starts at zero, which would leave lora_A without gradient
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    reference = torch.autograd.grad(model(**batch).loss, params)
    ours = torch.autograd.grad(causal_lm_loss(model, batch, chunk_size=7)[0], params)
    for r, o in zip(reference, ours):
        assert torch.allclose(r, o, atol=1e-6, rtol=1e-4)
    assert any(r.abs().sum() > 0 for r in reference)


def test_logits_exist_only_for_one_chunk_of_label_positions(tiny_dirs, tmp_path):
    model, tok = method_model(tiny_dirs, "gemma3", "lora", tmp_path)
    batch = tiny_chat_batch(tok)
    shapes = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        loss, n = causal_lm_loss(model, batch, chunk_size=8)
        loss.backward()
    finally:
        handle.remove()
    vocab = head.weight.shape[0]
    assert shapes[0][-2] == 0  # the model's own forward computed logits for no position
    chunk_rows = [s[0] for s in shapes[1:]]
    # forward chunks, then the same chunks recomputed in backward (checkpointing)
    assert chunk_rows[: len(chunk_rows) // 2] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    assert max(r * vocab for r in chunk_rows) < batch["input_ids"].numel() * vocab / 10


def _packed_batch(tok, chats):
    """Two chats in one row as collate_packed makes them: restarting position ids and no attention mask (transformers
    builds the block-diagonal causal mask from the position ids)."""
    rows = [tiny_chat_batch(tok, [c]) for c in chats]
    ids = torch.cat([r["input_ids"][0] for r in rows])[None]
    labels = torch.cat([r["labels"][0] for r in rows])[None]
    positions = torch.cat([torch.arange(r["input_ids"].shape[1]) for r in rows])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}, rows


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_packed_rows_give_the_loss_of_separate_rows(arch, tiny_dirs, tmp_path):
    model, tok = method_model(tiny_dirs, arch, "lora", tmp_path)
    packed, rows = _packed_batch(tok, [CHATS[0], CHATS[2]])
    with torch.no_grad():
        loss, n = causal_lm_loss(model, packed)
        reference = model(**packed, use_cache=False).loss
        separate = [causal_lm_loss(model, r) for r in rows]
    # each chat's first token already carries no label (it is the prompt), so no target crosses the boundary
    expected = sum(l.item() * k for l, k in separate) / sum(k for _, k in separate)
    assert n == sum(k for _, k in separate)
    assert abs(loss.item() - expected) < 1e-5 and abs(loss.item() - reference.item()) < 1e-5


def test_packed_rows_with_soft_prompts_are_refused(tiny_dirs, tmp_path):
    model, tok = method_model(tiny_dirs, "llama", "prompt-tuning", tmp_path)
    packed, _ = _packed_batch(tok, [CHATS[0], CHATS[2]])
    with pytest.raises(UserError, match="not supported with soft prompts"):
        causal_lm_loss(model, packed)


def test_batch_without_labels_gives_zero_loss_and_no_tokens(tiny_dirs, tmp_path):
    model, tok = method_model(tiny_dirs, "llama", "lora", tmp_path)
    batch = tiny_chat_batch(tok)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, n = causal_lm_loss(model, batch)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # still part of the graph (a rank with no labels must not break DDP's gradient sync)


def enable_checkpointing(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "lora", "partial"])
def test_loss_with_gradient_checkpointing(method, tiny_dirs, tmp_path):
    assert supports_gradient_checkpointing(method)
    model, tok = method_model(tiny_dirs, "gemma3", method, tmp_path)
    batch = tiny_chat_batch(tok)
    with torch.no_grad():
        plain, _ = causal_lm_loss(model, batch)
    enable_checkpointing(model)
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


def test_prefix_tuning_cannot_use_gradient_checkpointing(tiny_dirs, tmp_path):
    """Why supports_gradient_checkpointing("prefix-tuning") is False: the checkpointed layers drop the prefix."""
    assert not supports_gradient_checkpointing("prefix-tuning")
    model, tok = method_model(tiny_dirs, "llama", "prefix-tuning", tmp_path)
    enable_checkpointing(model)
    with pytest.raises(RuntimeError):
        causal_lm_loss(model, tiny_chat_batch(tok))
