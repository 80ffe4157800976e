"""The Ollama Modelfile written beside a GGUF export (`ollama create NAME -f Modelfile`): the run's ChatML-style
chat template translated to Ollama's Go template, its default system prompt and its stop tokens."""

from __future__ import annotations

import re

# Ollama's Go template for ChatML (the shape LLaMA-Factory writes): the system prompt, then each turn; a user
# turn opens the assistant's, so the prompt ends ready for the reply.
OLLAMA_CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n"
    "{{ else if eq .Role \"assistant\" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"
)


def ollama_modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF beside it: `ollama create NAME -f Modelfile`. A ChatML-style template
    is translated to Ollama's Go template (with its default system prompt as SYSTEM); any other is left out,
    and a comment says so (the Jinja original is in the GGUF's tokenizer.chat_template)."""
    lines = [f"FROM ./{gguf_name}"]
    system = chatml_system_prompt(tokenizer)
    if system is None:
        why = ("the run has no chat template" if not tokenizer.chat_template else
               "the run's chat template is not ChatML-style, the only kind translated to Ollama's Go template")
        lines.append(f"# No TEMPLATE: {why}; write one by hand (the Jinja original is in the GGUF's "
                     "tokenizer.chat_template).")
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        if system and '"""' not in system:
            lines.append(f'SYSTEM """{system}"""')
        elif system:
            lines.append('# No SYSTEM: the default system prompt contains """, which a Modelfile cannot quote.')
        stops = ["<|im_end|>"] + ([tokenizer.eos_token] if tokenizer.eos_token not in (None, "<|im_end|>") else [])
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def _chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chatml_system_prompt(tokenizer) -> str | None:
    """The template's default system prompt ("" for none) when it renders ChatML, else None. Decided by
    rendering probe conversations, so any Jinja spelling of ChatML qualifies."""
    if not tokenizer.chat_template:
        return None
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]
    with_system = [{"role": "system", "content": "Be brief."}] + turns
    try:
        render = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
                  for m, g in ((with_system, True), (with_system, False), (turns, True))]
    except Exception:  # noqa: BLE001 - a template that cannot render the probes is simply not ChatML
        return None
    if render[0] != _chatml(with_system, True) or render[1] != _chatml(with_system, False):
        return None
    plain = _chatml(turns, True)
    if render[2] == plain:
        return ""
    default = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", render[2][:-len(plain)], re.DOTALL)
    return default.group(1) if render[2].endswith(plain) and default else None
