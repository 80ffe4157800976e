"""Loading what a server serves: one base model and any number of trained runs by name.

Adapters of one peft type share the loaded base (peft multi-adapter: `PeftModel.from_pretrained`, then
`load_adapter`, switched with `set_adapter`; base requests run under `disable_adapter()`). peft cannot mix
adapter types in one PeftModel, so a run of another type (e.g. IA3 or prompt tuning next to LoRA) gets its
own copy of the base. Full fine-tunes and classification runs load as their own models.

A run trained with one chat template and served with another answers worse without any error
(LLaMA-Factory #8356), so each run's saved template fingerprint must match the server's.

While serving, `add_run` (= `load_served` + `register`) and `remove_run` load and unload one run (the
server's /v1/load_lora_adapter and /v1/unload_lora_adapter). `engine.models` is then replaced, never changed
in place, so whoever iterates it keeps a consistent view; the server makes these calls one at a time."""

from __future__ import annotations

import copy
import itertools
import json
import os
import stat
from pathlib import Path

from .. import runs
from ..errors import TunesmithError
from ..data.templates import chat_template_for, template_fingerprint
from ..generation import Engine, Served


class ServeError(TunesmithError):
    """A server that cannot start, or a run it cannot load, as asked: the message names the run and what to do."""


class NotServed(ServeError, LookupError):
    """No model is served under this name (the server answers 404)."""


class NameTaken(ServeError):
    """A name that cannot be given to a loaded run: the base model's, one already served, or no usable name."""


class NotARun(ServeError):
    """No run this server can read at a path: none there, not a directory, no readable run.json. The message
    says which; `vague` says the same words for every path (for clients that may not learn which paths exist)."""

    def __init__(self, name: str, run: str | Path, why: str):
        super().__init__(f"adapter {name!r}: {why}")
        shown = str(run) if len(str(run)) <= 200 else f"{str(run)[:200]}..."
        self.vague = (f"adapter {name!r}: {shown} is not a directory holding a tunesmith run this server can read "
                      "(this server has no API key, so it does not say which)")


MAX_NAME = 256  # characters of a served name
MAX_PATH = 4096  # characters of a run's path (Linux's PATH_MAX)
CONFIGS = {True: "adapter_config.json", False: "config.json"}  # by peft
WEIGHTS = {True: ("adapter_model.safetensors", "adapter_model.bin"),
           False: ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")}


def _run_directory(name: str, run: str | Path) -> Path:
    """`run` as a directory, or NotARun saying why it is none."""
    if len(str(run)) > MAX_PATH:
        raise NotARun(name, run, f"the path is longer than {MAX_PATH} characters")
    try:
        is_dir = stat.S_ISDIR(os.stat(run).st_mode)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        is_dir = None
    if not is_dir:
        raise NotARun(name, run, f"{run} is not a directory" if is_dir is False else f"there is no directory {run}")
    return Path(run)


def _check_files(name: str, path: Path, info: runs.RunInfo) -> None:
    """The run's config and weights read before anything loads: a ServeError naming the file that does not."""
    config = path / CONFIGS[info.peft]
    try:
        data = json.loads(runs.read_regular(config, runs.MAX_INFO_BYTES))
        problem = None if isinstance(data, dict) else "is not a JSON object"
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError, RecursionError) as err:
        problem = f"is unreadable ({type(err).__name__}: {str(err)[:200]})"
    if problem:
        raise ServeError(f"adapter {name!r}: {config.name} of {path} {problem}; train the run again")
    found = [path / f for f in WEIGHTS[info.peft] if (path / f).is_file()]
    if not found:
        raise ServeError(f"adapter {name!r}: {path} has no weights ({' or '.join(WEIGHTS[info.peft])}); train the "
                         "run again")
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # safetensors' own error type: a corrupt or truncated file
            raise ServeError(f"adapter {name!r}: {file.name} of {path} is unreadable ({str(err)[:200]}); train the "
                             "run again") from None


def open_served_run(name: str, run: str | Path) -> runs.RunInfo:
    """The run to be served as `name`, opened, its config and weight files checked before anything loads: NotARun
    when there is no run at `run`, a ServeError (the server's 400) naming the problem when it is broken."""
    path = _run_directory(name, run)
    try:
        info = runs.open_run(path)
    except runs.NotARunError as err:
        raise NotARun(name, run, str(err)) from None
    _check_files(name, path, info)
    return info


def check_template(name: str, run: str, info: runs.RunInfo, fingerprint: str) -> None:
    saved = info.chat_template_fingerprint
    if saved and saved != fingerprint:
        raise ServeError(f"adapter {name!r} ({run}) was trained with chat template {saved}, but the server renders "
                         f"chat with template {fingerprint}; serve it with the template it was trained with "
                         f"(--chat-template) or retrain it")


def _merged_run(run: str, info: runs.RunInfo):
    """A peft run given as --model: its base with the adapter merged in, the model the llama-cpp backend exports.
    (transformers alone would load it with the adapter attached in its own way, which the engine cannot route.)"""
    from peft import PeftConfig

    from ..models import load_run

    if info.task != "sft" or PeftConfig.from_pretrained(run).is_prompt_learning:
        kind = info.task if info.task != "sft" else info.method
        raise ServeError(f"--model {run}: a {kind} run cannot be served as the base model; serve its base with "
                         f"--model {info.base_model} --adapter NAME={run}")
    return load_run(run)[0].merge_and_unload()


def load_engine(model: str, adapters: dict[str, str] | None = None, *, chat_template: str | None = None,
                context_window: int | None = None, **engine_options) -> Engine:
    """An `Engine` serving `model` under its own name and each run of `adapters` ({name: run dir})."""
    from peft import PeftConfig, PeftModel

    from ..models import load_causal_lm, load_for_task, load_run, load_tokenizer

    tokenizer = load_tokenizer(model)
    template = chat_template_for(tokenizer, chat_template)
    fingerprint = template_fingerprint(template)
    info = runs.find_run(model)
    base = _merged_run(model, info) if info is not None and info.peft else load_causal_lm(model)
    served: dict[str, Served] = {model: Served(base)}
    shared = None  # the PeftModel whose adapters share `base`
    for name, run in (adapters or {}).items():
        if name in served:
            raise ServeError(f"adapter name {name!r} is used twice (or is the base model's name)")
        info = open_served_run(name, run)
        if info.task != "sft":  # classification/tagging: listed, served by their own head
            module, _, _ = load_run(run)
            served[name] = Served(module, task=info.task, run=str(run))
            continue
        check_template(name, run, info, fingerprint)
        if not info.peft:
            served[name] = Served(load_causal_lm(str(run)), run=str(run))
            continue
        config = PeftConfig.from_pretrained(str(run))
        use_cache = not config.is_prompt_learning
        # peft keys weights by adapter name and warns that a name inside its parameter prefix (a run served
        # as "prefix" or "lora") may reinitialise weights on load: the served name never reaches peft.
        internal = f"run{len(served)}"
        if shared is None:
            shared = PeftModel.from_pretrained(base, str(run), adapter_name=internal)
            served[model] = Served(shared)  # the base now lives inside the PeftModel
            served[name] = Served(shared, internal, use_cache=use_cache, run=str(run))
        elif config.peft_type == shared.peft_type:
            shared.load_adapter(str(run), adapter_name=internal)
            served[name] = Served(shared, internal, use_cache=use_cache, run=str(run))
        else:
            own = PeftModel.from_pretrained(load_for_task(model, "sft"), str(run), adapter_name=internal)
            served[name] = Served(own.eval(), internal, use_cache=use_cache, run=str(run))
    for entry in served.values():
        entry.module.eval()
    window = context_window or getattr(base.config, "max_position_embeddings", None) or 2048
    return Engine(served, tokenizer, context_window=window, chat_template=template, **engine_options)


def parse_adapters(values: list[str]) -> dict[str, str]:
    """`NAME=RUN` pairs from the command line; a bare RUN is named after its directory."""
    out = {}
    for value in values or []:
        name, _, run = value.partition("=") if "=" in value else ("", "", value)
        name = name or Path(run).name
        if name in out:
            raise ServeError(f"adapter name {name!r} is given twice")
        out[name] = run
    return out


# -- while serving ----------------------------------------------------------------------------------------------

def base_name(engine) -> str:
    return next(iter(engine.models))


def check_name(engine, name: str, *, replace: bool = False) -> None:
    """NameTaken unless `name` can be given to a newly loaded run: the name a client sends as `model`, so at
    most MAX_NAME characters, no `/` (it would read as a path or a hub id), no line breaks or other control
    characters, no space at either end."""
    if not name.strip() or name != name.strip() or len(name) > MAX_NAME or "/" in name \
            or not name.isprintable():
        raise NameTaken(f"{name[:40]!r}{'...' if len(name) > 40 else ''} cannot name a model: give 1 to {MAX_NAME} "
                        "characters, without '/', line breaks or spaces at either end")
    if name == base_name(engine):
        raise NameTaken(f"{name!r} is the base model's name: give the run another name")
    if name in engine.models and not replace:
        raise NameTaken(f"a model named {name!r} is already served: unload it first, or load with load_inplace "
                        "(replace=True in Python) to swap it")


def check_loaded(engine, name: str) -> None:
    """NotServed or NameTaken unless `name` is a run that can be unloaded (any served name but the base)."""
    if name == base_name(engine):
        raise NameTaken(f"{name!r} is the base model: it cannot be unloaded")
    if name not in engine.models:
        raise NotServed(f"no model named {name!r} is loaded")


def _shared_copy(module):
    """A new module tree whose parameters and buffers are `module`'s own tensors (deepcopy with them in the memo):
    peft can inject an adapter into it without touching the modules the engine is running, and without a
    second copy of the weights."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return copy.deepcopy(module, {id(t): t for t in tensors})


def _bare_base(engine):
    """The served base model without any adapter, sharing its weights. At start-up the base may have become a
    PeftModel (LoRA/IA3 layers injected in place): a shared copy of it, unloaded, is the base again."""
    from peft import PeftModel

    module = engine.models[base_name(engine)].module
    if not isinstance(module, PeftModel):
        return _shared_copy(module)
    if next(iter(module.peft_config.values())).is_prompt_learning:  # virtual tokens: the base is untouched
        return _shared_copy(module.get_base_model())
    return _shared_copy(module).unload()  # replaces the copy's adapter layers by their base layers


def _beside_base(module, engine):
    """`module` on the base model's device and in its dtype (the engine may have put the base on a GPU in half
    precision); the base's own tensors in a shared copy are already there and are not copied."""
    like = next(engine.models[base_name(engine)].module.parameters())
    dtype = like.dtype if like.is_floating_point() else None  # a quantized base: leave the run's dtype
    return module.to(device=like.device, dtype=dtype).eval()


def load_served(engine, name: str, run: str | Path) -> Served:
    """The run at `run` ready to be served as `name`, checked like at start-up (a tunesmith run; a generative
    one trained with the server's chat template). A peft run of a generative model gets its own PeftModel over
    a shared copy of the base (no weights copied): injecting it into the PeftModel the engine is decoding with
    would change that model under running rows. Reads weights: call it off the event loop."""
    from peft import PeftConfig, PeftModel

    from ..models import load_causal_lm, load_run

    info = open_served_run(name, run)
    try:
        if info.task != "sft":  # a trained head: its own model, as at start-up
            module, _, _ = load_run(run)
            return Served(_beside_base(module, engine), task=info.task, run=str(run))
        template = getattr(engine, "chat_template", None) or chat_template_for(engine.tokenizer)
        check_template(name, str(run), info, template_fingerprint(template))
        if not info.peft:
            return Served(_beside_base(load_causal_lm(str(run)), engine), run=str(run))
        config = PeftConfig.from_pretrained(str(run))
        internal = f"run{len(engine.models)}"  # never the user's name (see load_engine)
        module = PeftModel.from_pretrained(_bare_base(engine), str(run), adapter_name=internal)
        return Served(_beside_base(module, engine), internal, use_cache=not config.is_prompt_learning,
                      run=str(run))
    except ServeError:
        raise
    except Exception as err:  # weights of another shape, a config peft cannot read: whatever the files hold
        raise cannot_load(name, run, err) from None


def cannot_load(name: str, run: str | Path, err: Exception) -> ServeError:
    """The 400 for a run whose files read but do not load: the error's first lines (a shape mismatch lists
    every tensor), at most 300 characters."""
    first = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])  # torch: the cause is line 2
    first = first if len(first) <= 300 else f"{first[:300]}..."
    return ServeError(f"adapter {name!r}: cannot load {run}: {type(err).__name__}: {first}")


def register(engine, name: str, served: Served, *, replace: bool = False) -> None:
    """Serve `served` as `name` from now on (with `replace`, instead of what was served under it)."""
    check_name(engine, name, replace=replace)
    engine.models = {**engine.models, name: served}


def add_run(engine, name: str, run: str | Path, *, replace: bool = False) -> Served:
    """Load the run at `run` and serve it as `name`."""
    check_name(engine, name, replace=replace)
    served = load_served(engine, name, run)
    register(engine, name, served, replace=replace)
    return served


def remove_run(engine, name: str) -> Served:
    """Stop serving `name`. Rows already decoding hold their model and finish; a request still waiting in the
    engine's queue would fail when admitted, so the server first waits for the queue (routes/adapters.py)."""
    check_loaded(engine, name)
    served = engine.models[name]
    engine.models = {k: v for k, v in engine.models.items() if k != name}
    return served
