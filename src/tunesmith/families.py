"""The model families tunesmith knows, in one table that every component reads: which architectures a family
covers, how its chat template writes a conversation, which strings end a turn, the Ollama Modelfile TEMPLATE
and stop parameters that write and stop the same way, and how a run of it becomes a GGUF file.

Why two tables. An architecture (config.json's `model_type`) says how the weights compute, not how a
conversation is written down: SmolLM2 is a `llama` with ChatML turns, Llama 3.1 a `llama` with header tokens.
So a `Convention` (the layout of turns, recognised from the chat template's own text by `convention_of`) is
kept apart from a `Family` (model_types -> name, the convention its instruct models use, the GGUF path). A
family is one entry in FAMILIES; a new layout of turns is one entry in CONVENTIONS.

Each Ollama template writes exactly what the family's Hugging Face template writes for system, user and
assistant turns (tests/test_families.py renders both and compares), minus the BOS token, which llama.cpp adds
itself. It follows Ollama's conventions (template/template.go): `.Messages` holds every message, system ones
too, and `.System` their joined contents; `.Think`/`.IsThinkSet` carry a request's `think`. Tool turns are not
translated. A template that prints the current date (Llama 3.2, SmolLM3) has `TODAY` where the date goes, and
`Convention.modelfile_template` fills it in: a Modelfile cannot ask for the date, so it keeps the export's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

from .errors import TunesmithError

TODAY = "%TODAY%"  # where a dated template's Ollama TEMPLATE prints the date


@dataclass(frozen=True)
class Convention:
    """How a chat template lays out a conversation."""

    name: str
    markers: tuple[str, ...]
    """Strings that all appear in a chat template of this layout, and together in no other's listed before it."""
    stops: tuple[str, ...]
    """What ends an assistant turn: the string generation stops on (besides the tokenizer's EOS)."""
    starts: tuple[str, ...]
    """What opens a turn: a model that writes one has run past its own, so Ollama stops there too."""
    ollama: str
    """Ollama's Go TEMPLATE that writes the same prompt as the Hugging Face template."""
    today: str | None = None
    """The strftime format of the date the template prints (`strftime_now`); None when it prints none."""
    thinks: bool = False
    """Whether the template switches reasoning on and off (Hugging Face `enable_thinking`, Ollama `think`)."""

    def modelfile_template(self, today: date | None = None) -> str:
        """The TEMPLATE text, with `today` (default: the current date) where the template prints the date."""
        if self.today is None:
            return self.ollama
        return self.ollama.replace(TODAY, (today or date.today()).strftime(self.today))

    def parameter_lines(self) -> list[str]:
        """The Modelfile's `PARAMETER stop` lines: every end-of-turn string, then every turn opener."""
        return [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(self.stops + self.starts)]


@dataclass(frozen=True)
class Family:
    """An architecture family: the model_types it covers and how its runs leave tunesmith."""

    name: str
    model_types: tuple[str, ...]
    convention: str
    """The key in CONVENTIONS of the family's instruct models; a run's own template can say otherwise."""
    gguf: str = "llama.cpp converter"
    """How a run becomes a GGUF file."""


CHATML = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" "assistant" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""

NO_THINK = "(and $.IsThinkSet (not $.Think))"  # the request turned reasoning off
QWEN3 = CHATML + "{{ if " + NO_THINK + " }}<think>\n\n</think>\n\n{{ end }}"

_LLAMA3_TURNS = """\
{{- range .Messages }}
{{- if eq .Role "user" "assistant" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
LLAMA3 = _LLAMA3_TURNS.replace('"user" "assistant"', '"system" "user" "assistant"')


def _dated_llama3(day: str) -> str:
    """Llama 3.1 and 3.2: a system header with dates, printed even without a system message."""
    return ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            f"Today Date: {day}\n\n{{{{ .System }}}}<|eot_id|>\n" + _LLAMA3_TURNS)


# Gemma 3 folds the system message into the first user turn; the role of the assistant is "model".
GEMMA = """\
{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""

PHI3 = """\
{{- range .Messages }}
{{- if eq .Role "system" "user" "assistant" }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}
{{- end }}<|assistant|>
"""

# Mistral v0.3 puts the system message into the last user turn, and only there.
MISTRAL = """\
{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""

SMOLLM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
SMOLLM_THINKING = SMOLLM + (
    " Your role as an assistant involves thoroughly exploring questions through a systematic thinking process "
    "before providing the final precise and accurate solutions. This requires engaging in a comprehensive cycle of "
    "analysis, summarizing, exploration, reassessment, reflection, backtracking, and iteration to develop "
    "well-considered thinking process. Please structure your response into two main sections: Thought and "
    "Solution using the specified format: <think> Thought section </think> Solution section. In the Thought "
    "section, detail your reasoning process in steps. Each step should include detailed considerations such as "
    "analysing questions, summarizing relevant findings, brainstorming new ideas, verifying the accuracy of the "
    "current steps, refining any errors, and revisiting previous steps. In the Solution section, based on various "
    "attempts, explorations, and reflections from the Thought section, systematically present the final solution "
    "that you deem correct. The Solution section should be logical, accurate, and concise and detail necessary "
    "steps needed to reach the conclusion.")

# SmolLM3 opens with a metadata block that it leaves unclosed unless tools are listed (as its template does);
# its `/think` and `/no_think` flags inside a system message are Hugging Face-only: Ollama's `think` sets the mode.
SMOLLM3 = f"""\
<|im_start|>system
## Metadata

Knowledge Cutoff Date: June 2025
Today Date: {TODAY}
Reasoning Mode: {{{{ if {NO_THINK} }}}}/no_think{{{{ else }}}}/think{{{{ end }}}}

## Custom Instructions

{{{{ if .System }}}}{{{{ .System }}}}

{{{{ else if {NO_THINK} }}}}{SMOLLM}

{{{{ else }}}}{SMOLLM_THINKING}

{{{{ end }}}}
{{{{- range .Messages }}}}
{{{{- if eq .Role "user" }}}}<|im_start|>user
{{{{ .Content }}}}<|im_end|>
{{{{ else if eq .Role "assistant" }}}}<|im_start|>assistant
{{{{ if {NO_THINK} }}}}<think>

</think>
{{{{ end }}}}{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}
{{{{- end }}}}<|im_start|>assistant
{{{{ if {NO_THINK} }}}}<think>

</think>
{{{{ end }}}}"""

# Most specific first: convention_of takes the first whose markers all appear.
CONVENTIONS: dict[str, Convention] = {c.name: c for c in (
    Convention("smollm3", ("<|im_start|>", "Reasoning Mode"), ("<|im_end|>",), ("<|im_start|>",), SMOLLM3,
               today="%d %B %Y", thinks=True),
    Convention("qwen3", ("<|im_start|>", "<think>"), ("<|im_end|>",), ("<|im_start|>",), QWEN3, thinks=True),
    Convention("chatml", ("<|im_start|>",), ("<|im_end|>",), ("<|im_start|>",), CHATML),
    Convention("llama3.2", ("<|start_header_id|>", "strftime_now"), ("<|eot_id|>",),
               ("<|start_header_id|>",), _dated_llama3(TODAY), today="%d %b %Y"),
    Convention("llama3.1", ("<|start_header_id|>", "Cutting Knowledge Date"), ("<|eot_id|>",),
               ("<|start_header_id|>",), _dated_llama3("26 Jul 2024")),
    Convention("llama3", ("<|start_header_id|>",), ("<|eot_id|>",), ("<|start_header_id|>",), LLAMA3),
    Convention("gemma", ("<start_of_turn>",), ("<end_of_turn>",), ("<start_of_turn>",), GEMMA),
    Convention("phi3", ("<|assistant|>", "<|end|>"), ("<|end|>",), ("<|system|>", "<|user|>", "<|assistant|>"),
               PHI3),
    Convention("mistral", ("[INST]",), ("</s>",), ("[INST]",), MISTRAL),
)}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "llama3.1"),
    Family("qwen2", ("qwen2",), "chatml"),
    Family("qwen3", ("qwen3",), "qwen3"),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), "gemma"),
    Family("phi3", ("phi3",), "phi3"),
    Family("mistral", ("mistral",), "mistral"),
    Family("smollm3", ("smollm3",), "smollm3"),
)}


class UnknownFamilyError(TunesmithError, ValueError):
    """A model whose architecture no family in FAMILIES covers."""


def family_of(config_or_model_type) -> Family:
    """The family of a model: from its model_type, a transformers config, or a config.json mapping."""
    if isinstance(config_or_model_type, str):
        model_type = config_or_model_type
    elif isinstance(config_or_model_type, Mapping):
        model_type = config_or_model_type.get("model_type")
    else:
        model_type = getattr(config_or_model_type, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES.values())
    raise UnknownFamilyError(f"tunesmith has no model family for model_type {model_type!r}; the families it knows "
                             f"are {known}. A new one is an entry in tunesmith/families.py")


def convention_of(chat_template: str | None, family: Family | None = None) -> Convention | None:
    """The convention a chat template writes, recognised by its markers (None for a layout tunesmith does not
    know); without a template, the family's own, if one is given."""
    if not chat_template:
        return CONVENTIONS[family.convention] if family else None
    return next((c for c in CONVENTIONS.values() if all(marker in chat_template for marker in c.markers)), None)
