"""llama.cpp's own GGUF converters, kept in the venv by `make setup-fast` (share/tunesmith/llama.cpp, from the
llama-cpp-python sdist that it builds): convert_hf_to_gguf.py writes a model of any architecture llama.cpp
supports, convert_lora_to_gguf.py a LoRA adapter, and llama.cpp's quantizer the types the converter does not
write itself. Each runs in a child process with this interpreter (converter_main.py), so a converter that fails,
or a llama.cpp build that dies, ends in an ExportError rather than taking the caller down."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from .common import ExportError

MAIN = Path(__file__).with_name("converter_main.py")
# --quant types convert_hf_to_gguf writes itself (--outtype); the others are quantized by llama.cpp from an f32 file,
# as `llama-quantize` would, which also picks each tensor's type (norms F32, the output projection finer).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
FTYPES = {"q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}


def converters_dir() -> Path:
    """Where `make setup-fast` put llama.cpp's converters, or an ExportError that says to run it."""
    path = Path(sys.prefix) / "share" / "tunesmith" / "llama.cpp"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"llama.cpp's GGUF converter is not installed (looked in {path}); run `make setup-fast`, "
                          "which builds llama.cpp and keeps its converters in the venv")
    return path


def has_converters() -> bool:
    try:
        converters_dir()
    except ExportError:
        return False
    return True


def convert_model(model, tokenizer, out: Path, *, quant: str, name: str, pre: str | None,
                  adds: tuple[bool, bool]) -> None:
    """Write `model` and `tokenizer` as the GGUF `out` with llama.cpp's converter (and quantizer, for the types in
    FTYPES). pre: llama.cpp's name for the tokenizer's pre-tokenizer, used where the converter does not recognise
    the tokenizer itself; adds: whether the tokenizer puts BOS and EOS around a text (vocab.adds_bos_eos), which
    the file says in place of what the converter reads from the tokenizer's config."""
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}-hf-", dir=out.parent) as scratch:
        scratch = Path(scratch)
        model.save_pretrained(scratch / "model")  # the converter reads a model directory
        tokenizer.save_pretrained(scratch / "model")
        direct = quant in OUTTYPES
        target = out if direct else scratch / "f32.gguf"
        _run(["hf", *(["--pre", pre] if pre else []), "--adds", *(str(int(a)) for a in adds), "--",
              str(scratch / "model"), "--outfile", str(target),
              "--outtype", quant if direct else "f32", "--model-name", name], what=f"converting to {quant}")
        if not direct:
            _run(["quantize", str(target), str(out), FTYPES[quant]], what=f"quantizing to {quant}")


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, *, quant: str) -> None:
    """Write the peft LoRA in `adapter_dir` (adapter_config.json, adapter_model.safetensors) as the GGUF LoRA `out`
    with convert_lora_to_gguf.py; `base_dir` holds the base model's config.json."""
    _run(["lora", "--", str(adapter_dir), "--base", str(base_dir), "--outfile", str(out), "--outtype", quant],
         what="converting the LoRA adapter")


def _run(args: list[str], what: str) -> None:
    done = subprocess.run([sys.executable, str(MAIN), str(converters_dir()), *args], capture_output=True, text=True)
    if done.returncode != 0:
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise ExportError(f"llama.cpp's converter failed {what} (exit status {done.returncode}); its last words: "
                          + " | ".join(said[-6:]))
