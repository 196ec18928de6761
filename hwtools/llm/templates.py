"""Chat templates: the Gemma turn format for tokenizers that ship none, and rendering with the tokenizer's own."""
from __future__ import annotations

from pathlib import Path

from hwtools.errors import UserError

_ASSETS = Path(__file__).parent / "assets"
# The instruct models' own templates, verbatim from the hub's tokenizer_config.json (chat_template): Gemma-2-it
# raises on a system turn (render_chat merges it into the first user turn); Llama-3.2-Instruct opens every
# conversation with a system header holding "Cutting Knowledge Date" and "Today Date" lines.
GEMMA2_IT_CHAT_TEMPLATE = (_ASSETS / "chat_template_gemma-2-it.jinja").read_text(encoding="utf-8")
LLAMA32_INSTRUCT_CHAT_TEMPLATE = (_ASSETS / "chat_template_llama-3.2-instruct.jinja").read_text(encoding="utf-8")

# The Gemma-3 instruction format, for the embedded Gemma-3-270M GGUF whose tokenizer carries no template.
# Gemma has no system role: like Gemma-3's own template, a system message becomes the first user turn's opening
# paragraph. String contents only (the pipeline never sends multimodal parts).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


def merge_system_into_first_user(turns: list[dict]) -> list[dict]:
    """Fold a leading system turn into the first user turn ("system\\n\\nuser"), the way Gemma-3's template does."""
    if not turns or turns[0]["role"] != "system":
        return list(turns)
    system, rest = turns[0]["content"].strip(), list(turns[1:])
    if rest and rest[0]["role"] == "user" and system:
        rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    return rest


def render_chat(tokenizer, turns: list[dict], add_generation_prompt: bool = False) -> str:
    """Render turns with the tokenizer's own chat template; a template that rejects the system role
    (Gemma-2: "System role not supported") gets the system message merged into the first user turn."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"tokenizer {name} has no chat template; use an instruction-tuned model or set one")
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # jinja TemplateError raised by the template itself
        if not turns or turns[0]["role"] != "system":
            raise
        # Gemma-2 says "System role not supported"; older Mistral templates only complain about alternation
        merged = merge_system_into_first_user(turns)
    return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=add_generation_prompt)
