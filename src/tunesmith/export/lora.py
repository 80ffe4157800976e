"""Export a LoRA run's adapter alone as a GGUF LoRA, llama.cpp's adapter format (`llama-cli -m BASE.gguf --lora
ADAPTER.gguf`, Ollama's `ADAPTER`): megabytes instead of a whole model, applied to the base model's own GGUF.

The file is what llama.cpp's convert_lora_to_gguf.py writes: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and per adapted weight `<GGUF name>.lora_a` (r, in) and `.lora_b` (out, r) in numpy order.
llama.cpp adds scale * B @ A with scale = alpha / r, r read from the tensor (llama_adapter_lora_weight::get_scale).
A plain Llama's adapter is written here; any other architecture's by convert_lora_to_gguf.py itself (`make
setup-fast`), the same writers as the whole model's (gguf.gguf_path)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..models import embedded_gguf, load_run
from .common import ExportError, open_language_run, refuse_existing, scratch_beside
from .converters import convert_lora
from .gguf import TUNESMITH, gguf_path, permute_for_rope, write_file, write_model
from .quants import QUANTS
from .verify import Verification, has_llama_cpp, mismatch_message, verify_gguf

ADAPTER_QUANTS = ("f32", "f16", "bf16")  # an adapter is small; its B rows (r long) fit no quant block anyway


@dataclass
class LoraGGUFExport:
    path: Path
    quant: str
    alpha: float
    pairs: int  # adapted weights: one lora_a/lora_b pair each
    base_gguf: Path | None  # the embedded base model's own GGUF, which the adapter applies to as it is
    verification: Verification | None  # None with verify=False, or without llama-cpp-python


def export_lora_gguf(run: str | Path, out: str | Path, *, quant: str = "f32", force: bool = False,
                     verify: bool = True) -> LoraGGUFExport:
    """Write the LoRA adapter of `run` as the GGUF LoRA `out`. With verify and llama-cpp-python installed,
    llama.cpp applies it to the base model's GGUF and its logits are compared with the run's (TOLERANCE of the
    base file's quant type); otherwise the file is written unverified (`verification` None)."""
    out = Path(out)
    if quant not in ADAPTER_QUANTS:
        raise ExportError(f"--lora-only writes the adapter as {', '.join(ADAPTER_QUANTS)}, not {quant}: an adapter "
                          "is a few MB, and its rows are too short for quant blocks")
    refuse_existing(out, force=force)
    model, tokenizer, info = _lora_run(run)
    alpha, weights = plain_lora(model)
    base_gguf = embedded_gguf(info.base_model)
    base_gguf = base_gguf if base_gguf is not None and base_gguf.is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, scratch = scratch_beside(out), scratch_beside(out, "base.tmp")
    report = None
    try:
        write_adapter(model.config, alpha, weights, tmp, quant=quant, name=Path(run).resolve().name)
        if verify and has_llama_cpp():
            if base_gguf is None:  # the base as an f32 GGUF, only to verify against
                write_model(model.unload(), tokenizer, scratch, quant="f32", name=Path(info.base_model).name)
            del model
            report = verify_gguf(run, base_gguf or scratch, lora=tmp)
            if not report.ok:
                raise ExportError(mismatch_message(report, out, instead=None))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        scratch.unlink(missing_ok=True)
    return LoraGGUFExport(out, quant, alpha, len(weights), base_gguf, report)


def _lora_run(run):
    """(PeftModel, tokenizer, info) of a plain-LoRA language-model run; anything else is refused by name."""
    info = open_language_run(run)
    config = json.loads((Path(run) / "adapter_config.json").read_text()) if info.peft else {}
    what = ("a full fine-tune, which has no adapter" if not info.peft else
            f"{info.method} tuning" if config.get("peft_type") != "LORA" else
            "DoRA, whose magnitude vector llama.cpp's LoRA format has no place for" if config.get("use_dora") else
            "LoRA with trained whole modules (modules_to_save)" if config.get("modules_to_save") else
            "LoRA with trained token rows (trainable_token_indices)" if config.get("trainable_token_indices") else
            "LoRA with a bias (lora_bias)" if config.get("lora_bias") else None)
    if what is not None:
        raise ExportError(f"{run} is {what}; --lora-only exports plain LoRA adapters. Export the merged model "
                          "instead: tunesmith export RUN --gguf -o FILE.gguf")
    model, tokenizer, info = load_run(run)
    gguf_path(model.config)  # an architecture one of the writers covers, else the error that says what to install
    return model, tokenizer, info


def plain_lora(model) -> tuple[float, dict[str, tuple]]:
    """(alpha, {adapted weight's name: (A (r, in), B (out, r))}) of a peft LoRA model, with B scaled so that
    alpha / r, the only scale llama.cpp knows, gives peft's: alpha / sqrt(r) with rsLoRA, and rank_pattern and
    alpha_pattern per module differ. Float32 numpy arrays; the names are the base model's, e.g.
    "model.layers.0.self_attn.q_proj.weight"."""
    from peft.tuners.lora import Linear as LoraLinear

    alpha = float(model.peft_config["default"].lora_alpha)
    weights = {}
    for module_name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        if not isinstance(module, LoraLinear):
            raise ExportError(f"the adapter adapts {hf_name} ({type(module).__name__}); llama.cpp's LoRA format "
                              "holds linear layers only: export the merged model instead (--gguf without --lora-only)")
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()  # (r, in)
        b = module.lora_B["default"].weight.detach().float().cpu().numpy()  # (out, r)
        r, scale = a.shape[0], module.scaling["default"]
        if not math.isclose(scale, alpha / r, rel_tol=1e-6):
            b = b * (scale * r / alpha)
        weights[hf_name] = (a, b)
    if not weights:
        raise ExportError("the run's adapter adapts no layer")
    return alpha, weights


def write_adapter(config, alpha: float, weights: dict, path: Path, *, quant: str, name: str) -> None:
    """Write the adapter (plain_lora's) as the GGUF LoRA `path`, for a base model of `config`: tunesmith's own
    writer for a plain Llama, llama.cpp's convert_lora_to_gguf.py for the rest (gguf.gguf_path)."""
    if gguf_path(config) == TUNESMITH:
        return write_file(_adapter_writer(config, alpha, weights, quant, name), path)
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix=f".{path.stem}-lora-", dir=path.parent) as scratch:
        adapter, base = Path(scratch) / "adapter", Path(scratch) / "base"
        adapter.mkdir()
        # peft's own file layout, with B already scaled for alpha / r: what the converter reads.
        tensors = {f"base_model.model.{n.removesuffix('.weight')}.lora_{ab}.weight": torch.from_numpy(w).contiguous()
                   for n, pair in weights.items() for ab, w in zip("AB", pair)}
        save_file(tensors, adapter / "adapter_model.safetensors")
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": alpha}))
        config.save_pretrained(base)  # only its config: the converter takes the adapter's tensors alone
        convert_lora(adapter, base, path, quant=quant)


def _adapter_writer(config, alpha: float, weights: dict, quant: str, name: str):
    """A GGUFWriter holding the adapter's metadata and tensors, for a plain Llama base."""
    import gguf

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, QUANTS[quant][1])
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hf_name, (a, b) in weights.items():
        new_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if new_name is None:
            raise ExportError(f"the adapter adapts {hf_name}, which has no GGUF name in the Llama architecture")
        # q/k rows are reordered for llama.cpp's rope (see permute_for_rope): in B @ A the rows are B's.
        if hf_name.endswith("q_proj.weight"):
            b = permute_for_rope(b, n_head)
        elif hf_name.endswith("k_proj.weight"):
            b = permute_for_rope(b, n_kv)
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            writer.add_tensor(new_name + suffix, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    return writer
