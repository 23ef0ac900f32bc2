"""Chat templates with tool support in the Llama-3.1 and Mistral v3 conventions, for tiny test models.

The family checkpoints of `tests.support.families` render plain chat only; these templates
follow what the real families' templates do with ``tools`` (shortened, same markers), so the
gateway's format detection and parsing run against the text a real model of the family sees:

- **Llama 3.1** (Meta-Llama-3.1-8B-Instruct): an ``ipython`` environment system turn listing
  the functions as JSON and asking for ``{"name": ..., "parameters": ...}``; an assistant call
  is that JSON object alone; tool results come back in the ``ipython`` role.
- **Mistral v3** (Mistral-7B-Instruct-v0.3): ``[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]``
  before the last user turn; a call is ``[TOOL_CALLS] [{"name", "arguments", "id"}]``; results
  are ``[TOOL_RESULTS] {"content", "call_id"}[/TOOL_RESULTS]``. The tiny tokenizer spells these
  markers out as text; the real one has control tokens for them, which the engine's decoder
  drops (`serving.engine.tool_formats.MistralFormat` reads calls either way).

`with_template` copies a checkpoint and sets its tokenizer's template.
"""

from __future__ import annotations

import shutil
from pathlib import Path

LLAMA31_TOOLS_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n'"
    " + 'Given the following functions, respond with a JSON for a function call with its proper arguments. '"
    " + 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.\\n\\n' -}}"
    "{%- for t in tools -%}{{- t | tojson + '\\n\\n' -}}{%- endfor -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- for c in m['tool_calls'] -%}"
    "{{- '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + c.function.arguments | tojson + '}' -}}"
    "{%- endfor -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] or '') | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

MISTRAL_V3_TOOLS_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if tools and loop.index0 == ns.last_user -%}"
    "{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}"
    "{%- endif -%}"
    "{{- '[INST] ' + m['content'] + '[/INST]' -}}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') -%}"
    "{{- '[TOOL_CALLS] [' -}}"
    "{%- for c in m['tool_calls'] -%}"
    "{{- {'name': c.function.name, 'arguments': c.function.arguments, 'id': c.id} | tojson -}}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ']' + eos_token -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{- '[TOOL_RESULTS] ' + ({'content': m['content'], 'call_id': m['tool_call_id']} | tojson) + '[/TOOL_RESULTS]' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- ' ' + m['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def with_template(checkpoint: Path, folder: Path, template: str) -> Path:
    """A copy of ``checkpoint`` at ``folder`` whose tokenizer renders chats with ``template``."""
    from transformers import AutoTokenizer

    if not (folder / "config.json").is_file():
        shutil.copytree(checkpoint, folder, dirs_exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(folder)
    return folder
