"""GGUF export: every quant type loads back in transformers (and llama.cpp, when installed) within its stated
tolerance (f32: identical greedy tokens), with the run's own chat template and a tokenizer that gives the same ids;
the Modelfile; what cannot be exported, or would overwrite, is refused; a file written without the rope permutation
fails verification; and the LoRA adapter alone, in llama.cpp's format, adds up to the merged export."""

from __future__ import annotations

import json
import re
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import SMOLLM2_TEMPLATE, _wrap_all_specials, build_tiny_llama

from tunesmith.cli import main
from tunesmith.data.templates import CHAT_TEMPLATES
from tunesmith.export import (QUANTS, TOLERANCE, TUNESMITH, ExportError, Tolerance, converters, converters_dir,
                              export_gguf, export_lora_gguf, has_converters, has_llama_cpp, ollama_modelfile, verify,
                              verify_gguf, vocab)
from tunesmith.export import gguf as gguf_writer  # tunesmith's writer; plain `gguf` is gguf-py, which reads files

from test_export import CHAT, run_sft, write_jsonl  # a few steps of a method on the tiny chat data

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def gguf_fields(path) -> dict:
    return {name: f.contents() for name, f in gguf.GGUFReader(path).fields.items()
            if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}


def tensor_types(path) -> dict:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tokenizer(bpe):
    """Like SmolLM2's: its template (with a default system prompt), EOS <|im_end|>, BOS <|im_start|>, UNK
    <|endoftext|>."""
    return _wrap_all_specials(bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
                              chat_template=SMOLLM2_TEMPLATE)


def save_base(workdir, tokenizer, name, **config):
    # Hidden and intermediate sizes are multiples of 32, the block of every quant type.
    path = workdir / name
    build_tiny_llama(tokenizer, **config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tied_dir(workdir, tokenizer):
    """Like SmolLM2: the LM head is the embedding matrix."""
    return save_base(workdir, tokenizer, "tiny-tied", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def untied_dir(workdir, tokenizer):
    return save_base(workdir, tokenizer, "tiny-untied", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def lora_run(workdir, tied_dir):
    # At 5e-2 the tiny model's merged weights grow outliers that 4-bit rounding amplifies past any useful
    # tolerance; 1e-2 still moves the adapter well away from its identity start.
    return run_sft(workdir, tied_dir, {"name": "lora", "r": 4}, "lora-run", learning_rate=1e-2)


@pytest.fixture(scope="module")
def chatml_run(workdir, untied_dir):
    """A full run trained with the bare ChatML template, not its base's SmolLM2 one."""
    data = {"train": write_jsonl(workdir / "chat.jsonl", CHAT), "eval_fraction": 0, "chat_template": "chatml"}
    return run_sft(workdir, untied_dir, {"name": "full"}, "chatml-run", learning_rate=1e-3, data=data)


@pytest.fixture(scope="module")
def exported(workdir, lora_run):
    """The LoRA run as f16, once for the tests that only read the file."""
    return export_gguf(lora_run, workdir / "exported" / "lora.gguf", quant="f16")


# ---------------------------------------------------------------------------------------------------------
# round trip: every quant type within its tolerance
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant", list(QUANTS))
def test_each_quant_type_loads_back_within_its_tolerance(lora_run, tmp_path, quant):
    result = export_gguf(lora_run, tmp_path / f"model-{quant}.gguf", quant=quant, llama_cpp=False)

    report = result.verification
    assert report.ok, report.problems
    assert report.quant == quant
    [compared] = report.comparisons
    assert compared.backend == "transformers"
    assert compared.prompts == 6 and compared.positions > 200
    assert compared.top1 >= TOLERANCE[quant].top1 and compared.kl <= TOLERANCE[quant].kl
    if quant == "f32":
        assert compared.max_logit_diff < 1e-5 and compared.greedy_same == compared.prompts
    else:
        assert compared.max_logit_diff > 0  # the weights really were rounded
    assert result.path.is_file() and not list(tmp_path.glob(".model-*"))  # the temporary file is gone


@pytest.mark.parametrize("quant, weights, output", [("f16", "F16", "F16"), ("q8_0", "Q8_0", "Q8_0"),
                                                    ("q4_0", "Q4_0", "Q8_0"), ("bf16", "BF16", "BF16")])
def test_norms_stay_f32_and_a_low_bit_file_keeps_its_output_projection_at_q8_0(lora_run, tmp_path, quant, weights,
                                                                                 output):
    types = tensor_types(export_gguf(lora_run, tmp_path / "m.gguf", quant=quant, verify=False).path)

    assert "output.weight" not in types  # tied: the embedding is the output projection
    assert types["token_embd.weight"] == output
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}
    assert {types[f"blk.{b}.{t}.weight"] for b in (0, 1) for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                    "ffn_gate", "ffn_up", "ffn_down")} == {weights}


def test_an_untied_head_is_written_as_output_weight(chatml_run, tmp_path):
    types = tensor_types(export_gguf(chatml_run, tmp_path / "m.gguf", quant="q4_1", llama_cpp=False).path)
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_1"


# ---------------------------------------------------------------------------------------------------------
# metadata: llama.cpp's keys, the run's template, the tokenizer
# ---------------------------------------------------------------------------------------------------------

def test_metadata_has_llama_cpps_keys(exported, tokenizer):
    fields = gguf_fields(exported.path)

    assert {k: fields[k] for k in [
        "general.architecture", "general.type", "general.file_type", "general.quantization_version",
        "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
        "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix"]} == {
        "general.architecture": "llama", "general.type": "model", "general.file_type": 1,
        "general.quantization_version": 2, "llama.block_count": 2, "llama.context_length": 256,
        "llama.embedding_length": 32, "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8, "llama.vocab_size": len(tokenizer),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_space_prefix": False}
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["general.name"] == "lora-run"


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The fields of llama.cpp's own SmolLM2 GGUF (the embedded default model); metadata only."""
    from tunesmith.models import ModelNotFoundError, embedded_gguf

    try:
        return gguf.GGUFReader(embedded_gguf("smollm2-135m-instruct")).fields
    except ModelNotFoundError as err:
        pytest.skip(str(err))


def test_every_key_of_llama_cpps_own_smollm2_file_but_the_model_card_is_written(exported, smollm2_gguf):
    """The embedded SmolLM2 GGUF was written by llama.cpp: our file has each of its keys (less the model card's
    general.* entries, which a run does not have)."""
    card = {"general.organization", "general.finetune", "general.basename", "general.size_label",
            "general.license", "general.languages"}
    assert set(smollm2_gguf) - card - set(gguf.GGUFReader(exported.path).fields) == set()
    assert vocab.pre_tokenizer_name(None, "smollm2-135m-instruct") == "smollm"  # a SmolLM2 run keeps its file's


def test_the_file_holds_the_runs_own_chat_template(exported, chatml_run, tmp_path):
    assert gguf_fields(exported.path)["tokenizer.chat_template"] == SMOLLM2_TEMPLATE

    path = export_gguf(chatml_run, tmp_path / "chatml.gguf").path
    template = gguf_fields(path)["tokenizer.chat_template"]
    assert template == CHAT_TEMPLATES["chatml"] != SMOLLM2_TEMPLATE  # the run's, not its base's


def test_the_tokenizer_round_trips(exported, tokenizer):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(exported.path.parent, gguf_file=exported.path.name)
    for text in ["What is the capital of France?", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                 "Q: 2+2?\nA: 4\n\n", "naïve café 🦙", "  two  spaces<|endoftext|>"]:
        assert loaded(text).input_ids == tokenizer(text).input_ids, text
        assert loaded.decode(tokenizer(text).input_ids) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_the_token_types_mark_special_tokens_as_control(exported, tokenizer):
    types = gguf.GGUFReader(exported.path).fields["tokenizer.ggml.token_type"].contents()
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == set(tokenizer.added_tokens_decoder)
    assert {types[i] for i in range(len(types)) if i not in tokenizer.added_tokens_decoder} == {gguf.TokenType.NORMAL}


# ---------------------------------------------------------------------------------------------------------
# Modelfile
# ---------------------------------------------------------------------------------------------------------

def test_modelfile_translates_the_smollm2_template_with_its_default_system_prompt(exported):
    from tunesmith.families import CONVENTIONS

    assert exported.modelfile == exported.path.with_name("Modelfile")
    assert exported.modelfile.read_text() == (
        "FROM ./lora.gguf\n"
        f'TEMPLATE """{CONVENTIONS["chatml"].ollama}"""\n'
        f'SYSTEM """{SMOLLM2_SYSTEM}"""\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n')


def test_modelfile_of_a_bare_chatml_run_has_no_system_prompt(bare_chatml_tokenizer):
    text = ollama_modelfile(bare_chatml_tokenizer, "x.gguf")
    assert 'TEMPLATE """' in text and "SYSTEM" not in text and text.endswith('PARAMETER stop "<|im_start|>"\n')


def test_each_family_layout_gets_its_template_and_an_unknown_one_a_comment(llama3_tokenizer, plain_tokenizer):
    from tunesmith.families import CONVENTIONS

    text = ollama_modelfile(llama3_tokenizer, "x.gguf")
    assert text == (f'FROM ./x.gguf\nTEMPLATE """{CONVENTIONS["llama3"].ollama}"""\n'
                    'PARAMETER stop "<|eot_id|>"\nPARAMETER stop "<|start_header_id|>"\n')
    assert "# No TEMPLATE: the run has no chat template" in ollama_modelfile(plain_tokenizer, "x.gguf")
    plain_tokenizer.chat_template = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
    assert ollama_modelfile(plain_tokenizer, "x.gguf").startswith(
        "FROM ./x.gguf\n# No TEMPLATE: the run's chat template writes turns in a layout tunesmith's family table "
        "does not know;")


# ---------------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------------

def test_a_prefix_tuning_run_is_refused(workdir, tied_dir, tmp_path):
    run = run_sft(workdir, tied_dir, {"name": "prefix", "num_virtual_tokens": 4}, "prefix-run", max_steps=1)
    with pytest.raises(ExportError, match="prefix tuning learns virtual tokens, which cannot be merged"):
        export_gguf(run, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_gguf_or_modelfile_is_kept_without_force(exported, lora_run, tmp_path):
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(ExportError, match="m.gguf already exists; pass --force to replace it"):
        export_gguf(lora_run, tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "Modelfile").write_text("mine")
    with pytest.raises(ExportError, match="Modelfile already exists"):
        export_gguf(lora_run, tmp_path / "other" / "m.gguf")

    result = export_gguf(lora_run, tmp_path / "m.gguf", force=True, verify=False)
    assert result.path.read_bytes()[:4] == b"GGUF" and result.modelfile.read_text().startswith("FROM ./m.gguf")


def test_without_llama_cpps_converter_another_architecture_is_refused_naming_make_setup_fast(workdir, tokenizer,
                                                                                           tmp_path, monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = workdir / "tiny-qwen2"
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = run_sft(workdir, base, {"name": "full"}, "qwen2-run", max_steps=1)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))  # a venv that `make setup-fast` has not run in

    with pytest.raises(ExportError, match=r"^this run's model needs llama.cpp's GGUF converter: its architecture is "
                                          r"'qwen2', not 'llama'\. tunesmith's own writer covers plain Llama models "
                                          r"with a byte-level BPE tokenizer \(such as SmolLM2\); run `make "
                                          r"setup-fast`, which installs llama.cpp's converter for every architecture "
                                          r"llama.cpp supports$"):
        export_gguf(run, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists()
    llama31 = build_tiny_llama(tokenizer, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64}).config
    with pytest.raises(ExportError, match="needs llama.cpp's GGUF converter: this Llama has llama3 rope scaling"):
        gguf_writer.gguf_path(llama31)
    assert gguf_writer.gguf_path(build_tiny_llama(tokenizer).config, tokenizer) == TUNESMITH  # needs no converter


def test_the_converters_are_looked_for_where_make_setup_fast_puts_them(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    where = re.escape(str(tmp_path / "share" / "tunesmith" / "llama.cpp"))
    with pytest.raises(ExportError, match=rf"^llama.cpp's GGUF converter is not installed \(looked in {where}\); run "
                                          r"`make setup-fast`, which builds llama.cpp and keeps its converters in the "
                                          r"venv$"):
        converters_dir()
    assert not has_converters()


def test_the_pre_tokenizer_is_named_from_the_tokenizers_own_split(tokenizer, tmp_path):
    """What llama.cpp's converter is told where it does not recognise a tokenizer by hash: Qwen2's tokenizer class
    replaces the saved byte-level split by Qwen2's, and transformers loads it for any model of type qwen2."""
    from transformers import AutoTokenizer, Qwen2Config

    assert vocab.pre_tokenizer_name(tokenizer) == "gpt-2" and vocab.vocab_problem(tokenizer) is None
    tokenizer.save_pretrained(tmp_path)
    Qwen2Config().save_pretrained(tmp_path)
    qwen2 = AutoTokenizer.from_pretrained(tmp_path)
    assert type(qwen2).__name__ == "Qwen2Tokenizer" and vocab.pre_tokenizer_name(qwen2) == "qwen2"
    spec = json.loads(qwen2.backend_tokenizer.to_str())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = vocab.LLAMA3_SPLIT  # Llama 3's, digits in 3s
    qwen2.backend_tokenizer.pre_tokenizer = qwen2.backend_tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    assert vocab.pre_tokenizer_name(qwen2) == "llama-bpe"
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    qwen2.backend_tokenizer.pre_tokenizer = qwen2.backend_tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    assert vocab.pre_tokenizer_name(qwen2) is None
    assert vocab.vocab_problem(qwen2).startswith("its tokenizer's pre-tokenizer ({\"type\": \"Sequence\"")


# ---------------------------------------------------------------------------------------------------------
# verification can fail
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_run(workdir, tokenizer):
    """A LoRA run on a base whose attention is not uniform: a tiny random model's q and k are so small that every
    position attends to all alike, and scrambled q/k rows would go unnoticed. Scaled up, they decide the output."""
    import torch

    path = workdir / "tiny-sharp"
    model = build_tiny_llama(tokenizer, tie_word_embeddings=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return run_sft(workdir, path, {"name": "lora", "r": 4}, "sharp-run", learning_rate=1e-2)


def test_a_file_without_the_rope_permutation_fails_verification(sharp_run, tmp_path, monkeypatch):
    assert export_gguf(sharp_run, tmp_path / "right" / "m.gguf", quant="f32", llama_cpp=False).verification  # control
    monkeypatch.setattr(gguf_writer, "permute_for_rope", lambda weights, n_head: weights)

    with pytest.raises(ExportError) as refused:
        export_gguf(sharp_run, tmp_path / "m.gguf", quant="f32", llama_cpp=False)
    assert re.fullmatch(
        rf"{tmp_path / 'm.gguf'} was not written: the GGUF does not match the run \(transformers: the most likely next "
        r"token is the run's at only 0\.\d+ of \d+ positions, below the 1 required for f32; transformers: the mean KL "
        r"divergence from the run's next-token distribution is [\d.e-]+ nats, over the 1e-06 tolerated for f32; "
        r"transformers: the file lost what training changed: it is [\d.e+-]+ nats from the run, and the base model "
        r"without the adapter is [\d.e-]+; a file must be at most 0\.5 times as far; "
        r"transformers: greedy continuations differ on \d/6 prompts, where f32 must reproduce them all\)\. "
        r"Measured: f32 \(tolerance: [^)]*\): transformers: top-1 agreement 0\.\d+ over \d+ positions, .*\. "
        r"Pass --no-verify to keep such a file anyway\.", str(refused.value))
    assert [p.name for p in tmp_path.iterdir()] == ["right"]  # nothing unverified is left behind

    path = export_gguf(sharp_run, tmp_path / "m.gguf", quant="f32", verify=False).path
    [compared] = verify_gguf(sharp_run, path, llama_cpp=False).comparisons
    assert compared.top1 < 0.9 and compared.kl > 1e3 * TOLERANCE["f32"].kl and compared.kl > TOLERANCE["f16"].kl


def test_a_file_that_lost_the_training_is_refused_even_within_its_quant_tolerance(lora_run, tmp_path, monkeypatch):
    """The base model's weights written instead of the merged run's: what rounding a run onto its base's own
    quant grid does (q4_1 over the embedded Q4_1 SmolLM2). No per-type tolerance is loose enough to notice
    alone; the comparison with the base is."""
    from tunesmith.models import load_run

    assert export_gguf(lora_run, tmp_path / "right" / "m.gguf", quant="f32", llama_cpp=False).verification
    monkeypatch.setitem(TOLERANCE, "f32", Tolerance(top1=0.0, kl=float("inf")))
    monkeypatch.setattr(gguf_writer, "_merged", lambda run: (lambda m, t, i: (m.unload(), t, i))(*load_run(run)))

    with pytest.raises(ExportError) as refused:
        export_gguf(lora_run, tmp_path / "m.gguf", quant="f32", llama_cpp=False)
    [problem] = re.findall(r"transformers: the file lost what training changed: it is ([\d.e+-]+) nats from the "
                           r"run, and the base model without the adapter is ([\d.e+-]+); a file must be at most "
                           r"0\.5 times as far", str(refused.value))
    assert problem[0] == problem[1]  # the file is the base
    path = export_gguf(lora_run, tmp_path / "m.gguf", quant="f32", verify=False).path
    [base_file] = verify_gguf(lora_run, path, llama_cpp=False).comparisons
    [merged_file] = verify_gguf(lora_run, tmp_path / "right" / "m.gguf", llama_cpp=False).comparisons
    assert base_file.kl == pytest.approx(base_file.kl_base, rel=1e-3) and base_file.kl_base > 1e-4
    assert merged_file.kl < 1e-6 and merged_file.kl_base == pytest.approx(base_file.kl_base, rel=1e-6)


def test_a_file_of_the_same_name_in_the_working_directory_is_not_verified_in_its_place(lora_run, base_f32, tmp_path,
                                                                                        monkeypatch):
    """transformers reads a bare gguf_file name from the working directory when one is there; the base model's
    file, under the name of the run's, must not be what the run's file is compared as."""
    path = export_gguf(lora_run, tmp_path / "run" / "model.gguf", quant="f32", verify=False).path
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "model.gguf").write_bytes(base_f32.read_bytes())
    monkeypatch.chdir(tmp_path / "cwd")

    report = verify_gguf(lora_run, path, llama_cpp=False)
    assert report.ok, report.problems


def test_a_refusal_says_by_how_much_against_which_tolerance_and_what_to_do(lora_run, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCE, "q4_0", Tolerance(top1=1.0, kl=0.0))

    with pytest.raises(ExportError, match=r"\(transformers: the most likely next token is the run's at only 0\.\d+ "
                                          r"of \d+ positions, below the 1 required for q4_0; transformers: the mean "
                                          r"KL divergence .* is [\d.e-]+ nats, over the 0 tolerated for q4_0\)\. "
                                          r"Measured: .* Pass --no-verify to keep such a file anyway, or choose a "
                                          r"finer --quant such as q8_0\.$"):
        export_gguf(lora_run, tmp_path / "m.gguf", quant="q4_0", llama_cpp=False)


def test_a_changed_chat_template_fails_verification(lora_run, tmp_path):
    model, tokenizer, _ = gguf_writer._merged(lora_run)
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    gguf_writer.write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32", name="changed")

    report = verify_gguf(lora_run, tmp_path / "m.gguf", llama_cpp=False)
    assert report.problems == ["transformers: its chat template differs from the run's"]


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

def test_cli(lora_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify, "has_llama_cpp", lambda: False)  # transformers alone, installed or not
    out = tmp_path / "m.gguf"
    assert main(["export", str(lora_run), "-o", str(out), "--gguf", "--quant", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {lora_run} to {out} (q8_0), with {tmp_path / 'Modelfile'}" in printed
    assert re.search(r"verified: q8_0 \(tolerance: top-1 agreement >= [\d.]+, mean KL <= [\d.e-]+ nats\): "
                     r"transformers: top-1 agreement [\d.]+ over \d+ positions, mean KL [\d.e+-]+ nats, max \|logit "
                     r"difference\| .*; greedy continuations identical on \d/6 prompts; the base model is [\d.e+-]+ "
                     r"nats from the run\n", printed)

    assert main(["export", str(lora_run), "-o", str(out), "--gguf"]) == 1
    assert capsys.readouterr().err.startswith(f"tunesmith: error: {out} already exists")

    assert main(["export", str(lora_run), "-o", str(out), "--gguf", "--force", "--no-verify"]) == 0
    assert "not verified (--no-verify)" in capsys.readouterr().out

    assert main(["export", str(lora_run), "-o", str(tmp_path / "dir"), "--quant", "q4_0"]) == 2
    assert "--quant, --lora-only and --no-verify apply only to --gguf exports" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2s_vocabulary_is_written_as_llama_cpp_wrote_it(tmp_path, smollm2_gguf):
    """The real SmolLM2 tokenizer (as tunesmith loads it) gives tokens, token types, merges, special ids, flags
    and template identical to those in llama.cpp's own SmolLM2 GGUF."""
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", arch="llama")
    vocab.add_vocab(writer, tokenizer, len(tokenizer), "smollm2-135m-instruct")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "vocab.gguf").fields.items()
            if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_eos_token"}
    assert len(ours) == 12
    for key, value in ours.items():
        assert value == smollm2_gguf[key].contents(), key


# ---------------------------------------------------------------------------------------------------------
# the LoRA adapter alone (--lora-only): llama.cpp's adapter format
# ---------------------------------------------------------------------------------------------------------

ADAPTED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_arrays(path) -> dict:
    """name -> float32 array in numpy order (rows, cols), dequantised."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def rslora_run(workdir, tied_dir):
    """alpha / sqrt(r) scaling, which llama.cpp's alpha / r cannot express but through B."""
    return run_sft(workdir, tied_dir, {"name": "lora", "r": 4, "rslora": True}, "rslora-run", learning_rate=1e-2)


@pytest.fixture(scope="module")
def base_f32(workdir, tied_dir, tokenizer):
    """The tied tiny base model as an f32 GGUF: what the adapters apply to."""
    from transformers import AutoModelForCausalLM

    path = workdir / "base" / "base.gguf"
    path.parent.mkdir()
    gguf_writer.write_gguf(AutoModelForCausalLM.from_pretrained(tied_dir), tokenizer, path, quant="f32", name="base")
    return path


def test_lora_only_writes_llama_cpps_adapter_format(lora_run, tmp_path):
    result = export_lora_gguf(lora_run, tmp_path / "adapter.gguf", verify=False)

    assert (result.path, result.quant, result.alpha, result.pairs) == (tmp_path / "adapter.gguf", "f32", 16.0, 14)
    assert result.base_gguf is None  # a local base directory, not an embedded model that ships a GGUF
    fields = gguf_fields(result.path)
    assert {k: fields[k] for k in ("general.architecture", "general.type", "adapter.type", "general.file_type")} == {
        "general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora", "general.file_type": 0}
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    assert not any(k.startswith("tokenizer.") for k in fields)
    shapes = {t.name: (t.tensor_type.name, tuple(reversed(t.shape.tolist())))
              for t in gguf.GGUFReader(result.path).tensors}
    # numpy order: lora_a (r, in), lora_b (out, r); hidden 32, 4 heads of 8, 2 kv heads, intermediate 64
    out_in = {"attn_q": (32, 32), "attn_k": (16, 32), "attn_v": (16, 32), "attn_output": (32, 32),
              "ffn_gate": (64, 32), "ffn_up": (64, 32), "ffn_down": (32, 64)}
    assert shapes == {f"blk.{b}.{t}.weight.lora_{ab}": ("F32", (4, i) if ab == "a" else (o, 4))
                      for b in (0, 1) for t, (o, i) in out_in.items() for ab in "ab"}
    assert not list(tmp_path.glob(".adapter-*"))


@pytest.mark.parametrize("run", ["lora_run", "rslora_run"])
def test_base_gguf_plus_the_adapter_equals_the_merged_export(run, base_f32, tmp_path, request):
    """What llama.cpp computes, W + alpha / r * B @ A with r from the tensor, done in numpy on the files'
    tensors: the merged f32 export (verified against the run) is reproduced, q/k rope permutation included."""
    run = request.getfixturevalue(run)
    adapter = gguf_arrays(export_lora_gguf(run, tmp_path / "adapter.gguf", verify=False).path)
    merged = gguf_arrays(export_gguf(run, tmp_path / "merged.gguf", quant="f32", verify=False).path)
    base = gguf_arrays(base_f32)
    alpha = gguf_fields(tmp_path / "adapter.gguf")["adapter.lora.alpha"]

    assert set(merged) == set(base)
    for name, weight in base.items():
        a, b = adapter.get(f"{name}.lora_a"), adapter.get(f"{name}.lora_b")
        expected = weight if a is None else weight + alpha / a.shape[0] * b @ a
        assert np.allclose(expected, merged[name], atol=1e-6), name
    assert {n for n in base if f"{n}.lora_a" in adapter} == {f"blk.{b}.{t}.weight" for b in (0, 1) for t in ADAPTED}
    assert not np.allclose(base["blk.0.attn_q.weight"], merged["blk.0.attn_q.weight"], atol=1e-3)  # it moved


def test_lora_only_refuses_what_llama_cpps_lora_cannot_hold(chatml_run, workdir, tied_dir, tmp_path):
    with pytest.raises(ExportError, match="is a full fine-tune, which has no adapter; --lora-only exports plain "
                                          "LoRA adapters. Export the merged model instead"):
        export_lora_gguf(chatml_run, tmp_path / "a.gguf")
    dora = run_sft(workdir, tied_dir, {"name": "lora", "r": 4, "dora": True}, "dora-run", max_steps=1)
    with pytest.raises(ExportError, match="is DoRA, whose magnitude vector llama.cpp's LoRA format has no place"):
        export_lora_gguf(dora, tmp_path / "a.gguf")
    ia3 = run_sft(workdir, tied_dir, {"name": "ia3"}, "ia3-run", max_steps=1)
    with pytest.raises(ExportError, match="is ia3 tuning; --lora-only exports plain LoRA adapters"):
        export_lora_gguf(ia3, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_lora_only(lora_run, tmp_path, capsys):
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(lora_run), "-o", str(out), "--gguf", "--lora-only", "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert printed == (f"exported the LoRA adapter of {lora_run} to {out} (f32, 14 adapted weights, alpha 16)\n"
                       f"apply it to its base: llama-cli -m the base model as GGUF --lora {out}\n"
                       "not verified (--no-verify)\n")
    assert main(["export", str(lora_run), "-o", str(out), "--gguf", "--lora-only", "--quant", "q4_0"]) == 1
    assert "--lora-only writes the adapter as f32, f16, bf16, not q4_0" in capsys.readouterr().err
    assert main(["export", str(lora_run), "-o", str(tmp_path / "dir"), "--lora-only"]) == 2


# ---------------------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python installed): the same files, run by the engine they are for
# ---------------------------------------------------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python is not installed")


@needs_llama_cpp
@pytest.mark.parametrize("quant", list(QUANTS))
def test_llama_cpp_runs_each_quant_type_within_its_tolerance(lora_run, tmp_path, quant):
    path = export_gguf(lora_run, tmp_path / "m.gguf", quant=quant, verify=False).path
    report = verify_gguf(lora_run, path, llama_cpp=True)
    print(report)
    assert report.ok, report.problems
    assert [c.backend for c in report.comparisons] == ["transformers", "llama.cpp"]


@needs_llama_cpp
def test_llama_cpp_with_base_and_lora_gives_the_merged_models_logits(lora_run, base_f32, tmp_path):
    adapter = export_lora_gguf(lora_run, tmp_path / "adapter.gguf", verify=False).path
    merged = export_gguf(lora_run, tmp_path / "merged.gguf", quant="f32", verify=False).path
    prompts, _ = verify._reference(lora_run)
    texts, fulls = [p.text for p in prompts], [p.full for p in prompts]

    _, _, with_lora = verify._llama_cpp_outputs(base_f32, adapter, texts, fulls)
    _, _, merged_logits = verify._llama_cpp_outputs(merged, None, texts, fulls)
    for prompt, expected in zip(prompts, merged_logits):
        prompt.logits = np.asarray(expected, dtype=np.float64)  # compare with the merged file, not the run
    compared = verify._compare("llama.cpp + LoRA", prompts, with_lora)
    assert compared.problems("f32") == [], compared
    assert compared.max_logit_diff < 1e-3


@needs_llama_cpp
def test_lora_only_is_verified_with_llama_cpp(lora_run, tmp_path):
    result = export_lora_gguf(lora_run, tmp_path / "adapter.gguf")
    assert result.verification.ok, result.verification.problems
    assert [c.backend for c in result.verification.comparisons] == ["llama.cpp + LoRA"]
    assert result.verification.quant == "f32"  # judged as the f32 base it was applied to
    assert not list(tmp_path.glob(".adapter-*"))  # the scratch base is gone


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's converter (`make setup-fast`): the same file as tunesmith's writer, where both apply
# ---------------------------------------------------------------------------------------------------------

needs_converters = pytest.mark.skipif(not has_converters(), reason="llama.cpp's converters are not installed "
                                                                   "(make setup-fast)")


@needs_converters
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_cpps_converter_writes_the_tensors_tunesmiths_writer_does(tied_dir, tokenizer, tmp_path, quant):
    """The measurement behind gguf_path's choice, kept: on a plain Llama both writers give the same bytes for
    every tensor (q4_0: llama.cpp's quantizer from an f32 file), so tunesmith's, which needs no model directory
    on disk and no second process, writes those."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_dir)
    gguf_writer.write_gguf(model, tokenizer, tmp_path / "ours.gguf", quant=quant, name="x")
    converters.convert_model(model, tokenizer, tmp_path / "theirs.gguf", quant=quant, name="x", pre="gpt-2",
                             adds=(False, False))

    ours, theirs = ({t.name: t for t in gguf.GGUFReader(tmp_path / f"{who}.gguf").tensors}
                    for who in ("ours", "theirs"))
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    assert [n for n in ours if not np.array_equal(ours[n].data, theirs[n].data)] == []
    assert gguf_fields(tmp_path / "theirs.gguf")["tokenizer.ggml.pre"] == "gpt-2"  # the name tunesmith gave it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.gguf", "theirs.gguf"]  # no scratch directory left


@needs_converters
def test_an_architecture_llama_cpp_does_not_convert_is_refused_in_the_converters_words(tokenizer, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                     num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(ExportError, match=r"^llama.cpp's converter failed converting to f16 \(exit status 1\); its "
                                          r"last words: .*Model OPTForCausalLM is not supported"):
        gguf_writer.write_model(model, tokenizer, tmp_path / "m.gguf", quant="f16", name="opt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# the tolerances hold beyond SmolLM2: a correct file with large logits passes, wrong ones still fail, in llama.cpp
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loud_run(workdir, tokenizer):
    """A LoRA run on a tiny Llama whose weights are scaled up (embeddings 35x, every other matrix 20x) so that its
    largest logit is about 17, as a real model's are, where a tiny random model's stay under 1."""
    path = workdir / "tiny-loud"
    model = build_tiny_llama(tokenizer, tie_word_embeddings=True)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim == 2:
                weight.mul_(35 if "embed" in name else 20)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return run_sft(workdir, path, {"name": "lora", "r": 4}, "loud-run", learning_rate=1e-3)


@needs_llama_cpp
def test_an_f32_file_with_large_logits_passes_in_llama_cpp_judged_by_f16s_tolerance(loud_run, tmp_path):
    """llama.cpp's own f16 arithmetic (its KV cache) puts a correct f32 file further from the run than f32's 1e-6
    when logits are large; judged as f16, the file passes, and transformers still meets f32's."""
    report = export_gguf(loud_run, tmp_path / "m.gguf", quant="f32", llama_cpp=True).verification

    assert report.ok, report.problems
    transformers, llama_cpp = report.comparisons
    assert llama_cpp.backend == "llama.cpp" and 15 < llama_cpp.logit_scale < 20
    assert TOLERANCE["f32"].kl < llama_cpp.kl < TOLERANCE["f16"].kl and transformers.kl < 1e-3 * TOLERANCE["f32"].kl
    assert llama_cpp.top1 == 1.0 and llama_cpp.greedy_same == llama_cpp.prompts
    assert str(report).startswith("f32 (tolerance: top-1 agreement >= 1, mean KL <= 1e-06 nats; in llama.cpp, "
                                  "f16's): transformers: ")


@needs_llama_cpp
def test_llama_cpp_still_refuses_a_file_without_the_rope_permutation(sharp_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_writer, "permute_for_rope", lambda weights, n_head: weights)
    path = export_gguf(sharp_run, tmp_path / "m.gguf", quant="f32", verify=False).path

    report = verify_gguf(sharp_run, path, llama_cpp=True)
    [llama_cpp] = [c for c in report.comparisons if c.backend == "llama.cpp"]
    assert llama_cpp.top1 < TOLERANCE["f16"].top1 and llama_cpp.kl > 10 * TOLERANCE["f16"].kl
    assert [p for p in report.problems if p.startswith("llama.cpp: the most likely")] == [
        f"llama.cpp: the most likely next token is the run's at only {llama_cpp.top1:.3f} of {llama_cpp.positions} "
        "positions, below the 0.98 required for f32 in llama.cpp, which computes in f16 in places"]


@needs_llama_cpp
def test_llama_cpp_still_refuses_a_file_that_lost_the_training(lora_run, tmp_path, monkeypatch):
    from tunesmith.models import load_run

    monkeypatch.setattr(gguf_writer, "_merged", lambda run: (lambda m, t, i: (m.unload(), t, i))(*load_run(run)))
    path = export_gguf(lora_run, tmp_path / "m.gguf", quant="f16", verify=False).path

    report = verify_gguf(lora_run, path, llama_cpp=True)
    assert [p.split(":")[0] for p in report.problems if "lost what training changed" in p] == [
        "transformers", "llama.cpp"]
