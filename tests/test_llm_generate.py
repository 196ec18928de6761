"""Batched chat generation: left padding, stop tokens, decoding, prefix tuning without the cache."""
from __future__ import annotations

import pytest
import torch

from hwtools.llm.generate import generate_answers, generate_token_ids, generation_batches, stop_token_ids
from hwtools.llm.loss import causal_lm_loss
from hwtools.llm.methods import MethodConfig, apply_method
from hwtools.llm.models import load_model_and_tokenizer
from hwtools.llm.templates import render_chat
from tests.tiny_models import CHATS, TINY_ARCHS, one_torch_thread, prompts_of, tiny_chat_batch  # noqa: F401


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_left_padded_generation_equals_one_by_one(arch, tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    model.train()
    prompts = prompts_of()
    batched = generate_token_ids(model, tok, prompts, max_new_tokens=8, batch_size=4)
    single = generate_token_ids(model, tok, prompts, max_new_tokens=8, batch_size=1)
    assert batched == single
    assert any(len(ids) == 8 for ids in batched)
    assert tok.padding_side == "right" and model.training  # both restored


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning", "lora"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_method_generates_the_same_batched_as_one_by_one(arch, method, tiny_dirs, tmp_path):
    # PEFT's soft prompts lose the padding mask in batched generation on some architectures (it rebuilds a 4-D
    # mask as all ones), which turned batched answers into noise; generate_token_ids must not depend on batching
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    model = apply_method(model, MethodConfig(method=method, num_virtual_tokens=4, lora_r=4), tok, log=None)
    torch.manual_seed(0)
    with torch.no_grad():  # move every trainable tensor off its start so the method shapes the answers
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    prompts = prompts_of()
    prompts = prompts + prompts[:2]  # equal-length rows: soft prompts still batch those together
    batched = generate_token_ids(model, tok, prompts, max_new_tokens=8, batch_size=4)
    single = generate_token_ids(model, tok, prompts, max_new_tokens=8, batch_size=1)
    assert batched == single and batched[-2:] == batched[:2]


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_soft_prompt_answers_are_the_greedy_continuation_of_the_training_forward(arch, method, tiny_dirs, tmp_path):
    # the forward pass used in training defines what a soft prompt means; PEFT's cached generation drifted from it
    # after the first token (positions after the virtual tokens), so generation must follow it exactly
    model, tok = load_model_and_tokenizer(str(tiny_dirs[arch]), tmp_path)
    model = apply_method(model, MethodConfig(method=method, num_virtual_tokens=4), tok, log=None).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    stops = stop_token_ids(model, tok)
    for turns in prompts_of()[:2]:
        ids = tok(render_chat(tok, turns, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        expected = []
        with torch.no_grad():
            for _ in range(8):
                logits = model(input_ids=torch.tensor([ids + expected])).logits
                nxt = int(logits[0, -1].argmax())
                if nxt in stops:
                    break
                expected.append(nxt)
        assert generate_token_ids(model, tok, [turns], max_new_tokens=8, batch_size=1) == [expected]


def test_generation_batches_keep_soft_prompt_rows_unpadded():
    assert generation_batches([5, 7, 5, 9, 5], 2, same_length=False) == [[0, 1], [2, 3], [4]]
    assert generation_batches([5, 7, 5, 9, 5], 2, same_length=True) == [[0, 2], [4], [1], [3]]


def test_prompt_is_the_template_with_generation_prompt_and_one_bos(tiny_dirs, tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma3"]), tmp_path)
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen["ids"] = kwargs["input_ids"]
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_token_ids(model, tok, [prompts_of()[0]], max_new_tokens=2, batch_size=1)
    text = tok.decode(seen["ids"][0])
    assert text == render_chat(tok, prompts_of()[0], add_generation_prompt=True)
    assert text.endswith("<start_of_turn>model\n") and text.count("<bos>") == 1


def test_stop_tokens_include_end_of_turn(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma2"]), tmp_path)
    assert stop_token_ids(model, tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]


def test_trained_model_answers_and_stops_at_end_of_turn(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    model = apply_method(model, MethodConfig(method="full"), tok, log=None)
    batch = tiny_chat_batch(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):  # memorise the four answers (each ends with <end_of_turn>)
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    answers = generate_answers(model, tok, prompts_of(), max_new_tokens=30, batch_size=3)
    assert answers == [turns[-1]["content"] for turns in CHATS]


def test_prefix_tuning_generates_without_cache_and_matches_manual_call(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["gemma2"]), tmp_path)
    model = apply_method(model, MethodConfig(method="prefix-tuning", num_virtual_tokens=5), tok, log=None).eval()
    prompt = render_chat(tok, prompts_of()[0], add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    manual = model.generate(**enc, max_new_tokens=5, do_sample=False, use_cache=False,
                            eos_token_id=stop_token_ids(model, tok), pad_token_id=tok.pad_token_id)
    expected = manual[0, enc["input_ids"].shape[1]:].tolist()
    expected = expected[: next((i for i, t in enumerate(expected) if t in stop_token_ids(model, tok)), None)]
    assert generate_token_ids(model, tok, [prompts_of()[0]], max_new_tokens=5, batch_size=1) == [expected]


def test_sampling_follows_the_seed(tiny_dirs, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), tmp_path)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate_answers(model, tok, prompts_of(), max_new_tokens=6, batch_size=2, do_sample=True,
                                     temperature=1.5))
    greedy = generate_answers(model, tok, prompts_of(), max_new_tokens=6, batch_size=2)
    assert runs[0] == runs[1] and len(runs[0]) == 4 and runs[0] != greedy
