"""GGUF export of every model family, each on a tiny random model with its chat template and special tokens: a
LoRA run exported at f16 and q8_0 is written by the writer `gguf_path` chooses (tunesmith's for a plain Llama,
llama.cpp's converter for the rest), carries the run's template, and passes verification, in llama.cpp always and
in transformers where it reads the architecture; llama.cpp continues every prompt greedily as the run does; and
`--lora-only` writes the adapter in llama.cpp's format, which llama.cpp applies to the base as the run computes.

The families are tests/families.py's when it is in the tree (the whole-loop suite's tiny models), else the small
table below. Needs llama.cpp and its converters (`make setup-fast`); skipped without them."""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf
import pytest
from conftest import GEMMA_TEMPLATE, LLAMA31_TEMPLATE, PHI3_TEMPLATE

from test_export import run_sft
from tunesmith.data.templates import CHAT_TEMPLATES
from tunesmith.export import (LLAMA_CPP, TUNESMITH, export_gguf, export_lora_gguf, has_converters, has_llama_cpp,
                              verify)
from tunesmith.export.gguf import llama_problem

pytestmark = pytest.mark.skipif(not (has_converters() and has_llama_cpp()),
                                reason="llama.cpp and its GGUF converters are not installed (make setup-fast)")

# What llama.cpp calls each transformers architecture (general.architecture): Mistral is a Llama to it.
GGUF_ARCHITECTURE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                     "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
                     "Phi3ForCausalLM": "phi3", "SmolLM3ForCausalLM": "smollm3"}


@dataclass(frozen=True)
class Tiny:
    """Until tests/families.py is in the tree: one family's tiny model, the fields of its Tiny this file reads."""
    name: str
    architecture: str
    chat_template: str
    specials: tuple[str, ...]
    tokens: dict
    stops: tuple[str, ...]  # the tokens that end a reply (generation_config.eos_token_id)
    settings: dict = field(default_factory=dict)
    rstrip: tuple[str, ...] = ()  # control tokens that swallow the whitespace to their right (Phi-3)


MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")
LLAMA3_SPECIALS = ("<|end_of_text|>", "<|eom_id|>")
GEMMA = dict(specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
             tokens={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
             stops=("<eos>", "<end_of_turn>"))
QWEN = dict(specials=(), tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, stops=("<|im_end|>",))
HEAD_DIM = {"head_dim": 8}  # 32 / 4 heads, for the architectures that size heads apart from the hidden size
# llama.cpp scales Gemma's queries by 1 / sqrt(head_dim), as every Gemma 2 and 3 but the 27B is configured
# (llama_model_gemma2::load_arch_hparams), not by the config's query_pre_attn_scalar (default 256).
GEMMA_SETTINGS = {"tie_word_embeddings": True, **HEAD_DIM, "query_pre_attn_scalar": 8}
LOCAL = {t.name: t for t in (
    # Llama 3.1's rope scaling, which tunesmith's writer leaves to llama.cpp's converter (rope_freqs).
    Tiny("llama", "LlamaForCausalLM", LLAMA31_TEMPLATE, LLAMA3_SPECIALS,
         {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, ("<|end_of_text|>", "<|eot_id|>"),
         {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}, "rope_theta": 500000.0}),
    Tiny("qwen2", "Qwen2ForCausalLM", CHAT_TEMPLATES["chatml"], **QWEN, settings={"tie_word_embeddings": True}),
    Tiny("qwen3", "Qwen3ForCausalLM", CHAT_TEMPLATES["chatml"], **QWEN, settings={"tie_word_embeddings": True,
                                                                                   **HEAD_DIM}),
    Tiny("gemma2", "Gemma2ForCausalLM", GEMMA_TEMPLATE, **GEMMA, settings=GEMMA_SETTINGS),
    Tiny("gemma3", "Gemma3ForCausalLM", GEMMA_TEMPLATE, **GEMMA, settings=GEMMA_SETTINGS),
    # Phi-3's role and end tokens strip the whitespace to their right; llama.cpp, for any model named "phi3", makes
    # every control token but <s>, <unk> and <|endoftext|> do so, and looks up <s>, </s> and <unk>.
    Tiny("phi3", "Phi3ForCausalLM", PHI3_TEMPLATE, ("<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"),
         {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}, ("<|endoftext|>", "<|end|>"),
         rstrip=("<|user|>", "<|assistant|>", "<|end|>")),
    Tiny("mistral", "MistralForCausalLM", MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
         {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, ("</s>",)),
    Tiny("smollm3", "SmolLM3ForCausalLM", CHAT_TEMPLATES["chatml"], LLAMA3_SPECIALS,
         {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"}, ("<|im_end|>",), {"tie_word_embeddings": True}),
)}


def build_local(tiny: Tiny, bpe, directory):
    """The tiny model of `tiny`'s family (2 layers, hidden 32, seed 0), saved with its tokenizer and a generation
    config whose stop tokens are the family's."""
    import torch
    import transformers
    from tokenizers import AddedToken

    extended = bpe.__class__.from_str(bpe.to_str())
    extended.add_special_tokens([AddedToken(t, rstrip=t in tiny.rstrip, normalized=False, special=True)
                                 for t in tiny.specials])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=extended, chat_template=tiny.chat_template,
                                                     **tiny.tokens)
    model_class = getattr(transformers, tiny.architecture)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tiny.tokens.items()}
    stops = [tokenizer.convert_tokens_to_ids(t) for t in tiny.stops]
    config = model_class.config_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=ids.get("bos_token"),
        eos_token_id=stops, pad_token_id=ids.get("pad_token"), **{"tie_word_embeddings": False, **tiny.settings})
    torch.manual_seed(0)
    model = model_class(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=stops, pad_token_id=config.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


try:
    from families import TINY, build
except ModuleNotFoundError:
    TINY, build = LOCAL, build_local


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-families")


@pytest.fixture(scope="module")
def family_run(bpe, workdir):
    """name -> (Tiny, base model directory, run): a few LoRA steps on the family's tiny model, far enough from the
    base for the training-kept check to see the adapter; each built once per module."""
    built = {}

    def run_of(name: str):
        if name not in built:
            tiny = TINY[name]
            if tiny.chat_template is None:
                pytest.skip(f"the {tiny.name} chat template is not in the tree yet")
            base = build(tiny, bpe, workdir / f"{tiny.name}-model")
            # max_length 2048: SmolLM3's template prints a long default system prompt (~1,000 tiny-tokenizer
            # tokens) before every conversation without one
            built[name] = tiny, base, run_sft(workdir, base, {"name": "lora", "r": 4}, f"{tiny.name}-lora",
                                              learning_rate=1e-2, max_length=2048)
        return built[name]
    return run_of


@pytest.fixture(scope="module", params=list(TINY))
def lora_run(request, family_run):
    return family_run(request.param)


@pytest.fixture(scope="module")
def exported(lora_run, workdir):
    """The run exported at f16 and q8_0, each verified with llama.cpp as well."""
    tiny, _, run = lora_run
    return {quant: export_gguf(run, workdir / f"{tiny.name}-{quant}" / "model.gguf", quant=quant, llama_cpp=True)
            for quant in ("f16", "q8_0")}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_each_family_is_written_by_its_path_and_verified(lora_run, exported, quant):
    from transformers import AutoConfig

    tiny, base, _ = lora_run
    result = exported[quant]
    config = AutoConfig.from_pretrained(base)
    assert result.writer == (TUNESMITH if llama_problem(config) is None else LLAMA_CPP)
    reader = gguf.GGUFReader(result.path)
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.file_type",
                                                       "tokenizer.chat_template")}
    assert fields["general.architecture"] == GGUF_ARCHITECTURE[tiny.architecture]
    assert fields["tokenizer.chat_template"] == tiny.chat_template
    assert result.verification.ok and result.verification.quant == quant
    backends = [c.backend for c in result.verification.comparisons]
    assert backends == (["transformers", "llama.cpp"] if verify.transformers_reads(reader) else ["llama.cpp"])


def test_llama_cpp_continues_every_prompt_as_the_run_does(exported):
    """Teacher-forced on the run's own 16-token greedy continuations, llama.cpp's most likely token at each step is
    the run's: its greedy continuation of every prompt (chats in the family's template, and plain text) is the
    run's."""
    [llama_cpp] = [c for c in exported["f16"].verification.comparisons if c.backend == "llama.cpp"]
    assert llama_cpp.greedy_same == llama_cpp.prompts >= 5
    assert llama_cpp.kl_base > 0 and llama_cpp.kl < 1e-3 * llama_cpp.kl_base  # the adapter is in the file


def test_lora_only_writes_an_adapter_llama_cpp_applies_as_the_run_does(lora_run, workdir):
    tiny, _, run = lora_run
    result = export_lora_gguf(run, workdir / f"{tiny.name}-adapter.gguf")

    reader = gguf.GGUFReader(result.path)
    assert (reader.fields["general.type"].contents(), reader.fields["adapter.type"].contents()) == ("adapter", "lora")
    names = [t.name for t in reader.tensors]
    assert len(names) == 2 * result.pairs and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert result.verification.ok, result.verification.problems
    [applied] = result.verification.comparisons
    assert applied.backend == "llama.cpp + LoRA" and applied.greedy_same == applied.prompts


@pytest.mark.skipif("qwen3" not in TINY, reason="no tiny Qwen3")
def test_llama_cpp_alone_refuses_a_file_that_lost_the_training(family_run, workdir, monkeypatch):
    """For the families only llama.cpp verifies, a wrong file still fails: the base model written in place of
    the merged run, what rounding onto a base's own quant grid does."""
    from tunesmith.export import ExportError
    from tunesmith.export import gguf as gguf_export
    from tunesmith.models import load_run

    _, _, run = family_run("qwen3")  # a family whose files only llama.cpp reads
    monkeypatch.setattr(gguf_export, "_merged", lambda run: (lambda m, t, i: (m.unload(), t, i))(*load_run(run)))

    with pytest.raises(ExportError, match=r"; llama.cpp: the file lost what training changed: it is [\d.e-]+ nats "
                                          r"from the run, and the base model without the adapter is [\d.e-]+; a file "
                                          r"must be at most 0\.5 times as far\)") as refused:
        export_gguf(run, workdir / "qwen3-base-only" / "model.gguf", quant="f16")
    assert "transformers" not in str(refused.value).split("Measured:")[0]


def sentencepiece_style_bpe(prepend: bool):
    """A tiny BPE tokenizer shaped like the tokenizer.json of a SentencePiece model (Gemma's, Mistral's, Phi-3's):
    spaces written as "▁" (and one put before the text with `prepend`, as Llama 2 and Mistral do; Gemma does
    not), the 256 byte tokens <0x00>..<0xFF> to fall back on, no byte-level alphabet."""
    import json

    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * prepend
                                              + [normalizers.Replace(" ", "\u2581")])
    trained.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(" ", 1, 0)] * prepend)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=450, special_tokens=specials,
                                                             show_progress=False))
    # The byte tokens go right after the specials, where SentencePiece puts them, as ordinary pieces.
    spec = json.loads(trained.to_str())
    order = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    pieces = specials + [f"<0x{i:02X}>" for i in range(256)] + [p for p in order if p not in specials]
    spec["model"]["vocab"] = {piece: i for i, piece in enumerate(pieces)}
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("name, prepend", [("gemma2", False), ("mistral", True)])
def test_a_sentencepiece_style_tokenizer_is_written_as_llama_cpps_sentencepiece_vocabulary(name, prepend, workdir):
    """What a real Gemma, Mistral or Phi-3 run holds: transformers 5 saves its tokenizer as tokenizer.json alone,
    with no tokenizer.model for the converter's SentencePiece reader. The file's vocabulary is llama.cpp's
    SentencePiece kind, built from tokenizer.json, and llama.cpp tokenizes every prompt as the run does."""
    if name not in TINY:
        pytest.skip(f"no tiny {name}")
    tiny = TINY[name]
    base = build(tiny, sentencepiece_style_bpe(prepend), workdir / f"{name}-sp-model")
    run = run_sft(workdir, base, {"name": "lora", "r": 4}, f"{name}-sp-lora", learning_rate=1e-2)

    result = export_gguf(run, workdir / f"{name}-sp" / "model.gguf", quant="f16")
    assert result.verification.ok  # the token ids of every prompt among it
    fields = gguf.GGUFReader(result.path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is prepend
