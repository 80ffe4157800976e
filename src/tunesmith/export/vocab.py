"""A run's tokenizer written into a GGUF file, as llama.cpp's "gpt2" vocabulary. Tokens, token types, merges,
special ids, the pre-tokenizer's name and the run's chat template, as llama.cpp's convert_hf_to_gguf.py
(_set_vocab_gpt2) writes them; byte-level BPE tokenizers only. The pre-tokenizer's name is also what llama.cpp's
own converter is told where it does not recognise a tokenizer (export/converter_main.py)."""

from __future__ import annotations

import functools
import json

from .common import ExportError

# The splits before BPE that llama.cpp implements, by its name (tokenizer.ggml.pre), as tokenizers' JSON spells
# them: one tuple per pre-tokenizer step (see _step). llama.cpp's converter recognises real checkpoints by a hash
# of their tokenization; this table names a tokenizer it has not seen (a tiny test one, or one trained anew).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM's: digits one by one, then GPT-2's split
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",  # Llama 3's
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",  # Qwen2's (and Qwen3's)
}


def tokenizer_spec(tokenizer) -> dict:
    """The tokenizer's tokenizers JSON (model, pre-tokenizer, decoder ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer; this run's is a slow Python one")
    return json.loads(backend.to_str())


def vocab_problem(tokenizer, base: str | None = None) -> str | None:
    """Why add_vocab cannot write this tokenizer (None: it can)."""
    spec = tokenizer_spec(tokenizer)
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return f"its tokenizer is {spec['model']['type']}, not byte-level BPE (GPT-2 style, like SmolLM2's)"
    if pre_tokenizer_name(tokenizer, base) is None:
        return (f"its tokenizer's pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:120]}) is none of those "
                f"tunesmith can name for llama.cpp ({', '.join(PRE_TOKENIZERS.values())})")
    return None


def add_vocab(writer, tokenizer, vocab_size: int, base: str | None) -> None:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary, and the run's chat template."""
    import gguf

    if (problem := vocab_problem(tokenizer, base)) is not None:
        raise ExportError(f"tunesmith's GGUF writer cannot write this run's tokenizer: {problem}")
    spec = tokenizer_spec(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                          "embeddings; resize the embeddings before exporting")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # as convert_hf_to_gguf.get_vocab_base
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, base))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges as strings "a b"; a space inside a piece is written as U+0120 (gguf.SpecialVocab's convention).
    writer.add_token_merges([m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
                             for m in spec["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    byte_level = next((p for p in _pre_steps(spec) if p["type"] == "ByteLevel"), {})
    writer.add_add_space_prefix(bool(byte_level.get("add_prefix_space", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)  # the template the run was trained with


def adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before a text and EOS after it, read off its behaviour rather than its
    config keys (tokenizer.ggml.add_bos_token / add_eos_token)."""
    bare, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    return (len(full) > len(bare) and full[0] == tokenizer.bos_token_id,
            len(full) > len(bare) and full[-1] == tokenizer.eos_token_id)


def _pre_steps(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _step(step: dict) -> tuple:
    """One pre-tokenizer step as PRE_TOKENIZERS spells it: its type and the setting that decides its split."""
    kind = step.get("type")
    if kind == "Split":
        return kind, (step.get("pattern") or {}).get("Regex")
    if kind == "ByteLevel":
        return kind, step.get("use_regex", True)
    if kind == "Digits":
        return kind, step.get("individual_digits")
    return (kind,)


def pre_tokenizer_name(tokenizer, base: str | None = None) -> str | None:
    """llama.cpp's name for how the tokenizer splits text before BPE (tokenizer.ggml.pre), or None when it is
    none of PRE_TOKENIZERS. A model embedded as GGUF keeps its file's name (SmolLM2's is "smollm")."""
    if base is not None and (pre := _embedded_pre(base)) is not None:
        return pre
    return PRE_TOKENIZERS.get(tuple(_step(p) for p in _pre_steps(tokenizer_spec(tokenizer))))


@functools.lru_cache(maxsize=None)
def _embedded_pre(base: str) -> str | None:
    """tokenizer.ggml.pre of the GGUF an embedded model ships as, or None (reading its metadata takes ~3 s)."""
    import gguf

    from ..models import embedded_gguf

    path = embedded_gguf(base)
    if path is None or not path.is_file():
        return None
    pre = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return pre.contents() if pre is not None else None
