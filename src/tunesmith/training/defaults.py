"""Defaults that adapt to the run. A config that leaves `learning_rate`, `epochs`, `warmup_ratio` or `eval_steps`
unset gets them here, chosen from the method, the base model's size, the task and the amount of training data,
each with a one-line reason; with an eval split the run also keeps, and ends with, its best checkpoint.

Pure functions of the config and a few numbers (no model, no files): loop.py calls `resolve` once the data is
tokenized and the base model loaded, prints the reasons, records them in run.json (`defaults`) and saves the
concrete values in the run's train_config.yaml, so training again from that file trains the same way. What
these rules reach on the shipped demo tasks, against tuned recipes: docs/defaults.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import PEFT_METHODS, TrainConfig
from ..metrics import MAIN_METRICS

# AdamW learning rates per method for a base the size of SmolLM2-135M. lora (and adalora, the same update
# with a pruned rank) at alpha 16, the method's default: the update B @ A is scaled by alpha / r and Adam moves
# B by about the learning rate whatever its gradient's size, so the change to the weights grows with alpha and
# the rate is scaled by 16 / alpha (the chat-lora recipe, r 16, alpha 32, is 5e-4; on the support-chat demo
# r 8, alpha 16 reached 0.70 exact match at 5e-4 and 0.825 at 1e-3, docs/defaults.md). full is the rate that,
# scaled to MiniLM's 22.7M parameters below, gives the classify recipe's 1e-4; freeze trains fewer, higher
# layers and takes twice that. ia3's vectors and prefix/prompt's virtual tokens are few parameters that start
# far from useful values: rates one to two orders of magnitude above lora (compare-ticket-topics' prompt-tuning
# entry used 1e-2).
REFERENCE_PARAMETERS, REFERENCE_ALPHA = 135e6, 16
LEARNING_RATE = {"full": 5e-5, "freeze": 1e-4, "lora": 1e-3, "adalora": 1e-3, "ia3": 3e-3, "prefix": 1e-2,
                 "prompt": 3e-2}
# lr ∝ (REFERENCE_PARAMETERS / parameters) ** exponent: the wider the model, the smaller the step every weight
# can take (full: 5e-5 at 135M -> ~1.4e-5 at 1.7B); a low-rank update shrinks less with width (lora at alpha 16:
# 1e-3 -> ~5e-4 at 1.7B, ~4e-4 at 7B); vectors and virtual tokens not at all.
SIZE_EXPONENT = {"full": 0.5, "freeze": 0.5, "lora": 0.25, "adalora": 0.25}
# Under a PEFT method the fresh classification/NER head trains at the method's rate, and a head that starts
# from random weights needs a high one: LoRA on MiniLM reached 0.41 accuracy at 2e-4 and 1.00 at 2e-3 (issue 10;
# the ticket-topics demo: 0.98 at 2e-3, 0.99 at 3e-3, 0.48 at 5e-3).
HEAD_LEARNING_RATE = 2e-3

# Preference tuning (task: preference) at a share of the method's sft rate. DPO, KTO and SimPO move the log-ratio of
# the replies directly and keep pulling once the pairs are separated: at the sft rate the chosen replies' own
# likelihood falls with the rejected ones'. TRL's DPO default (1e-6) and the alignment handbook's Zephyr-7B recipes
# (DPO 5e-7 full, 5e-6 QLoRA, against 2e-5 and 2e-4 for their SFT) are 1/20 to 1/40 of the SFT rate; 1/20 keeps a
# short CPU run moving (5e-5 for lora at 135M). ORPO carries its own SFT term and starts from a base model: a
# quarter of the sft rate (Hong et al. 2024: 8e-6 for Mistral-7B, ~1/2.5 of a 2e-5 SFT).
PREFERENCE_RATE = {"dpo": 1 / 20, "kto": 1 / 20, "simpo": 1 / 20, "orpo": 1 / 4}
# Each objective's beta, and why: TRL's defaults, but for SimPO, whose paper tunes 2.0-2.5 (TRL's CPO default of 0.1
# is plain CPO's).
PREFERENCE_BETA = {
    "dpo": (0.1, "DPO's beta (TRL's default; Rafailov et al. 2023 use 0.1-0.5): how far the run may move from its "
                 "reference, lower: farther"),
    "kto": (0.1, "KTO's beta (TRL's default; Ethayarajh et al. 2024): how far the run may move from its reference"),
    "orpo": (0.1, "ORPO's lambda, the odds-ratio term's weight beside its SFT term (TRL's default; Hong et al. 2024)"),
    "simpo": (2.0, "SimPO's reward scale (Meng et al. 2024 tune 2.0-2.5; with simpo_gamma 1.0 their gamma/beta of "
                   "0.5)"),
}
MIN_STEPS = 150  # optimizer steps a small data set gets (by repeating it) ...
MAX_EPOCHS = 10  # ... but never more passes than this
# Preference runs overfit their pairs in a few passes (the rejected replies' log-probabilities keep falling and drag
# the chosen ones down; Zephyr's DPO trains 1-3 epochs): at most this many.
MAX_PREFERENCE_EPOCHS = 3
# How long a default run may train on a CPU. loop.py times one step of the run on this machine before training
# and bounds the plan to CPU_SECONDS of it (speed.py); where it cannot (AdaLoRA's schedule is fixed before the
# step could be timed; several processes would each plan from their own timing), the bound is CPU_BUDGET
# parameter-tokens (base parameters x training tokens), about 8 minutes on the 2-core AMD EPYC (AVX2, fp32),
# half that on the Intel Xeon with AMX. A GPU run has no such bound.
CPU_SECONDS = 480
CPU_BUDGET = 1e13
# What the timed forward and backward leave out of a step in training (collation, gradient clipping, the
# optimizer, logging, batches unlike the first): the DPO demo's 120 steps took 3.84 s each against 3.26 s
# predicted from its timed step (Intel Xeon, 2 cores, 2026-12-08): 1.18x.
STEP_OVERHEAD = 1.2
# An evaluation's token against a training step's (forward only; training runs forward, backward and, with
# recompute, forward again): the DPO demo's evaluations read 740 tokens/s where its steps trained 195.
EVAL_COST = 1 / 3
WARMUP_RATIO, MAX_WARMUP_STEPS = 0.1, 100
# Evaluations while training, to keep the best checkpoint: at most this many, and all of them together at most
# EVAL_SHARE of the tokens trained on (an eval pass is forward only, about a third of a training step's cost).
MAX_EVALUATIONS, EVAL_SHARE = 5, 0.5


@dataclass(frozen=True)
class Chosen:
    values: dict  # config field -> concrete value, for each field the config left unset
    reasons: dict  # config field (or "best_checkpoint") -> one readable line saying what was chosen and why
    total_steps: int  # optimizer steps the run will take


def _e(x: float) -> str:
    """2e-3, not 0.002 or 2e-03."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _count(n: float) -> str:
    """22.7M, 1.7B, 59k: parameters and tokens as people say them."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n:.0f}"


def _learning_rate(cfg: TrainConfig, parameters: int, fresh_head: bool) -> tuple[float, str]:
    method = cfg.method.name
    exponent = SIZE_EXPONENT.get(method, 0.0)
    alpha = getattr(cfg.method, "alpha", REFERENCE_ALPHA)
    lr = float(_e(LEARNING_RATE[method] * (REFERENCE_PARAMETERS / parameters) ** exponent * REFERENCE_ALPHA / alpha))
    head = {"classify": " with a new classification head", "ner": " with a new token-classification head"}
    on = (f"{'full fine-tuning' if method == 'full' else method}{head.get(cfg.task, '') if fresh_head else ''} "
          f"on a {_count(parameters)}-parameter model")
    if cfg.task == "preference":
        objective, share = cfg.preference.objective, PREFERENCE_RATE[cfg.preference.objective]
        tuned = float(_e(lr * share))
        why = ("ORPO carries its own SFT term (Hong et al. 2024 train at ~1/2.5 of a usual SFT rate)"
               if objective == "orpo" else "preference steps move the replies' log-ratio directly (TRL and the "
                                           "alignment handbook train DPO at 1/20-1/40 of their SFT rates)")
        return tuned, (f"learning_rate {_e(tuned)}: {objective} with {on}: 1/{round(1 / share)} of the sft rate "
                       f"{_e(lr)}; {why}")
    if fresh_head and method in PEFT_METHODS and lr < HEAD_LEARNING_RATE:
        return HEAD_LEARNING_RATE, (f"learning_rate {_e(HEAD_LEARNING_RATE)}: {on}; the head trains at the "
                                    f"{method} rate and needs at least {_e(HEAD_LEARNING_RATE)} ({method} alone: "
                                    f"{_e(lr)})")
    at = f"{_e(LEARNING_RATE[method])} at 135M parameters" + (" and alpha 16" if hasattr(cfg.method, "alpha") else "")
    scaled = f" x (135M / {_count(parameters)})^{exponent}" if exponent else ", at any size"
    scaled += f" x 16 / alpha {alpha:g}" if alpha != REFERENCE_ALPHA else ""
    return lr, f"learning_rate {_e(lr)}: {on} ({at}{scaled})"


def _beta(cfg: TrainConfig):
    beta, why = PREFERENCE_BETA[cfg.preference.objective]
    return cfg.preference.model_copy(update={"beta": beta}), f"beta {beta:g}: {why}"


# DPO alone lowers whatever the rejected replies share with the chosen ones' alternatives: on the support demo, whose
# rejected replies include `null` where an id was given, the sft run's exact match fell 0.8625 -> 0.5375 (the model
# invented ids where none was given) while preference accuracy reached 0.975. An SFT term on the chosen replies
# (RPO, Pang et al. 2024, weight 1; TRL's loss_type "sft" beside "sigmoid") holds the task.
DPO_SFT_WEIGHT = 1.0


def _sft_weight(settings):
    why = (f"sft_weight {DPO_SFT_WEIGHT:g}: the chosen replies' NLL beside DPO's loss (RPO, Pang et al. 2024), so the "
           "task the run learned holds while the pairs separate (sft_weight: 0 is plain DPO)")
    return settings.model_copy(update={"sft_weight": DPO_SFT_WEIGHT}), why


@dataclass(frozen=True)
class Speed:
    """One training step of the run, timed on this machine before training (speed.py)."""

    seconds: float  # its forward and backward
    tokens: int  # the tokens it trained on (padding not counted; a shared prefix once)
    examples: int
    spent: float = 0.0  # seconds the run spent before training that count against CPU_SECONDS (preference: the
    # reference pass, which a default run on a CPU would otherwise add to its minutes)

    def budget(self, parameters: int) -> float:
        """The parameter-tokens CPU_SECONDS of training, less what was spent before it, come to at this speed
        (a step in training taking STEP_OVERHEAD times the timed one)."""
        return max(0.0, CPU_SECONDS - self.spent) * self.tokens / (self.seconds * STEP_OVERHEAD) * parameters

    def __str__(self) -> str:
        spent = f"; the reference pass took {self.spent:.0f} s of them" if self.spent else ""
        return (f"one step of {self.examples} examples took {self.seconds:.1f} s here, {STEP_OVERHEAD:g}x that "
                f"in training: {self.tokens / self.seconds / STEP_OVERHEAD:.0f} tokens/s{spent}")


def _affordable(budget: float, tokens: int, eval_tokens: int, parameters: int) -> float:
    """The epochs `budget` parameter-tokens pay for, the default evaluations included (choose: at most
    MAX_EVALUATIONS, together at most EVAL_SHARE of the tokens trained on, each token EVAL_COST of a trained one)."""
    total = budget / parameters
    if not eval_tokens:
        return total / tokens
    capped = (total - EVAL_COST * MAX_EVALUATIONS * eval_tokens) / tokens  # as many evaluations as allowed
    if EVAL_SHARE * capped * tokens >= MAX_EVALUATIONS * eval_tokens:
        return capped
    return total / (tokens * (1 + EVAL_COST * EVAL_SHARE))  # fewer: a share of what trains


def _epochs(cfg: TrainConfig, examples: int, steps_per_epoch: int, per_step: int, tokens: int, parameters: int,
            budget: float | None, speed: Speed | None = None, eval_tokens: int = 0) -> tuple[float, str]:
    per_epoch = f"{examples} examples make {steps_per_epoch} steps of {per_step}"
    if cfg.max_steps > 0:
        epochs = round(cfg.max_steps / steps_per_epoch, 2)
        return epochs, f"epochs {epochs:g}: what max_steps {cfg.max_steps} amounts to ({per_epoch}); max_steps decides"
    most = MAX_PREFERENCE_EPOCHS if cfg.task == "preference" else MAX_EPOCHS
    wanted = min(most, max(1, math.ceil(MIN_STEPS / steps_per_epoch)))
    if wanted == 1:
        why = f"{per_epoch}, at least {MIN_STEPS} in one pass"
    elif wanted == most and cfg.task == "preference":
        why = (f"{per_epoch}; at most {most} passes over preference pairs, which a run overfits in a few (the "
               "rejected replies' likelihood keeps falling and drags the chosen ones' down)")
    elif wanted == MAX_EPOCHS:
        why = f"{per_epoch}; at most {MAX_EPOCHS} passes over so little data ({MAX_EPOCHS * steps_per_epoch} steps)"
    else:
        why = f"{per_epoch}; {wanted} epochs give at least {MIN_STEPS} optimizer steps"
    if speed and budget:  # minutes on this CPU: the default evaluations count against them too
        budget = speed.budget(parameters)
        evaluated = eval_tokens if cfg.eval_steps is None else 0
        affordable = _affordable(budget, tokens, evaluated, parameters)
    else:
        affordable = budget / (tokens * parameters) if budget is not None else math.inf
    if wanted <= affordable:
        return float(wanted), f"epochs {wanted}: {why}"
    # What the budget allows, to a tenth of a pass (a hundredth below one): with the bound measured in minutes on
    # this machine, whole passes would throw away up to half of it (2.8 affordable passes trained 2).
    epochs = math.floor(affordable * 10) / 10 if affordable >= 1 else math.floor(affordable * 100) / 100 or 0.01
    bound = (f"~{CPU_SECONDS // 60} min of training and evaluation on this CPU is {_e(budget)} parameter-tokens "
             f"({speed})" if speed else
             f"a default run on a CPU is bounded at {_e(budget)} parameter-tokens (~8 min on 2 cores without bf16)")
    return epochs, (f"epochs {epochs:g}: not {wanted} ({why}): an epoch is {_count(tokens)} tokens through "
                    f"{_count(parameters)} parameters, and {bound}; set epochs or max_steps to train longer")


def best_checkpoint(cfg: TrainConfig, has_eval: bool) -> tuple[str, bool] | None:
    """(metric, greater_is_better) the run keeps its best checkpoint by and ends with, or None: early stopping's
    metric when set, else the task's main metric (sft: eval_loss, the one metric evaluation during training
    computes), provided there is an eval split and every evaluation is also a checkpoint (transformers only
    lets a checkpoint be the best when it was saved at the step that scored best)."""
    if cfg.early_stopping:
        watch = cfg.early_stopping
        greater = watch.greater_is_better if watch.greater_is_better is not None else not watch.metric.endswith("loss")
        return watch.metric, greater
    if not (has_eval and cfg.eval_steps) or cfg.save_steps != cfg.eval_steps:
        return None
    if cfg.task in ("sft", "preference"):  # the objective's own loss on the eval split
        return "eval_loss", False
    return f"eval_{MAIN_METRICS[cfg.task][0]}", True


def choose(cfg: TrainConfig, *, examples: int, tokens: int, eval_tokens: int, parameters: int, fresh_head: bool,
           world_size: int = 1, budget: float | None = CPU_BUDGET, speed: Speed | None = None) -> Chosen:
    """Concrete values for the fields `cfg` leaves unset (None), with a reason each. `examples` and `tokens`:
    the training split's (after packing); `eval_tokens`: the eval split's (0 without one); `parameters`: the
    base model's; `fresh_head`: whether a classification/NER head starts from random weights; `budget`: the
    parameter-tokens a CPU run may cost (None on a GPU); `speed`: a step timed on this CPU, which replaces the
    budget by what CPU_SECONDS of training at that speed cost. Values the config sets are never changed."""
    values, reasons = {}, {}
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    steps_per_epoch = max(1, math.ceil(examples / per_step))
    if cfg.learning_rate is None:
        values["learning_rate"], reasons["learning_rate"] = _learning_rate(cfg, parameters, fresh_head)
    if cfg.epochs is None:
        values["epochs"], reasons["epochs"] = _epochs(cfg, examples, steps_per_epoch, per_step, tokens, parameters,
                                                      budget, speed, eval_tokens)
    if cfg.task == "preference" and cfg.preference.beta is None:
        values["preference"], reasons["beta"] = _beta(cfg)
    settings = values.get("preference", cfg.preference)
    if cfg.task == "preference" and settings.objective == "dpo" and settings.sft_weight is None:
        values["preference"], reasons["sft_weight"] = _sft_weight(settings)
    epochs = values.get("epochs", cfg.epochs)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))
    if cfg.warmup_ratio is None:
        ratio = min(WARMUP_RATIO, round(MAX_WARMUP_STEPS / total, 3))
        values["warmup_ratio"] = ratio
        reasons["warmup_ratio"] = (f"warmup_ratio {ratio:g}: the learning rate ramps up over the first "
                                   f"{math.ceil(total * ratio)} of {total} steps ({WARMUP_RATIO:.0%}, at most "
                                   f"{MAX_WARMUP_STEPS})")
    own_saves = "save_steps" in cfg.model_fields_set
    if eval_tokens and cfg.eval_steps is not None and not own_saves:
        values["save_steps"] = cfg.eval_steps
        reasons["save_steps"] = f"save_steps {cfg.eval_steps}: a checkpoint at every evaluation, to keep the best"
    elif eval_tokens and cfg.eval_steps is None:
        if own_saves:  # the user's checkpoints: evaluate each one
            values["eval_steps"] = cfg.save_steps
            reasons["eval_steps"] = f"eval_steps {cfg.save_steps}: evaluate at every checkpoint (save_steps)"
        else:
            trained = tokens * total / steps_per_epoch
            n = max(1, min(MAX_EVALUATIONS, math.floor(EVAL_SHARE * trained / eval_tokens)))
            values["eval_steps"] = values["save_steps"] = math.ceil(total / n)
            reasons["eval_steps"] = (f"eval_steps {values['eval_steps']}: evaluate (and checkpoint) {n} "
                                     f"time{'s' * (n > 1)} in {total} steps: at most {MAX_EVALUATIONS}, and "
                                     f"{_count(eval_tokens)} eval tokens each, at most {EVAL_SHARE:g}x the "
                                     f"{_count(trained)} tokens trained on")
    return Chosen(values, reasons, total)


def resolve(cfg: TrainConfig, **sizes) -> tuple[TrainConfig, Chosen]:
    """`cfg` with every unset field made concrete (see `choose`, which takes the same keywords), and the choices
    with their reasons, including which checkpoint the run will end with."""
    chosen = choose(cfg, **sizes)
    cfg = cfg.model_copy(update=chosen.values)
    has_eval = sizes["eval_tokens"] > 0
    best = best_checkpoint(cfg, has_eval)
    if best:
        line = (f"best checkpoint: the run ends with the checkpoint of the best {best[0]} "
                f"({'higher' if best[1] else 'lower'} is better), evaluated every {cfg.eval_steps} steps")
    elif has_eval and cfg.eval_steps:
        line = (f"best checkpoint: not kept, save_steps {cfg.save_steps} differs from eval_steps {cfg.eval_steps} "
                f"(the best needs a checkpoint at every evaluation); the run ends with its last step")
    else:
        line = "best checkpoint: none without an eval split; the run ends with its last step"
    return cfg, Chosen(chosen.values, {**chosen.reasons, "best_checkpoint": line}, chosen.total_steps)
