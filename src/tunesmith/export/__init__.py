"""Every way a run leaves tunesmith, one module per target over the shared `common.py`. `export` (transformers.py)
writes a standalone model or the peft adapter; `export_gguf` (gguf.py) one GGUF file for llama.cpp and Ollama,
verified against the run (verify.py), with a Modelfile beside it (modelfile.py); `export_lora_gguf` (lora.py) the
LoRA adapter alone as a GGUF LoRA; converters.py runs llama.cpp's own converters for the architectures tunesmith's
writer does not cover; cache.py keeps the run-to-GGUF files the llama-cpp server backend serves."""

from .common import UNMERGEABLE, ExportError
from .converters import converters_dir, has_converters
from .gguf import LLAMA_CPP, TUNESMITH, GGUFExport, export_gguf, gguf_path, write_gguf, write_model
from .lora import ADAPTER_QUANTS, LoraGGUFExport, export_lora_gguf
from .modelfile import chatml_system_prompt, ollama_modelfile
from .quants import FINER, QUANTS, TOLERANCE, Tolerance
from .transformers import export
from .verify import Comparison, Verification, has_llama_cpp, mismatch_message, verify_gguf

__all__ = ["ADAPTER_QUANTS", "FINER", "LLAMA_CPP", "QUANTS", "TOLERANCE", "TUNESMITH", "UNMERGEABLE", "Comparison",
           "ExportError", "GGUFExport", "LoraGGUFExport", "Tolerance", "Verification", "chatml_system_prompt",
           "converters_dir", "export", "export_gguf", "export_lora_gguf", "gguf_path", "has_converters",
           "has_llama_cpp", "mismatch_message", "ollama_modelfile", "verify_gguf", "write_gguf", "write_model"]
