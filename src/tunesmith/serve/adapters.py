"""Loading what a server serves: one base model and any number of trained runs by name.

Adapters of one peft type share the loaded base (peft multi-adapter: `PeftModel.from_pretrained`, then
`load_adapter`, switched with `set_adapter`; base requests run under `disable_adapter()`). peft cannot mix
adapter types in one PeftModel, so a run of another type (e.g. IA3 or prompt tuning next to LoRA) gets its
own copy of the base. Full fine-tunes and classification runs load as their own models.

A run trained with one chat template and served with another answers worse without any error
(LLaMA-Factory #8356), so each run's saved template fingerprint must match the server's."""

from __future__ import annotations

from pathlib import Path

from ..errors import TunesmithError
from ..data.templates import chat_template_for, template_fingerprint
from .engine import Engine, Served


class ServeError(TunesmithError):
    """A server that cannot start as asked: the message names the run and what to do."""


def _check_template(name: str, run: str, info: dict, fingerprint: str) -> None:
    saved = info.get("chat_template_fingerprint")
    if saved and saved != fingerprint:
        raise ServeError(f"adapter {name!r} ({run}) was trained with chat template {saved}, but the server renders "
                         f"chat with template {fingerprint}; serve it with the template it was trained with "
                         f"(--chat-template) or retrain it")


def load_engine(model: str, adapters: dict[str, str] | None = None, *, chat_template: str | None = None,
                context_window: int | None = None, **engine_options) -> Engine:
    """An `Engine` serving `model` under its own name and each run of `adapters` ({name: run dir})."""
    from peft import PeftConfig, PeftModel

    from ..models import load_causal_lm, load_for_task, load_run, load_tokenizer, run_info

    tokenizer = load_tokenizer(model)
    template = chat_template_for(tokenizer, chat_template)
    fingerprint = template_fingerprint(template)
    base = load_causal_lm(model)
    served: dict[str, Served] = {model: Served(base)}
    shared = None  # the PeftModel whose adapters share `base`
    for name, run in (adapters or {}).items():
        if name in served:
            raise ServeError(f"adapter name {name!r} is used twice (or is the base model's name)")
        info = run_info(run)
        if info is None:
            raise ServeError(f"adapter {name!r}: {run} is not a tunesmith run (no run.json)")
        if info["task"] != "sft":  # classification/tagging: listed, served by their own head
            module, _, _ = load_run(run)
            served[name] = Served(module, task=info["task"], run=str(run))
            continue
        _check_template(name, run, info, fingerprint)
        if not info["peft"]:
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
