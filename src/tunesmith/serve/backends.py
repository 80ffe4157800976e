"""Which decoder a server runs on (`tunesmith serve --backend`): `torch`, the reference for every adapter type,
or `llama-cpp`, GGUF models on llama.cpp (3.4-3.6x torch's speed for one client on a 2-core CPU; at 16 clients
faster on a run's q8_0 export, slower on the embedded Q4_1 file; docs/backends.md has the measurements).
Both load into an engine with the same interface, so the routes, the conversation store, auth and errors are
the same; only what computes the logits differs.

The llama-cpp backend serves GGUF files. `--model` may be the embedded default (the GGUF it ships, used as is), a
`.gguf` file, or a tunesmith run: exported to GGUF on first use, verified against the run and cached by the export
package's run-to-GGUF cache (export/cache.py; q8_0 unless `--gguf-quant` says otherwise). Each `--adapter` run
(and each run loaded while serving) is served as its own merged model; runs that cannot merge (prompt and prefix
tuning) or that classify stay with the torch backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..data.templates import chat_template_for, template_fingerprint
from ..errors import TunesmithError
from ..export import cache
from ..export.cache import GGUF_QUANT
from ..export.quants import QUANTS
from .adapters import ServeError, cannot_load, check_template, load_engine, load_served, open_served_run
from ..generation import Served
from ..generation.engine import MAX_BATCH
from ..generation.prefix_cache import DEFAULT_MB as PREFIX_CACHE_MB


@dataclass(frozen=True)
class Backend:
    load_engine: Callable  # (model, adapters, *, chat_template, context_window, max_batch, max_queue, device)
    load_served: Callable  # (engine, name, run) -> Served: a run loaded while serving (/v1/load_lora_adapter)


def require_llama_cpp() -> None:
    import importlib

    try:
        importlib.import_module("llama_cpp")
    except (ImportError, OSError) as err:  # OSError: installed, but its shared library does not load
        missing = "is not installed" if isinstance(err, ImportError) else f"does not load ({err})"
        raise ServeError(f"the llama-cpp backend needs llama-cpp-python, which {missing}: run `make setup-fast` "
                         "(or pip install 'tunesmith[fast]'), or serve with --backend torch") from None


def _gguf_tokenizer(path: Path):
    """The tokenizer inside a GGUF file, read by transformers (its pad token set as `load_tokenizer` does)."""
    from transformers import AutoTokenizer

    # by its absolute path: transformers reads a bare name from the working directory when one exists there
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path.resolve()))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def gguf_of(model: str, quant: str = GGUF_QUANT) -> tuple[Path, object, object]:
    """(GGUF file, tokenizer, generation config or None) for a --model of the llama-cpp backend; a run is
    exported at `quant`."""
    from ..models import EMBEDDED, embedded_gguf, load_generation_config, load_tokenizer

    if model in EMBEDDED:
        path = embedded_gguf(model)
        if path is None:
            raise ServeError(f"the embedded model {model!r} ships no GGUF file; serve it with --backend torch")
        return path, _gguf_tokenizer(path), None
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ServeError(f"--model {model}: the llama-cpp backend reads .gguf files (or a tunesmith run "
                             "directory, exported on first use)")
        return path, _gguf_tokenizer(path), None
    if runs.find_run(path) is not None:
        return exported(path, quant), load_tokenizer(str(path)), load_generation_config(str(path))
    raise ServeError(f"--model {model}: the llama-cpp backend serves a .gguf file, the embedded default or a "
                     f"tunesmith run directory; for any other model export it to GGUF first, or serve it with "
                     "--backend torch")


def exported(run: Path, quant: str = GGUF_QUANT) -> Path:
    """The run's GGUF from the export cache (export/cache.py), exported on first use; a file that does not match
    the run is the server's error, whose message says which finer --gguf-quant to serve."""
    try:
        return cache.exported(run, quant)
    except cache.ExportMismatch as err:
        raise ServeError(str(err)) from None


def _run_gguf(name: str, run: str | Path, fingerprint: str, quant: str) -> tuple[Path, object]:
    """(GGUF file, generation config) of a run served as `name`, checked as the torch backend checks it."""
    from ..models import load_generation_config

    info = open_served_run(name, run)
    if info.task != "sft":
        raise ServeError(f"adapter {name!r}: {run} is a {info.task} run; the llama-cpp backend serves language "
                         "models only: serve it with --backend torch")
    check_template(name, str(run), info, fingerprint)
    try:
        if info.peft:
            from peft import PeftConfig

            if PeftConfig.from_pretrained(str(run)).is_prompt_learning:
                raise ServeError(f"adapter {name!r}: {run} learned virtual tokens ({info.method} tuning), which "
                                 "cannot be merged into a GGUF's weights; serve it with --backend torch")
        path = exported(Path(run), quant)
    except ServeError:  # the file did not match the run: the message says what to do
        raise
    except TunesmithError as err:  # e.g. prompt tuning, which has no merged weights to export
        raise ServeError(f"adapter {name!r}: the llama-cpp backend serves each run as an exported GGUF, and {err}; "
                         "serve it with --backend torch") from None
    except Exception as err:  # files that read but do not load: weights of another shape, a config peft refuses
        raise cannot_load(name, run, err) from None
    return path, load_generation_config(str(run))


def load_gguf_engine(model: str, adapters: dict[str, str] | None = None, *, chat_template: str | None = None,
                     context_window: int | None = None, max_batch: int = MAX_BATCH, max_queue: int = 64,
                     device: str = "auto", threads: int | None = None, gguf_quant: str = GGUF_QUANT,
                     prefix_cache_mb: float = PREFIX_CACHE_MB, batch_invariance: str = "off"):
    """An `Engine` on llama.cpp serving `model` under its own name and each run of `adapters` ({name: run dir}), with
    llama.cpp on `threads` threads (default: every core this process may use); runs are exported at `gguf_quant`;
    `batch_invariance` "on": each request's logits do not depend on what runs beside it (llamacpp.py).

    Sets torch to one thread: here torch only picks tokens (vocabulary-sized vectors, where a second thread gains
    nothing), and its idle OpenMP threads spin on the cores llama.cpp's threads need (measured on 2 cores: the
    sampler's step went from 0.25 to 8 ms and llama.cpp's from 18 to 30 ms)."""
    import torch

    from ..generation import Engine
    from ..generation.llamacpp import GGUFModel, LlamaCppDecoder

    require_llama_cpp()
    if gguf_quant not in QUANTS:
        raise ServeError(f"unknown --gguf-quant {gguf_quant!r}; choose one of {', '.join(QUANTS)}")
    if threads is not None and threads < 1:
        raise ServeError(f"--threads {threads}: give at least 1")
    torch.set_num_threads(1)
    if device not in ("auto", "cpu"):
        raise ServeError(f"the llama-cpp backend runs on the CPU; --device {device} needs --backend torch")
    path, tokenizer, generation_config = gguf_of(model, gguf_quant)
    template = chat_template_for(tokenizer, chat_template)
    fingerprint = template_fingerprint(template)
    if batch_invariance not in ("on", "off"):
        raise ServeError(f"--batch-invariance {batch_invariance}: give on or off")
    options = dict(max_batch=max_batch, context_window=context_window, threads=threads,
                   batch_invariant=batch_invariance == "on")
    base = GGUFModel(path, tokenizer, generation_config=generation_config, **options)
    served = {model: Served(base)}
    for name, run in (adapters or {}).items():
        if name in served:
            raise ServeError(f"adapter name {name!r} is used twice (or is the base model's name)")
        run_path, config = _run_gguf(name, run, fingerprint, gguf_quant)
        served[name] = Served(GGUFModel(run_path, tokenizer, generation_config=config, **options), run=str(run))
    decoder = LlamaCppDecoder(prefix_cache_mb=prefix_cache_mb, gguf_quant=gguf_quant)
    return Engine(served, tokenizer, decoder=decoder, context_window=base.window, chat_template=template,
                  max_batch=max_batch, max_queue=max_queue)


def load_gguf_served(engine, name: str, run: str | Path) -> Served:
    """The run at `run` ready to be served as `name` by a llama-cpp engine (exported on first use). Reads and may
    export weights: call it off the event loop."""
    from ..generation.llamacpp import GGUFModel

    base = engine.models[next(iter(engine.models))].module
    run_path, config = _run_gguf(name, run, template_fingerprint(engine.chat_template),
                                 engine.decoder.gguf_quant or GGUF_QUANT)
    model = GGUFModel(run_path, engine.tokenizer, generation_config=config, max_batch=engine.max_batch,
                      context_window=base.window, threads=base.threads, batch_invariant=base.batch_invariant)
    return Served(model, run=str(run))


BACKENDS: dict[str, Backend] = {
    "torch": Backend(load_engine, load_served),  # every adapter type, CPU or CUDA: the reference
    "llama-cpp": Backend(load_gguf_engine, load_gguf_served),  # GGUF files on llama.cpp, CPU; `make setup-fast`
}
