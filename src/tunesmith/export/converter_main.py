"""The child process that runs llama.cpp's own converters for export/converters.py: `convert_hf_to_gguf.py` (a
model directory to GGUF), `convert_lora_to_gguf.py` (a peft LoRA to a GGUF LoRA), and llama.cpp's quantizer.
Run as a script, never imported: it imports llama.cpp's `conversion` package and the gguf-py shipped beside it,
and a crash in either cannot take the export with it.

    python converter_main.py LLAMA_CPP_DIR hf [--pre NAME] [--adds BOS EOS] -- CONVERTER ARGS...
    python converter_main.py LLAMA_CPP_DIR lora -- CONVERTER ARGS...
    python converter_main.py LLAMA_CPP_DIR quantize SRC DST FTYPE

Glue, not a fork: the converters run unchanged, with a few of their methods wrapped for what a tunesmith run is.
- Whether the file's tokenizer adds BOS and EOS is what the run's tokenizer does (`--adds`, 1 or 0 each, from
  export/vocab.py), not what the converter guesses from config keys a saved tokenizer may lack.
- A BPE tokenizer whose pre-tokenizer llama.cpp does not recognise by hash (the test suite's tiny ones, or any
  trained anew) is named by tunesmith (`--pre`, from export/vocab.py) instead of refused.
- transformers 5 saves a tokenizer as tokenizer.json alone, so a run has no SentencePiece tokenizer.model: the
  families whose vocabulary code reads it (Gemma, Gemma 2, Phi-3) get the fallback the Llama converter has for
  exactly that case, the vocabulary in tokenizer.json (SentencePiece-style BPE, else byte-level BPE). That
  fallback (gguf-py's LlamaHfVocab) gives every token the same placeholder score, and llama.cpp's SentencePiece
  tokenizer merges by score, so each merged token gets its merge's rank instead, which makes llama.cpp merge in
  the order the BPE merges of tokenizer.json do; and it writes whether the tokenizer prepends a space.
Measured: without these, a tiny Gemma 2 or Mistral with a SentencePiece-style tokenizer.json (the kind every real
one has) tokenizes otherwise in llama.cpp, and verification refuses the file (tests/test_gguf_families.py)."""

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
    options, converter_args = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    pre = options[options.index("--pre") + 1] if "--pre" in options else None
    adds = tuple(options[options.index("--adds") + 1:][:2]) if "--adds" in options else None
    patch(pre, adds and tuple(a == "1" for a in adds))
    script = llama_cpp_dir / ("convert_hf_to_gguf.py" if command == "hf" else "convert_lora_to_gguf.py")
    sys.argv = [str(script), *converter_args]
    runpy.run_path(str(script), run_name="__main__")


def patch(pre: str | None, adds: tuple[bool, bool] | None) -> None:
    """Wrap the converter's methods as the module docstring says, before it runs."""
    import conversion
    from conversion.base import TextModel

    patch_pre_tokenizer(TextModel, pre)
    patch_sentencepiece(TextModel)
    patch_scores()
    if adds is not None:
        patch_bos_eos(TextModel, adds)
    model_class = conversion.get_model_class

    @functools.wraps(model_class)
    def get_model_class(*args, **kwargs):
        cls = model_class(*args, **kwargs)
        if "set_vocab" in cls.__dict__ and not getattr(cls.set_vocab, "tunesmith_fallback", False):
            cls.set_vocab = vocab_with_fallback(cls.set_vocab)
        return cls

    conversion.get_model_class = get_model_class


def patch_pre_tokenizer(model, pre: str | None) -> None:
    """The converter's pre-tokenizer by hash, else `pre`."""
    recognised = model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:  # "BPE pre-tokenizer was not recognized"
            if pre is None:
                raise
            return pre

    model.get_vocab_base_pre = get_vocab_base_pre


def patch_sentencepiece(model) -> None:
    """A missing tokenizer.model is a FileNotFoundError, which the converter's own fallbacks catch, before
    sentencepiece's ImportError where that package is not installed; the vocabulary read from tokenizer.json in
    its place says whether it prepends a space."""
    sentencepiece, llama_hf = model._create_vocab_sentencepiece, model._set_vocab_llama_hf

    def create_vocab_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return sentencepiece(self)

    def set_vocab_llama_hf(self) -> None:
        llama_hf(self)
        # llama.cpp's SentencePiece vocabulary prepends a space unless told not to; tokenizer.json says whether
        # the tokenizer does (Llama 2, Mistral and Phi-3 prepend "▁", Gemma does not).
        self.gguf_writer.add_add_space_prefix(prepends_space(self.dir_model / "tokenizer.json"))

    model._create_vocab_sentencepiece = create_vocab_sentencepiece
    model._set_vocab_llama_hf = set_vocab_llama_hf


def patch_bos_eos(model, adds: tuple[bool, bool]) -> None:
    """add_bos_token and add_eos_token as the run's tokenizer behaves, over what the converter wrote."""
    metadata = model.prepare_metadata

    def prepare_metadata(self, vocab_only: bool) -> None:
        metadata(self, vocab_only)  # the vocabulary among it
        self.gguf_writer.add_add_bos_token(adds[0])
        self.gguf_writer.add_add_eos_token(adds[1])

    model.prepare_metadata = prepare_metadata


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
            self._set_vocab_gpt2()

    wrapped.tunesmith_fallback = True
    return wrapped


def patch_scores() -> None:
    """LlamaHfVocab's scores from tokenizer.json's merges: a merged token scores minus the rank of its merge."""
    import gguf

    placeholder = gguf.LlamaHfVocab.get_token_score

    def get_token_score(self, token_id: int) -> float:
        if not hasattr(self, "merge_scores"):
            self.merge_scores = merge_scores(Path(self.fname_tokenizer))
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        return self.merge_scores.get(token, placeholder(self, token_id))

    gguf.LlamaHfVocab.get_token_score = get_token_score


def merge_scores(tokenizer_json: Path) -> dict[str, float]:
    """{merged token: -rank} for the BPE merges of a tokenizer.json; the first merge that makes a token counts."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


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
