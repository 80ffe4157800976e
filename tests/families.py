"""Tiny random models of each model family, built in seconds and saved like the suite's other tiny models: the
family's transformers architecture (2 layers, hidden 32), the tiny BPE tokenizer of conftest.py with the family's
special tokens added and its real chat template set, and BOS, EOS, padding and the generation config's stop
tokens named as the real instruct model names them. tests/test_families.py runs each through the whole loop.

Adding a family is one entry in TINY."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Tiny:
    """One family's tiny model: what to build and what its real instruct model does."""

    name: str
    family: str  # key in tunesmith.families.FAMILIES
    architecture: str  # the transformers model class, e.g. "Gemma3ForCausalLM"
    template: str  # the chat template's file in tests/templates/, copied from the model's tokenizer_config.json
    specials: tuple[str, ...]  # control tokens the tokenizer adds (beyond conftest's SPECIALS)
    tokens: dict  # bos_token, eos_token, pad_token, unk_token as the real tokenizer names them
    stops: tuple[str, ...]  # generation_config.eos_token_id of the real model, as token strings
    settings: dict = field(default_factory=dict)  # config fields beside the shared tiny sizes
    words: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <think>, <tool_call>)
    rstrip: tuple[str, ...] = ()  # control tokens that swallow the whitespace to their right (Phi-3)
    system: bool = True  # whether the template takes a system message (Gemma 2's refuses one)
    reply_prefix: str = ""  # what the template prints between the generation prompt and the reply (Mistral: " ")
    last_reply_prefix: str = ""  # what it prints before the conversation's last reply only (Qwen3: empty thinking)
    convention: str | None = None  # the template's key in CONVENTIONS when it is not the family's own

    @property
    def chat_template(self) -> str | None:
        """The template's text, or None when its file is not in tests/templates/ (yet)."""
        path = TEMPLATES / self.template
        return path.read_text(encoding="utf-8") if path.is_file() else None


LLAMA3_SPECIALS = ("<|end_of_text|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")
QWEN_WORDS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
HEAD_DIM = {"head_dim": 8}  # 32 / 4 heads; the architectures that size heads apart from the hidden size need it
# Queries scaled by 1/sqrt(head_dim), as real Gemma 2/3 models (but 27B) do and as llama.cpp always computes them
# (transformers' default query_pre_attn_scalar of 256 would make llama.cpp's attention differ from the run's).
GEMMA_SETTINGS = {"tie_word_embeddings": True, "query_pre_attn_scalar": HEAD_DIM["head_dim"], **HEAD_DIM}

TINY: dict[str, Tiny] = {t.name: t for t in (
    # meta-llama/Llama-3.1-8B-Instruct: turns end with <|eot_id|>, which is also the tokenizer's EOS.
    Tiny("llama", "llama", "LlamaForCausalLM", "llama-3.1-instruct.jinja", LLAMA3_SPECIALS,
         {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
         ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    # meta-llama/Llama-3.2-1B-Instruct: as 3.1, but the system header carries today's date; tied embeddings.
    Tiny("llama3.2", "llama", "LlamaForCausalLM", "llama-3.2-instruct.jinja", LLAMA3_SPECIALS,
         {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
         ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), {"tie_word_embeddings": True}, convention="llama3.2"),
    # Qwen/Qwen2.5-0.5B-Instruct: no BOS, EOS <|im_end|>, padding <|endoftext|>, tied embeddings.
    Tiny("qwen2", "qwen2", "Qwen2ForCausalLM", "qwen2.5-instruct.jinja", (),
         {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ("<|im_end|>", "<|endoftext|>"),
         {"tie_word_embeddings": True}, words=QWEN_WORDS),
    # Qwen/Qwen3-0.6B: as Qwen2.5, plus <think> and </think> as plain added tokens; the last reply of a
    # conversation is printed after an empty thinking block.
    Tiny("qwen3", "qwen3", "Qwen3ForCausalLM", "qwen3.jinja", (),
         {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ("<|im_end|>", "<|endoftext|>"),
         {"tie_word_embeddings": True, **HEAD_DIM}, words=QWEN_WORDS + ("<think>", "</think>"),
         last_reply_prefix="<think>\n\n</think>\n\n"),
    # google/gemma-2-2b-it: refuses a system message; turns end with <end_of_turn>, EOS is <eos>.
    Tiny("gemma2", "gemma", "Gemma2ForCausalLM", "gemma-2-it.jinja", GEMMA_SPECIALS,
         {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
         ("<eos>", "<end_of_turn>"), GEMMA_SETTINGS, system=False),
    # google/gemma-3-1b-it: the system message is folded into the first user turn.
    Tiny("gemma3", "gemma", "Gemma3ForCausalLM", "gemma-3-it.jinja", GEMMA_SPECIALS,
         {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
         ("<eos>", "<end_of_turn>"), GEMMA_SETTINGS),
    # microsoft/Phi-3-mini-4k-instruct: role and end tokens strip the whitespace to their right.
    Tiny("phi3", "phi3", "Phi3ForCausalLM", "phi-3-mini-instruct.jinja",
         ("<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
         {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
         ("<|endoftext|>", "<|assistant|>", "<|end|>"),
         rstrip=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    # mistralai/Mistral-7B-Instruct-v0.3: [INST] ... [/INST] and a reply that ends with EOS </s>.
    Tiny("mistral", "mistral", "MistralForCausalLM", "mistral-7b-instruct-v0.3.jinja",
         ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
          "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
         {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, ("</s>",), reply_prefix=" "),
    # HuggingFaceTB/SmolLM3-3B: ChatML with a metadata system block; <think> and </think> plain added tokens.
    Tiny("smollm3", "smollm3", "SmolLM3ForCausalLM", "smollm3.jinja", LLAMA3_SPECIALS,
         {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|finetune_right_pad_id|>"},
         ("<|im_end|>",), {"tie_word_embeddings": True}, words=("<think>", "</think>")),
)}


def tokenizer_for(tiny: Tiny, bpe):
    """The tiny BPE tokenizer with the family's tokens added and its chat template set."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    extended = bpe.__class__.from_str(bpe.to_str())
    extended.add_special_tokens([AddedToken(t, rstrip=t in tiny.rstrip, normalized=False, special=True)
                                 for t in tiny.specials])
    extended.add_tokens([AddedToken(t, normalized=False, special=False) for t in tiny.words])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=extended, chat_template=tiny.chat_template, **tiny.tokens)
    return tokenizer


def build(tiny: Tiny, bpe, directory: Path) -> Path:
    """The tiny model of `tiny`'s family, randomly initialised (seed 0) and saved to `directory` with its
    tokenizer and a generation config whose stop tokens are the real model's."""
    import torch
    import transformers

    tokenizer = tokenizer_for(tiny, bpe)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tiny.tokens.items()}
    stops = [tokenizer.convert_tokens_to_ids(t) for t in tiny.stops]
    model_class = getattr(transformers, tiny.architecture)
    config = model_class.config_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=ids.get("bos_token"),
        eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=ids.get("pad_token"),
        **{"tie_word_embeddings": False, **tiny.settings})
    torch.manual_seed(0)
    model = model_class(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
