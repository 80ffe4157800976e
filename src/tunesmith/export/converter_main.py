"""The child process that runs llama.cpp's own converters for export/converters.py: `convert_hf_to_gguf.py` (a
model directory to GGUF), `convert_lora_to_gguf.py` (a peft LoRA to a GGUF LoRA), and llama.cpp's quantizer.
Run as a script, never imported: it imports llama.cpp's `conversion` package and the gguf-py shipped beside it,
and a crash in either cannot take the export with it.

    python converter_main.py LLAMA_CPP_DIR hf [--pre NAME] -- CONVERTER ARGS...
    python converter_main.py LLAMA_CPP_DIR lora -- CONVERTER ARGS...
    python converter_main.py LLAMA_CPP_DIR quantize SRC DST FTYPE

Glue, not a fork: the converters run unchanged, with two of their methods wrapped for what a tunesmith run is.
- A BPE tokenizer whose pre-tokenizer llama.cpp does not recognise by hash (the test suite's tiny ones, or any
  trained anew) is named by tunesmith (`--pre`, from export/vocab.py) instead of refused.
- transformers 5 saves a tokenizer as tokenizer.json alone, so a run has no SentencePiece tokenizer.model: the
  families whose vocabulary code reads it (Gemma, Gemma 2, Phi-3) get the fallback the Llama converter has for
  exactly that case, the vocabulary in tokenizer.json (SentencePiece-style BPE, else byte-level BPE)."""

from __future__ import annotations

import functools
import json
import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    # sys.path[0] is this file's folder, which holds tunesmith's gguf.py: it must not shadow gguf-py.
    del sys.path[0]
    llama_cpp_dir, command, rest = Path(argv[0]), argv[1], argv[2:]
    if command == "quantize":
        return quantize(*rest)
    sys.path.insert(0, str(llama_cpp_dir))
    pre = rest[rest.index("--pre") + 1] if "--pre" in rest[:rest.index("--")] else None
    converter_args = rest[rest.index("--") + 1:]
    patch(pre)
    script = llama_cpp_dir / ("convert_hf_to_gguf.py" if command == "hf" else "convert_lora_to_gguf.py")
    sys.argv = [str(script), *converter_args]
    runpy.run_path(str(script), run_name="__main__")


def patch(pre: str | None) -> None:
    import conversion
    from conversion.base import TextModel

    recognised = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:  # "BPE pre-tokenizer was not recognized"
            if pre is None:
                raise
            return pre

    sentencepiece = TextModel._create_vocab_sentencepiece

    def create_vocab_sentencepiece(self):
        # The converter's own fallbacks catch FileNotFoundError; without this check the missing file would
        # surface as sentencepiece's ImportError first, where the package is not installed.
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return sentencepiece(self)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
    model_class = conversion.get_model_class

    @functools.wraps(model_class)
    def get_model_class(*args, **kwargs):
        cls = model_class(*args, **kwargs)
        if "set_vocab" in cls.__dict__ and not getattr(cls.set_vocab, "tunesmith_fallback", False):
            cls.set_vocab = vocab_with_fallback(cls.set_vocab)
        return cls

    conversion.get_model_class = get_model_class


def vocab_with_fallback(set_vocab):
    """`set_vocab`, falling back to tokenizer.json where it fails for want of tokenizer.model (LlamaModel.set_vocab's
    own chain: SentencePiece-style BPE through gguf-py's LlamaHfVocab, else byte-level BPE)."""

    @functools.wraps(set_vocab)
    def wrapped(self):
        if (self.dir_model / "tokenizer.model").is_file():
            return set_vocab(self)
        try:
            return set_vocab(self)
        except (FileNotFoundError, ImportError, ValueError):
            pass
        try:
            self._set_vocab_llama_hf()
        except (FileNotFoundError, TypeError):
            return self._set_vocab_gpt2()
        # llama.cpp's SentencePiece vocabulary prepends a space unless told not to; tokenizer.json says whether
        # the tokenizer does (Llama 2 and Phi-3 prepend "▁", Gemma does not).
        self.gguf_writer.add_add_space_prefix(prepends_space(self.dir_model / "tokenizer.json"))

    wrapped.tunesmith_fallback = True
    return wrapped


def prepends_space(tokenizer_json: Path) -> bool:
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    steps = []
    for part in (spec.get("normalizer"), spec.get("pre_tokenizer")):
        part = part or {}
        steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    return any(s.get("type") == "Prepend" or (s.get("type") == "Metaspace" and s.get("prepend_scheme") != "never")
               for s in steps)


def quantize(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's quantizer (what `llama-quantize SRC DST TYPE` runs), through llama-cpp-python's C API."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {src} to {ftype}")


if __name__ == "__main__":
    main(sys.argv[1:])
