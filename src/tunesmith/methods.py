"""What trains. Full, partial (freeze) and every PEFT method differ only here: each `prepare_*` takes the
base model and returns the model to train with exactly the intended parameters requiring grad. PEFT
methods go through `peft`, not a re-implementation. `METHODS` maps config names to them."""

from __future__ import annotations

import logging

import torch

from .config import ConfigError

log = logging.getLogger(__name__)

# peft's task types, by tunesmith task. For SEQ_CLS/TOKEN_CLS peft also trains and saves the fresh head
# (`classifier` / `score`), which is what keeps heads from being lost on reload (PEFT issues 310, 577).
_PEFT_TASK = {"sft": "CAUSAL_LM", "classify": "SEQ_CLS", "ner": "TOKEN_CLS"}


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# full and partial fine-tuning
# ---------------------------------------------------------------------------------------------------------

def prepare_full(model, method, *, task, **_):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _blocks(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks: the ModuleList holding the most parameters (model.layers for
    Llama, bert.encoder.layer for BERT), found structurally so any architecture works."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no stack of layers to freeze partially; use method full")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def head_parameters(model) -> list[torch.nn.Parameter]:
    """The output head: the LM head (tied to the input embeddings in SmolLM2, so training it trains them too)
    or, for classifiers, everything outside the base model (`classifier`, `score`, ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    outside = [p for name, p in model.named_parameters() if prefix and not name.startswith(prefix + ".")]
    output = model.get_output_embeddings()
    return outside + ([output.weight] if output is not None else [])


def prepare_freeze(model, method, *, task, **_):
    """Train the top `train_layers` blocks, the modules after them (final norm, pooler) and optionally the head;
    everything else keeps requires_grad False and stays bit-identical."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = _blocks(model)
    k = min(method.train_layers, len(blocks))
    if k:
        for block in list(blocks)[len(blocks) - k:]:
            block.requires_grad_(True)
        # Modules that run after the blocks: the final norm (Llama) or pooler (BERT). They are neither blocks
        # nor embeddings, and sit in the base model.
        base = getattr(model, model.base_model_prefix, model)
        block_ids = {id(p) for p in blocks.parameters()}
        for name, module in base.named_children():
            params = list(module.parameters())
            if params and "embed" not in name and not any(id(p) in block_ids for p in params):
                module.requires_grad_(True)
    if method.train_head:
        for p in head_parameters(model):
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("freeze with train_layers: 0 and train_head: false trains nothing")
    return model


# ---------------------------------------------------------------------------------------------------------
# PEFT methods
# ---------------------------------------------------------------------------------------------------------

def _wrap(model, peft_config):
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def _excluded_heads(task: str, target_modules) -> list[str] | None:
    """peft's "all-linear" leaves the classifier head out for SEQ_CLS only: for TOKEN_CLS it adapts the head too
    and then fails to make it trainable ("modules_to_save cannot be applied to modules of type lora.Linear")."""
    if task == "ner" and isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return ["classifier", "score"]
    return None


def prepare_lora(model, method, *, task, **_):
    from peft import LoraConfig

    return _wrap(model, LoraConfig(
        task_type=_PEFT_TASK[task], r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
        target_modules=method.target_modules, exclude_modules=_excluded_heads(task, method.target_modules),
        use_dora=method.dora, use_rslora=method.rslora))


def prepare_adalora(model, method, *, task, total_steps: int, **_):
    """AdaLoRA prunes ranks on a schedule over the whole run, so it needs the step count up front; the rank
    budget is then updated after every optimizer step by the `AdaLora` callback (training/callbacks.py)."""
    from peft import AdaLoraConfig

    tinit = method.tinit if method.tinit is not None else max(total_steps // 10, 0)
    tfinal = method.tfinal if method.tfinal is not None else max(total_steps // 5, 0)
    if tinit >= total_steps - tfinal:
        raise ConfigError(f"adalora: tinit ({tinit}) + tfinal ({tfinal}) leave no budgeting phase in "
                         f"{total_steps} steps; lower them or train longer")
    return _wrap(model, AdaLoraConfig(
        task_type=_PEFT_TASK[task], init_r=method.init_r, target_r=method.target_r, tinit=tinit,
        tfinal=tfinal, deltaT=method.delta_t, total_step=total_steps, lora_alpha=method.alpha,
        lora_dropout=method.dropout, target_modules=method.target_modules,
        exclude_modules=_excluded_heads(task, method.target_modules), orth_reg_weight=method.orth_reg_weight))


def prepare_ia3(model, method, *, task, **_):
    from peft import IA3Config

    return _wrap(model, IA3Config(task_type=_PEFT_TASK[task], target_modules=method.target_modules,
                                  feedforward_modules=method.feedforward_modules))


def prepare_prefix(model, method, *, task, **_):
    from peft import PrefixTuningConfig

    return _wrap(model, PrefixTuningConfig(task_type=_PEFT_TASK[task], num_virtual_tokens=method.num_virtual_tokens,
                                           prefix_projection=method.projection))


def prepare_prompt(model, method, *, task, tokenizer_path: str | None = None, **_):
    from peft import PromptTuningConfig

    if method.init_text:
        config = PromptTuningConfig(task_type=_PEFT_TASK[task], num_virtual_tokens=method.num_virtual_tokens,
                                    prompt_tuning_init="TEXT", prompt_tuning_init_text=method.init_text,
                                    tokenizer_name_or_path=tokenizer_path)
    else:
        config = PromptTuningConfig(task_type=_PEFT_TASK[task], num_virtual_tokens=method.num_virtual_tokens)
    return _wrap(model, config)


METHODS = {
    "full": prepare_full,
    "freeze": prepare_freeze,
    "lora": prepare_lora,
    "adalora": prepare_adalora,
    "ia3": prepare_ia3,
    "prefix": prepare_prefix,
    "prompt": prepare_prompt,
}


def prepare(model, method, *, task: str, total_steps: int = 0, tokenizer_path: str | None = None):
    """Apply `method` (a config.Method) to `model`; logs the trainable share."""
    model = METHODS[method.name](model, method, task=task, total_steps=total_steps, tokenizer_path=tokenizer_path)
    trainable, total = trainable_parameters(model)
    log.info("method %s: %s of %s parameters trainable (%.2f%%)", method.name, f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return model
