"""Export a trained language-model run as one GGUF file (for llama.cpp, Ollama, LM Studio) that carries the
tokenizer and the chat template the run was trained with, plus an Ollama Modelfile beside it (modelfile.py). The
file is then verified against the run (verify.py) before it is moved into place.

Two writers, chosen per run by `gguf_path`: tunesmith's own (write_gguf, below) for plain Llama models with a
byte-level BPE tokenizer (SmolLM2's kind), and llama.cpp's own converter (converters.py, `make setup-fast`) for
every other architecture llama.cpp supports. On Llama the two write bit-identical tensors (f32 to q4_0, measured
on SmolLM2-135M: docs/gguf.md), and tunesmith's needs no model directory on disk nor a second Python process.
What write_gguf puts into the file mirrors llama.cpp's convert_hf_to_gguf.py (LlamaModel,
TextModel.prepare_tensors) and llama-quantize's choice of type per tensor; the format itself is gguf-py's
GGUFWriter (`import gguf` here is that library, not this module)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..models import load_run
from .common import ExportError, open_language_run, refuse_existing, refuse_unmergeable, scratch_beside
from .converters import convert_model, has_converters
from .modelfile import ollama_modelfile
from .quants import QUANTS
from .verify import Verification, mismatch_message, verify_gguf
from .vocab import add_vocab, adds_bos_eos, pre_tokenizer_name, vocab_problem

log = logging.getLogger(__name__)

TUNESMITH, LLAMA_CPP = "tunesmith", "llama.cpp"  # the two writers (gguf_path)


@dataclass
class GGUFExport:
    path: Path
    modelfile: Path
    quant: str
    verification: Verification | None  # None with verify=False
    writer: str = TUNESMITH  # which wrote the file: TUNESMITH or LLAMA_CPP (gguf_path)


def export_gguf(run: str | Path, out: str | Path, *, quant: str = "f16", force: bool = False,
                verify: bool = True, llama_cpp: bool | None = None) -> GGUFExport:
    """Write `run` as the GGUF `out` and an Ollama `Modelfile` beside it. The file is verified under a temporary
    name and moved into place only if it matches the run; an existing output is replaced only with force.
    llama_cpp: also verify with llama.cpp (None: when llama-cpp-python is installed)."""
    out = Path(out)
    if quant not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if Path(run).resolve() in out.resolve().parents:
        raise ExportError(f"{out} is inside the run {run}; export to another directory")
    modelfile = out.with_name("Modelfile")
    refuse_existing(out, modelfile, force=force)
    model, tokenizer, info = _merged(run)
    config = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_beside(out)
    try:
        writer = write_model(model, tokenizer, tmp, quant=quant, name=Path(run).resolve().name, base=info.base_model)
        del model  # verification loads the run afresh: the comparison is with the run as tunesmith serves it
        report = verify_gguf(run, tmp, llama_cpp=llama_cpp) if verify else None
        if report is not None and not report.ok:
            raise ExportError(mismatch_message(report, out))
        runs.write_text(modelfile, ollama_modelfile(tokenizer, out.name, config))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFExport(out, modelfile, quant, report, writer)


def _merged(run):
    """(model, tokenizer, info): the run's weights as one standalone causal LM, of an architecture that can be
    written (gguf_path)."""
    info = open_language_run(run)
    refuse_unmergeable(info, into="the weights a GGUF holds", instead="--gguf")
    model, tokenizer, _ = load_run(run)
    if info.peft:
        model = model.merge_and_unload()
    gguf_path(model.config, tokenizer, info.base_model)
    return model.eval(), tokenizer, info


def write_model(model, tokenizer, path: Path, *, quant: str, name: str, base: str | None = None) -> str:
    """Write `model` and `tokenizer` as the GGUF `path` with the writer gguf_path chooses; which one it was. `name`
    becomes general.name (with the base model's name, for llama.cpp's converter: converted_name)."""
    writer = gguf_path(model.config, tokenizer, base)
    if writer == TUNESMITH:
        write_gguf(model, tokenizer, path, quant=quant, name=name, base=base)
    else:
        convert_model(model, tokenizer, path, quant=quant, name=converted_name(name, base, model.config, tokenizer),
                      pre=pre_tokenizer_name(tokenizer, base), adds=adds_bos_eos(tokenizer))
    return writer


def converted_name(name: str, base: str | None, config, tokenizer) -> str:
    """general.name of a file llama.cpp's converter writes: the run's name and its base's. llama.cpp keys some of a
    family's tokenizer on general.name: Phi-3's control tokens strip the whitespace to their right only in a model
    whose name says "phi-3" or "phi3" (llama-vocab.cpp, `_contains_any(model_name, ...)`), so a Phi-3 run whose
    tokenizer strips so is named for it, whatever its base's directory is called (a Phi-4, whose tokens do not
    strip, is not)."""
    named = f"{name} ({Path(base).name})" if base and Path(base).name != name else name
    strips = any(t.special and t.rstrip for t in tokenizer.added_tokens_decoder.values())
    if config.model_type == "phi3" and strips and not any(k in named.lower() for k in ("phi-3", "phi3")):
        named += " [phi3]"
    return named


def gguf_path(config, tokenizer=None, base: str | None = None) -> str:
    """Which writer a model takes: TUNESMITH where tunesmith's own writer covers it (a plain Llama and, when
    `tokenizer` is given, a byte-level BPE tokenizer), else LLAMA_CPP when `make setup-fast` has installed
    llama.cpp's converter; without it, an ExportError that says so."""
    problem = llama_problem(config) or (vocab_problem(tokenizer, base) if tokenizer is not None else None)
    if problem is None:
        return TUNESMITH
    if has_converters():
        return LLAMA_CPP
    raise ExportError(f"this run's model needs llama.cpp's GGUF converter: {problem}. tunesmith's own writer covers "
                      "plain Llama models with a byte-level BPE tokenizer (such as SmolLM2); run `make setup-fast`, "
                      "which installs llama.cpp's converter for every architecture llama.cpp supports")


def llama_problem(config) -> str | None:
    """Why tunesmith's own writer cannot write a model of this config (None: it can)."""
    if config.model_type != "llama":
        return f"its architecture is {config.model_type!r}, not 'llama'"
    unsupported = [flag for flag in ("attention_bias", "mlp_bias") if getattr(config, flag, False)]
    if config.hidden_act != "silu":
        unsupported.append(f"hidden_act={config.hidden_act}")
    rope_type = _rope(config).get("rope_type") or "default"
    if rope_type != "default":
        unsupported.append(f"{rope_type} rope scaling")
    return f"this Llama has {', '.join(unsupported)}" if unsupported else None


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def write_gguf(model, tokenizer, path: Path, *, quant: str, name: str, base: str | None = None) -> None:
    """Write a Llama model and its tokenizer as GGUF at `path` (not atomic: `export_gguf` renames it in)."""
    import gguf

    if (problem := llama_problem(model.config)) is not None:
        raise ExportError(f"tunesmith's GGUF writer writes plain Llama models; {problem}")

    file_type, weight_type = (getattr(gguf.LlamaFileType, QUANTS[quant][0]),
                              getattr(gguf.GGMLQuantizationType, QUANTS[quant][1]))
    config = model.config
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    add_vocab(writer, tokenizer, config.vocab_size, base)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, data, qtype in _tensors(model, weight_type):
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    write_file(writer, path)


def write_file(writer, path: Path) -> None:
    """Write what a GGUFWriter holds (metadata, then tensors) to `path`, and close it."""
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute_for_rope(weights, n_head: int):
    """Reorder q_proj/k_proj rows for llama.cpp's rope. transformers rotates the two halves of each head
    ([x0..x(d/2-1) | y0..y(d/2-1)]); llama.cpp rotates adjacent pairs (x0 y0 x1 y1 ...), so each head's rows go
    (2, d/2) -> (d/2, 2). transformers' GGUF loader applies the inverse. (convert_hf_to_gguf.LlamaModel.permute)
    weights: (n_head * d, in_features) -> same shape."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensors(model, weight_type):
    """(GGUF name, data, type) per tensor, with the types convert_hf_to_gguf and llama-quantize choose."""
    import gguf

    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(config.tie_word_embeddings)
    F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    low_bit = weight_type.name.startswith(("Q4", "Q5"))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a file without output.weight is read as tied, by llama.cpp and transformers alike
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"the model's tensor {hf_name} has no GGUF name in the Llama architecture")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_for_rope(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_for_rope(data, n_kv)
        if data.ndim <= 1 or new_name.endswith("_norm.weight"):
            qtype = F32  # norms and other vectors are tiny and sensitive: always F32
        elif low_bit and (new_name == "output.weight" or (tied and new_name == "token_embd.weight")):
            # llama-quantize keeps the output projection at Q6_K, falling back to Q8_0 when rows are not a
            # multiple of 256 (SmolLM2's 576); gguf-py cannot write Q6_K, so Q8_0 here.
            qtype = Q8_0
        else:
            qtype = weight_type
        try:
            quantized = gguf.quants.quantize(data, qtype)
        except gguf.QuantError as err:  # rows not a multiple of the block size: F16, as convert_hf_to_gguf does
            log.warning("%s: %s; writing it as F16", new_name, err)
            qtype, quantized = F16, gguf.quants.quantize(data, F16)
        yield new_name, quantized, qtype
