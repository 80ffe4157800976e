"""Export a trained language-model run as one GGUF file (for llama.cpp, Ollama, LM Studio) that carries the
tokenizer and the chat template the run was trained with, plus an Ollama Modelfile beside it. The file is then
loaded back with transformers and compared with the run: a broken export fails here, not in a user's chat.

What goes into the file mirrors llama.cpp's convert_hf_to_gguf.py (LlamaModel, TextModel.prepare_tensors,
_set_vocab_gpt2) and llama-quantize's choice of type per tensor; the format itself is gguf-py's GGUFWriter."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import runs
from .export import UNMERGEABLE, ExportError
from .models import load_run

log = logging.getLogger(__name__)

# --quant: (the file's general.file_type, the type of its 2-D weights), as gguf-py names them.
QUANTS = {
    "f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q5_1": ("MOSTLY_Q5_1", "Q5_1"), "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
    "q4_1": ("MOSTLY_Q4_1", "Q4_1"), "q4_0": ("MOSTLY_Q4_0", "Q4_0"),
}

@dataclass(frozen=True)
class Tolerance:
    """What a verified export of one quant type must show against the run, over every position of the prompt
    set (the prompts and the run's own greedy continuations of them)."""
    top1: float  # the least share of positions where the file's most likely next token is the run's
    kl: float  # the largest mean KL(run || file) of the next-token distributions, in nats


# Set from SmolLM2-135M (runs/demo-bf16, a LoRA run on the embedded model; the table is in docs/gguf.md, from
# benchmarks/gguf_quality.py): the worse of the two loaders (transformers, llama.cpp) with a margin, top-1 about
# 0.04-0.15 under the measured share and KL 2-3x over the measured mean. Measured: f16 0.997 / 1.2e-5, bf16
# 0.993 / 7.0e-4, q8_0 0.972 / 7.8e-3, q5_0 0.857 / 0.143, q4_1 0.721 / 0.650, q4_0 0.669 / 0.586 (q5_1 not
# measured: q5_0's bound; f32: the tiny test models' 1.000 / <= 3e-8). A 135M model loses much to 4-5 bit weights,
# so the low-bit bounds are loose: they refuse a grossly wrong file, not a subtly wrong one (tested: a file without
# the q/k rope permutation, on a tiny model whose attention matters, reaches top-1 0.66 / KL 5e-3 and fails f32's).
TOLERANCE = {"f32": Tolerance(1.0, 1e-6), "f16": Tolerance(0.98, 2e-4), "bf16": Tolerance(0.95, 2e-3),
             "q8_0": Tolerance(0.90, 0.02), "q5_1": Tolerance(0.75, 0.35), "q5_0": Tolerance(0.75, 0.35),
             "q4_1": Tolerance(0.55, 1.5), "q4_0": Tolerance(0.55, 1.5)}
# An adapter run's file must also keep what training changed: its KL from the run at most this share of the base
# model's KL from the run. Measured on the demo run over SmolLM2 (base: 0.55 nats from the run): q8_0 0.003 keeps
# it; q4_1 (0.51) rounds the merged weights back onto the embedded base's own Q4_1 grid, and q4_0 (0.59) is
# further from the run than the untrained base, and both halve or zero the run's exact match (docs/gguf.md).
TRAINING_KEPT = 0.5
GREEDY_MUST_MATCH = {"f32"}  # elsewhere rounding may flip a near-tie; the count is reported, not required
FINER = {"q4_0": "q8_0", "q4_1": "q8_0", "q5_0": "q8_0", "q5_1": "q8_0", "q8_0": "f16", "bf16": "f16",
         "f16": "f32"}  # what an error suggests instead

# A fixed prompt set: chats rendered with the run's own template, and plain text with special tokens, digits
# and non-ASCII bytes, so the tokenizer round trip is exercised too.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Q: 2+2?"}],
    [{"role": "user", "content": "My order arrived damaged. What should I do?"},
     {"role": "assistant", "content": "I'm sorry to hear that! Could you send me your order number?"},
     {"role": "user", "content": "It is 48213."}],
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Q: 3+1?\nA: 4\n\nQ: 12+30?\nA:",
         "<|im_start|>user\nnaïve café, 🦙 déjà vu<|im_end|>"]
GREEDY_TOKENS = 16

# Ollama's Go template for ChatML (the shape LLaMA-Factory writes): the system prompt, then each turn; a user
# turn opens the assistant's, so the prompt ends ready for the reply.
OLLAMA_CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n"
    "{{ else if eq .Role \"assistant\" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"
)


@dataclass
class Comparison:
    """How one loader's logits for the file compare with the run's, over every position of the prompt set."""
    backend: str  # "transformers" or "llama.cpp"
    positions: int
    top1: float  # share of positions whose most likely next token is the run's
    kl: float  # mean KL(run || file) of the next-token distributions, in nats
    max_logit_diff: float  # max |logit(file) - logit(run)|, for information
    logit_scale: float  # max |logit(run)|
    greedy_same: int  # prompts whose greedy continuation (GREEDY_TOKENS) is the run's
    prompts: int
    kl_base: float | None = None  # mean KL(run || base model) over the same positions: adapter runs only

    def problems(self, quant: str) -> list[str]:
        tol, problems = TOLERANCE[quant], []
        if self.top1 < tol.top1:
            problems.append(f"{self.backend}: the most likely next token is the run's at only {self.top1:.3f} of "
                            f"{self.positions} positions, below the {tol.top1:g} required for {quant}")
        if not self.kl <= tol.kl:  # NaN fails too
            problems.append(f"{self.backend}: the mean KL divergence from the run's next-token distribution is "
                            f"{self.kl:.3g} nats, over the {tol.kl:g} tolerated for {quant}")
        if self.kl_base is not None and not self.kl <= TRAINING_KEPT * self.kl_base:
            problems.append(f"{self.backend}: the file lost what training changed: it is {self.kl:.3g} nats from "
                            f"the run, and the base model without the adapter is {self.kl_base:.3g}; a file must "
                            f"be at most {TRAINING_KEPT:g} times as far")
        if quant in GREEDY_MUST_MATCH and self.greedy_same < self.prompts:
            problems.append(f"{self.backend}: greedy continuations differ on {self.prompts - self.greedy_same}/"
                            f"{self.prompts} prompts, where {quant} must reproduce them all")
        return problems

    def __str__(self) -> str:
        return (f"{self.backend}: top-1 agreement {self.top1:.3f} over {self.positions} positions, mean KL "
                f"{self.kl:.2e} nats, max |logit difference| {self.max_logit_diff:.3g} "
                f"({self.max_logit_diff / max(self.logit_scale, 1e-12):.1e} of the largest logit); greedy "
                f"continuations identical on {self.greedy_same}/{self.prompts} prompts"
                + (f"; the base model is {self.kl_base:.2e} nats from the run" if self.kl_base is not None else ""))


@dataclass
class Verification:
    """How the exported file compares with the run: the exact checks (chat template, token ids) and, per
    loader, the logits against TOLERANCE[quant]."""
    quant: str
    comparisons: list[Comparison]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        tol = TOLERANCE[self.quant]
        return (f"{self.quant} (tolerance: top-1 agreement >= {tol.top1:g}, mean KL <= {tol.kl:g} nats): "
                + "; ".join(map(str, self.comparisons)))


@dataclass
class GGUFExport:
    path: Path
    modelfile: Path
    quant: str
    verification: Verification | None  # None with verify=False


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------

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
    for path in (out, modelfile):
        if path.exists() and not force:
            raise ExportError(f"{path} already exists; pass --force to replace it")
    model, tokenizer, info = _merged(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}-{os.getpid()}.tmp.gguf")  # beside `out`, so the rename is atomic
    try:
        write_gguf(model, tokenizer, tmp, quant=quant, name=Path(run).resolve().name, base=info.base_model)
        del model  # verification loads the run afresh: the comparison is with the run as tunesmith serves it
        report = verify_gguf(run, tmp, llama_cpp=llama_cpp) if verify else None
        if report is not None and not report.ok:
            raise ExportError(mismatch_message(report, out))
        runs.write_text(modelfile, ollama_modelfile(tokenizer, out.name))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFExport(out, modelfile, quant, report)


def _merged(run):
    """(model, tokenizer, info): the run's weights as one standalone causal LM."""
    info = runs.open_run(run, task="sft", purpose="exported as GGUF")
    if info.method in UNMERGEABLE:
        raise ExportError(f"{info.method} tuning learns virtual tokens, which cannot be merged into the weights "
                          "a GGUF holds; export the adapter instead (without --gguf)")
    model, tokenizer, _ = load_run(run)
    if info.peft:
        model = model.merge_and_unload()
    check_supported(model.config)
    return model.eval(), tokenizer, info


def check_supported(config) -> None:
    if config.model_type != "llama":
        raise ExportError(f"GGUF export supports the Llama architecture (model_type 'llama', e.g. SmolLM2); this "
                          f"run's model is {config.model_type!r}")
    unsupported = [flag for flag in ("attention_bias", "mlp_bias") if getattr(config, flag, False)]
    if config.hidden_act != "silu":
        unsupported.append(f"hidden_act={config.hidden_act}")
    rope_type = _rope(config).get("rope_type") or "default"
    if rope_type != "default":
        unsupported.append(f"{rope_type} rope scaling")
    if unsupported:
        raise ExportError(f"GGUF export supports plain Llama models; this one has {', '.join(unsupported)}")


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


# ---------------------------------------------------------------------------------------------------------
# the file: metadata, vocabulary, tensors
# ---------------------------------------------------------------------------------------------------------

def write_gguf(model, tokenizer, path: Path, *, quant: str, name: str, base: str | None = None) -> None:
    """Write a Llama model and its tokenizer as GGUF at `path` (not atomic: `export_gguf` renames it in)."""
    import gguf

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
    _add_vocab(writer, tokenizer, config.vocab_size, base)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, data, qtype in _tensors(model, weight_type):
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
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


def _add_vocab(writer, tokenizer, vocab_size: int, base: str | None) -> None:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary, and the run's chat template."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer; this run's is a slow Python one")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, like SmolLM2's); this run's "
                          f"is a {spec['model']['type']} tokenizer")
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
    writer.add_tokenizer_pre(_pre_tokenizer(spec, base))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges as strings "a b"; a space inside a piece is written as U+0120 (gguf.SpecialVocab's convention).
    writer.add_token_merges([m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
                             for m in spec["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # What the tokenizer adds around a text, read off its behaviour rather than its config keys.
    bare, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    writer.add_add_bos_token(len(full) > len(bare) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(bare) and full[-1] == tokenizer.eos_token_id)
    byte_level = next((p for p in _pre_steps(spec) if p["type"] == "ByteLevel"), {})
    writer.add_add_space_prefix(bool(byte_level.get("add_prefix_space", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)  # the template the run was trained with


def _pre_steps(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _pre_tokenizer(spec: dict, base: str | None) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (tokenizer.ggml.pre). A model embedded as
    GGUF keeps its file's name (SmolLM2's is "smollm"); otherwise it is recognised from the pre-tokenizer."""
    if base is not None and (pre := _embedded_pre(base)) is not None:
        return pre
    steps = [(p.get("type"), p.get("use_regex", True), p.get("individual_digits")) for p in _pre_steps(spec)]
    if steps == [("ByteLevel", True, None)]:
        return "gpt-2"
    if steps == [("Digits", True, True), ("ByteLevel", True, None)]:
        return "smollm"  # SmolLM's tokenizer.json: digits split one by one, then GPT-2's byte-level split
    raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:120]}) is not one "
                      "GGUF export can name for llama.cpp; supported: GPT-2 byte-level, and SmolLM's digits + "
                      "byte-level")


@functools.lru_cache(maxsize=None)
def _embedded_pre(base: str) -> str | None:
    """tokenizer.ggml.pre of the GGUF an embedded model ships as, or None (reading its metadata takes ~3 s)."""
    import gguf

    from .models import embedded_gguf

    path = embedded_gguf(base)
    if path is None or not path.is_file():
        return None
    pre = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return pre.contents() if pre is not None else None


# ---------------------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------------------

def verify_gguf(run: str | Path, gguf_path: str | Path, *, lora: str | Path | None = None,
                llama_cpp: bool | None = None) -> Verification:
    """Load `gguf_path` back and compare it with `run` on the fixed prompt set: exactly, the chat template and
    the token ids of every prompt; within TOLERANCE of the file's quant type, the next-token distributions at
    every position of the prompts and of the run's greedy continuations. The loaders are transformers and, when
    llama-cpp-python is installed (or llama_cpp=True), llama.cpp. With `lora` (a GGUF LoRA adapter for the
    base model `gguf_path`), only llama.cpp can apply it."""
    import gguf

    gguf_path = Path(gguf_path)
    file_type = int(gguf.GGUFReader(gguf_path).fields["general.file_type"].contents())
    quant = next((q for q, (ft, _) in QUANTS.items() if getattr(gguf.LlamaFileType, ft) == file_type), None)
    if quant is None:
        raise ExportError(f"{gguf_path} is of type {gguf.LlamaFileType(file_type).name}, which has no stated "
                          f"tolerance; verification knows {', '.join(QUANTS)}")
    if llama_cpp is None:
        llama_cpp = lora is not None or has_llama_cpp()
    prompts, tokenizer = _reference(run)
    loaders = [] if lora is not None else [("transformers", _transformers_outputs)]
    loaders += [("llama.cpp" + (" + LoRA" if lora else ""), _llama_cpp_outputs)] if llama_cpp else []

    problems, comparisons = [], []
    for name, load in loaders:
        try:
            template, ids, logits = load(gguf_path, lora, [p.text for p in prompts], [p.full for p in prompts])
        except _LoaderCrashed as err:
            problems.append(str(err))
            continue
        if lora is None and template != tokenizer.chat_template:  # an adapter has none: the base file's applies
            problems.append(f"{name}: its chat template differs from the run's")
        problems += [f"{name}: its tokenizer gives other ids for {p.text[:40]!r}" for p, got in zip(prompts, ids)
                     if got != p.ids]
        comparisons.append(_compare(name, prompts, logits))
        problems += comparisons[-1].problems(quant)
    return Verification(quant, comparisons, problems)


def mismatch_message(report: Verification, out, instead: str | None = "") -> str:
    """The error for a file that failed verification; `instead`: what else to try (default: a finer quant)."""
    if instead == "" and report.quant in FINER:
        instead = f"choose a finer --quant such as {FINER[report.quant]}"
    finer = f", or {instead}" if instead else ""
    return (f"{out} was not written: the GGUF does not match the run ({'; '.join(report.problems)}). Measured: "
            f"{report}. Pass --no-verify to keep such a file anyway{finer}.")


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class _Prompt:
    text: str
    ids: list[int]  # the prompt as the run's tokenizer encodes it
    full: list[int]  # ids + the run's GREEDY_TOKENS greedy tokens
    logits: object  # the run's logits at every position of `full`: (len(full), vocab) float64 numpy
    base_logits: object = None  # the same without the adapter (the base model), for adapter runs


def _reference(run) -> tuple[list[_Prompt], object]:
    """The fixed prompt set with the run's ids, greedy continuations and logits; and the run's tokenizer. The
    run is loaded unmerged: the comparison is with the run as tunesmith itself serves it. For an adapter run, also
    the base model's logits (the adapter disabled) at the same positions."""
    import torch

    from .data.templates import render_chat

    model, tokenizer, info = load_run(run)
    texts = [render_chat(tokenizer, chat, add_generation_prompt=True) for chat in CHATS] \
        if tokenizer.chat_template else []
    prompts = []
    for text in texts + TEXTS:
        ids = tokenizer(text).input_ids
        full = _greedy(model, ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0].double().numpy()
            base = None
            if info.peft:
                with model.disable_adapter():
                    base = model(input_ids=torch.tensor([full])).logits[0].double().numpy()
        prompts.append(_Prompt(text, ids, full, logits, base))
    return prompts, tokenizer


def _greedy(model, ids: list[int], steps: int = GREEDY_TOKENS) -> list[int]:
    """`ids` and the `steps` argmax tokens after them, without stopping at EOS: the raw next-token choices."""
    import torch

    ids = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


def _compare(backend: str, prompts: list[_Prompt], logits: list) -> Comparison:
    """Teacher-forced on the run's greedy continuations, so the file reproduces a continuation exactly when its
    argmax agrees at each of those positions."""
    import numpy as np

    def log_softmax(x):  # (T, vocab)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    agree, kl, kl_base, max_diff, scale, greedy_same = [], [], [], 0.0, 0.0, 0
    for prompt, got in zip(prompts, logits):
        want, got = prompt.logits, np.asarray(got, dtype=np.float64)  # (T, vocab) each
        same = want.argmax(-1) == got.argmax(-1)  # (T,)
        want_log, got_log = log_softmax(want), log_softmax(got)
        kl.append((np.exp(want_log) * (want_log - got_log)).sum(-1))
        if prompt.base_logits is not None:
            kl_base.append((np.exp(want_log) * (want_log - log_softmax(prompt.base_logits))).sum(-1))
        agree.append(same)
        greedy_same += bool(same[len(prompt.ids) - 1:-1].all())  # position i predicts token i + 1
        max_diff = max(max_diff, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    agree, kl = np.concatenate(agree), np.concatenate(kl)
    return Comparison(backend, len(agree), float(agree.mean()), float(kl.mean()), max_diff, scale, greedy_same,
                      len(prompts), float(np.concatenate(kl_base).mean()) if kl_base else None)


class _LoaderCrashed(Exception):
    pass


def _transformers_outputs(path: Path, lora, texts: list[str], fulls: list[list[int]]):
    """(chat template, ids of each text, logits at every position of each of `fulls`) of the file as
    transformers reads it (`gguf_file=`: dequantised to float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(**where)
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([full])).logits[0].double().numpy() for full in fulls]
    return tokenizer.chat_template, [tokenizer(text).input_ids for text in texts], logits


def _llama_cpp_outputs(path: Path, lora, texts: list[str], fulls: list[list[int]]):
    """The same as llama.cpp runs the file (llama-cpp-python), with the GGUF LoRA `lora` applied if given. In a
    child process: a llama.cpp build that does not run on this CPU dies of SIGILL, which must not take the
    export (or a test session) with it, and torch's and llama.cpp's thread pools stay apart."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_llama_cpp_child, str(path), lora and str(lora), texts, fulls).result()
        except BrokenProcessPool:
            raise _LoaderCrashed(
                f"llama.cpp: the process running llama-cpp-python died loading or evaluating {path.name} (a "
                "build for another CPU dies like this: reinstall llama-cpp-python on this machine, or pass "
                "--no-verify)") from None


def _llama_cpp_child(path: str, lora: str | None, texts: list[str], fulls: list[list[int]]):
    import gguf
    import numpy as np
    from llama_cpp import Llama

    context = int(gguf.GGUFReader(path).fields["llama.context_length"].contents())
    # logits_all keeps (n_ctx, vocab) floats: a short context, enough for the prompt set.
    llm = Llama(model_path=path, lora_path=lora, n_ctx=min(512, context), n_batch=512, logits_all=True,
                verbose=False)
    logits = []
    for full in fulls:
        llm.reset()
        llm.eval(full)
        logits.append(np.array(llm.scores[:len(full)], dtype=np.float32))
    ids = [llm.tokenize(text.encode(), add_bos=True, special=True) for text in texts]
    return llm.metadata.get("tokenizer.chat_template"), ids, logits
