"""The preference objectives on tunesmith's Trainer: DPO, ORPO, SimPO and KTO, with TRL's own losses.

tunesmith runs the step its way and TRL computes the loss: `PreferenceTrainer` is a `RunTrainer` (atomic checkpoints,
--resume, log.jsonl, the default plan), the chosen and rejected replies go through the model in one batch with the LM
head on their learnable positions only (loss.token_log_probs, which hands them over in the shape of TRL's fused LM
head; with `share_prefix`, on one row holding each prompt once: data/prefix_tree.py), the frozen reference's
log-probabilities come precomputed with the features (preference_data.py), and then:
- dpo: `trl.DPOTrainer._compute_loss`, TRL's DPO step on its precomputed-reference path, run on this trainer;
- kto: `trl.KTOTrainer._compute_loss` (with its KL term from mismatched replies) the same way;
- orpo: `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` on the replies' mean log-probabilities, plus the chosen
  reply's negative log-likelihood (over its learnable tokens, what sft learns; TRL's ORPO counts the prompt too);
- simpo: `trl.experimental.cpo.CPOTrainer.cpo_loss` with loss_type "simpo" (CPO with no NLL term).
Those are methods of TRL's trainers that read their settings from `self`; this trainer carries the same attributes
(`configure`), so TRL's code runs unchanged on tunesmith's log-probabilities, and its metrics (rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/..., TRL's names) reach log.jsonl. Why not TRL's
trainers themselves: docs/training.md#preference-tuning.

TRL is imported when a preference run builds its trainer, never by `import tunesmith.training`."""

from __future__ import annotations

import types
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..config import PreferenceConfig
from .callbacks import RunTrainer
from .data import shares_prefix
from .loss import token_log_probs


@dataclass(frozen=True)
class Objective:
    """What an objective needs and how its held-out accuracy is read (evaluation/preference.py)."""

    reference: bool  # log-ratios against a frozen reference (precomputed)
    paired: bool  # learns from pairs (else from single replies marked good or bad)
    measure: str  # "reward" (implicit reward, against the reference) or "logprob" (mean log-probability)


# Their default betas, with why: defaults.PREFERENCE_BETA.
OBJECTIVES = {"dpo": Objective(True, True, "reward"), "kto": Objective(True, False, "reward"),
              "orpo": Objective(False, True, "logprob"), "simpo": Objective(False, True, "logprob")}


class _FusedHead:
    """What TRL's loss steps call as `model(..., labels=labels, fused_lm_head=True)`: tunesmith's labelled-only head
    (loss.token_log_probs) under TRL's calling convention and output type; `share`: on the batch's prefix tree."""

    def __init__(self, model, share: bool = False):
        self.model, self.share = model, share
        self.last = None  # the outputs of the latest call

    def __call__(self, *, labels, fused_lm_head: bool = True, **inputs):
        from trl.trainer.utils import FusedCausalLMOutput

        self.last = FusedCausalLMOutput(**token_log_probs(self.model, inputs, labels, share=self.share))
        return self.last


def configure(trainer: "PreferenceTrainer", settings: PreferenceConfig, *, share: bool = False) -> None:
    """Give `trainer` the attributes TRL's loss steps read from their own trainer (their values: TRL's defaults,
    but for beta and what `settings` chooses), and the KTO step's KL helper; `share`: the model runs on each
    batch's prefix tree, each prompt once (training/data.shares_prefix)."""
    trainer.settings, trainer.share = settings, share
    trainer.beta = settings.beta
    trainer.precompute_ref_logps = True  # the reference's log-probs come with the features
    trainer.aux_loss_enabled = False  # no mixture-of-experts router loss
    trainer.label_smoothing = 0.0
    # DPO
    sft = settings.sft_weight if settings.objective == "dpo" else 0.0
    trainer.loss_types = [settings.loss_type] + (["sft"] if sft else [])  # TRL sums them, weighted
    trainer.loss_weights = [1.0] + ([sft] if sft else [])
    trainer.ld_alpha, trainer.use_weighting = None, False
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = "reverse_kl", 1.0
    # KTO: its KL term from mismatched replies, as TRL's loss_type "kto" does
    trainer.calculate_KL, trainer.loss_type = True, "kto" if settings.objective == "kto" else "simpo"
    trainer.desirable_weight, trainer.undesirable_weight = settings.desirable_weight, settings.undesirable_weight
    # SimPO, as CPO: no AlphaPO transform
    trainer.alpha, trainer.simpo_gamma = 0.0, settings.simpo_gamma
    if settings.objective == "kto":
        from trl import KTOTrainer

        trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    trainer.reset_metrics()


def _dpo(trainer, model, inputs):
    from trl import DPOTrainer

    return DPOTrainer._compute_loss(trainer, _FusedHead(model, trainer.share), inputs, False)


def _kto(trainer, model, inputs):
    """TRL's KTO step, and the accuracy TRL's KTO does not log (it has no pairs): a good reply's reward above 0, a
    bad one's below, as held-out accuracy reads single replies (evaluation/preference.py)."""
    from trl import KTOTrainer

    head = _FusedHead(model, trainer.share)
    loss = KTOTrainer._compute_loss(trainer, head, inputs, False)
    # TRL scores the KL replies first, then the replies themselves: the last call's log-probs are theirs.
    rewards = trainer.beta * (head.last.log_probs.detach().sum(-1) - inputs["ref_logps"])
    right = torch.where(inputs["label"], torch.sign(rewards), -torch.sign(rewards))  # 1 right, 0 a tie, -1 wrong
    mode = "train" if trainer.model.training else "eval"
    accuracy = trainer.accelerator.gather_for_metrics((right + 1) / 2).mean()
    trainer._metrics[mode]["rewards/accuracies"].append(accuracy.item())
    return loss


def _mean_log_probs(trainer, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) mean log-probability per learnable token [B] each, and the chosen replies' NLL per token."""
    mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    out = token_log_probs(model, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                          labels, share=trainer.share)
    sums, counts = out["log_probs"].sum(1), mask[:, 1:].sum(1).clamp(min=1)
    chosen_sums, _ = sums.chunk(2)
    chosen_counts, _ = counts.chunk(2)
    chosen, rejected = (sums / counts).chunk(2)
    return chosen, rejected, -chosen_sums.sum() / chosen_counts.sum()


def _record(trainer, chosen, rejected, chosen_rewards, rejected_rewards, **more) -> None:
    """TRL's reward metrics of a reference-free objective, under TRL's names."""
    mode = "train" if trainer.model.training else "eval"
    values = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
              "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
              "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
              "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(), **more}
    for name, value in values.items():
        trainer._metrics[mode][name].append(trainer.accelerator.gather_for_metrics(value.detach()).mean().item())


def _orpo(trainer, model, inputs):
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected, nll = _mean_log_probs(trainer, model, inputs)
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    _record(trainer, chosen, rejected, chosen_rewards, rejected_rewards, nll_loss=nll, log_odds_ratio=ratio,
            log_odds_chosen=log_odds)
    return nll - losses.mean()  # ORPO's loss: the SFT term minus lambda x log sigmoid(log odds ratio)


def _simpo(trainer, model, inputs):
    from trl.experimental.cpo import CPOTrainer

    chosen, rejected, _ = _mean_log_probs(trainer, model, inputs)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    _record(trainer, chosen, rejected, chosen_rewards, rejected_rewards)
    return losses.mean()


STEPS = {"dpo": _dpo, "kto": _kto, "orpo": _orpo, "simpo": _simpo}


class PreferenceTrainer(RunTrainer):
    """RunTrainer whose loss is the preference objective's (see the module docstring); every batch's TRL metrics
    are averaged into the next log line, as TRL's trainers do."""

    # A per-batch mean, as TRL's: the Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False
    settings: PreferenceConfig | None = None
    share = False  # on each batch's prefix tree (configure)

    def reset_metrics(self) -> None:
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens, self._tp_size = 0, 1

    def train(self, *args, **kwargs):
        self.reset_metrics()  # a step timed for the default plan (speed.py) is not the run's first log line
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        loss = STEPS[self.settings.objective](self, model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The eval loss is the objective's (the batch has no labels for the Trainer to find)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time=None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{name}": sum(values) / len(values)
                     for name, values in self._metrics[mode].items() if values})
        super().log(logs, start_time)
        self._metrics[mode].clear()


# ---------------------------------------------------------------------------------------------------------
# the reference, and held-out preference accuracy before and after
# ---------------------------------------------------------------------------------------------------------

def reference_pass(cfg, model, pad_id: int, train_features: list[dict], eval_features: list[dict]) -> dict | None:
    """The model the run starts from (the policy before its first step), scored once: its log-probabilities of every
    training reply become the frozen reference (dpo, kto), and those of the held-out replies both the reference
    and the "before" score. Returns the held-out ones ({reply: [(sum, count)]}), None without an eval split."""
    from .preference_data import attach_reference, log_probs

    share = shares_prefix(cfg, model)
    if OBJECTIVES[cfg.preference.objective].reference:
        attach_reference(train_features, log_probs(model, train_features, pad_id, cfg.batch_size,
                                                   "reference: training replies", share=share))
    if not eval_features:
        return None
    held = log_probs(model, eval_features, pad_id, cfg.batch_size, "reference: held-out replies", share=share)
    attach_reference(eval_features, held)
    return held


def held_out(cfg, model, pad_id: int, features: list[dict], records: list[dict], reference: dict,
             scores: dict | None = None):
    """The Evaluation (metrics and one prediction per record) of `model` on held-out preference features, against
    the reference's log-probabilities; `scores`: the model's own, when already computed (the "before")."""
    from ..evaluation.preference import pair_metrics, preference_evaluation, unpaired_metrics
    from .preference_data import log_probs, records_for

    objective = OBJECTIVES[cfg.preference.objective]
    scores = scores or log_probs(model, features, pad_id, cfg.batch_size, "after (trained): held-out replies",
                                 share=shares_prefix(cfg, model))
    settings = {"measure": objective.measure, "beta": cfg.preference.beta}
    if "chosen" in scores:
        metrics, rows = pair_metrics(scores["chosen"], scores["rejected"], reference["chosen"], reference["rejected"],
                                     **settings)
    else:
        metrics, rows = unpaired_metrics(scores["completion"], reference["completion"],
                                         [f["label"] for f in features], **settings)
    records = records_for(records, cfg.preference.objective, "eval")
    return preference_evaluation(metrics, rows, [records[f["index"]] for f in features])
