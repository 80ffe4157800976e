"""The Ollama Modelfile written beside a GGUF export (`ollama create NAME -f Modelfile`): the run's chat template
as Ollama's Go template (the family table's, families.py, for the layout the template writes: ChatML, Llama 3,
Gemma, Phi-3, Mistral, Qwen3, SmolLM3), a ChatML template's default system prompt, and the stop strings."""

from __future__ import annotations

import re

from ..families import UnknownFamilyError, convention_of, family_of


def ollama_modelfile(tokenizer, gguf_name: str, config=None) -> str:
    """An Ollama Modelfile for the GGUF beside it: `ollama create NAME -f Modelfile`. The run's chat template is
    matched to a layout of the family table (`config`: the model's, for a run without a template of its own) and
    written as that layout's Go template and stops; a ChatML template's default system prompt becomes SYSTEM.
    A layout the table does not know is left out, and a comment says so (the Jinja original is in the GGUF's
    tokenizer.chat_template)."""
    try:
        family = family_of(config) if config is not None else None
    except UnknownFamilyError:
        family = None
    convention = convention_of(tokenizer.chat_template, family) if tokenizer.chat_template else None
    lines = [f"FROM ./{gguf_name}"]
    eos = [f'PARAMETER stop "{tokenizer.eos_token}"'] if tokenizer.eos_token else []
    if convention is None:
        why = ("the run has no chat template" if not tokenizer.chat_template else
               "the run's chat template writes turns in a layout tunesmith's family table does not know")
        lines.append(f"# No TEMPLATE: {why}; write one by hand (the Jinja original is in the GGUF's "
                     "tokenizer.chat_template).")
        return "\n".join(lines + eos) + "\n"
    lines.append(f'TEMPLATE """{convention.modelfile_template()}"""')
    system = chatml_system_prompt(tokenizer) if convention.name == "chatml" else None
    if system and '"""' not in system:
        lines.append(f'SYSTEM """{system}"""')
    elif system:
        lines.append('# No SYSTEM: the default system prompt contains """, which a Modelfile cannot quote.')
    stops = convention.parameter_lines()
    return "\n".join(lines + stops + [line for line in eos if line not in stops]) + "\n"


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
