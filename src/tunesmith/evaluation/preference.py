"""Preference accuracy: how often a model prefers the chosen reply of a held-out pair (for single replies marked good
or bad: how often it rewards a good one above zero and a bad one below).

What "prefers" means depends on the objective (`Measure`):
- "reward" (dpo, kto): the implicit reward beta * (log p(reply) - log p_ref(reply)), log-probabilities summed over
  the reply's learnable tokens, against the frozen reference's. A run starts equal to its reference, so before
  training every reward is 0; a tie counts half, so "before" is 0.5: no preference yet.
- "logprob" (orpo, simpo, which have no reference): the reply's mean log-probability per learnable token.
For pairs `logprob_accuracy` (the second measure) is reported whatever the objective, so that the "before" of a DPO
run shows how the model it starts from (its SFT parent) ranks the pairs on its own.

A reply's log-probabilities come from one forward pass of prompt + reply, the LM head applied to the reply's
learnable positions only (`logits_to_keep`), the tokens and mask as training made them (data/preference.py); with
`share`, a batch's replies to one prompt run as one prefix-tree row, the prompt once (data/prefix_tree.py)."""

from __future__ import annotations

from typing import Literal

from ..batching import device_of, pad
from ..data.tokenize import IGNORE_INDEX
from .results import Evaluation

Measure = Literal["reward", "logprob"]
DESCRIBED = {"reward": "implicit reward beta x (log p - log p_ref) of the reply, log-probabilities summed over its "
                       "tokens; a tie counts half",
             "logprob": "the reply's mean log-probability per token; a tie counts half"}


def reply_log_probs(model, features: list[dict], pad_id: int, *, batch_size: int = 8, progress=None,
                    share: bool = False) -> list[tuple[float, int]]:
    """(sum of the log-probabilities of its learnable tokens, their count) per feature {"input_ids", "labels"},
    in eval mode without gradients; the model's mode is left as it was. `share`: each batch runs on its prefix-tree
    row (data/prefix_tree.py) where that saves enough, so features that begin alike share those tokens' pass."""
    import torch

    out, was_training = [], model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(features), batch_size):
                chunk = features[start:start + batch_size]
                out += _chunk_log_probs(model, chunk, pad_id, share)
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        model.train(was_training)
    return out


def _chunk_log_probs(model, chunk: list[dict], pad_id: int, share: bool = False) -> list[tuple[float, int]]:
    import torch

    from ..data.prefix_tree import prefix_tree

    device = device_of(model)
    ids, mask = pad([f["input_ids"] for f in chunk], pad_id, device=device)
    labels, _ = pad([f["labels"] for f in chunk], IGNORE_INDEX, device=device)
    keep = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX  # t predicts t + 1
    targets = labels[:, 1:][keep[:, :-1]]
    tree = prefix_tree(ids, mask) if share else None
    if tree is None:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [N, V]
        picked = logits.float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    else:  # the logits of each kept row position once [K, V]; each (b, t) of `keep` reads its own
        kept, pick = tree.kept(keep)
        logits = model(**tree.inputs(), logits_to_keep=kept).logits
        picked = logits.float().log_softmax(-1)[pick, targets]
    rows = torch.arange(len(chunk), device=device)[:, None].expand_as(keep)[keep]
    sums = torch.zeros(len(chunk), device=device).index_add_(0, rows, picked)
    return [(float(s), int(n)) for s, n in zip(sums.cpu(), keep.sum(1).cpu())]


def _score(logp: tuple[float, int], reference: tuple[float, int] | None, measure: Measure, beta: float) -> float:
    total, count = logp
    if measure == "logprob":
        return beta * total / max(count, 1)  # TRL's rewards of a reference-free objective: beta x mean log-prob
    return beta * (total - reference[0])


def _wins(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def pair_metrics(chosen: list, rejected: list, ref_chosen: list | None, ref_rejected: list | None, *,
                 measure: Measure, beta: float) -> tuple[dict, list[dict]]:
    """(metrics, one {chosen_reward, rejected_reward, correct} per pair) from each reply's (log-prob sum, count)
    under the model and, for measure "reward", the reference."""
    rc = [_score(c, r, measure, beta) for c, r in zip(chosen, ref_chosen or chosen)]
    rr = [_score(c, r, measure, beta) for c, r in zip(rejected, ref_rejected or rejected)]
    wins = [_wins(a, b) for a, b in zip(rc, rr)]
    mean = [_wins(c[0] / max(c[1], 1), r[0] / max(r[1], 1)) for c, r in zip(chosen, rejected)]
    n = max(len(wins), 1)
    metrics = {"preference_accuracy": sum(wins) / n, "reward_margin": sum(a - b for a, b in zip(rc, rr)) / n,
               "chosen_reward": sum(rc) / n, "rejected_reward": sum(rr) / n, "logprob_accuracy": sum(mean) / n,
               "preference_measure": DESCRIBED[measure], "pairs": len(wins)}
    rows = [{"chosen_reward": a, "rejected_reward": b, "correct": w == 1.0} for a, b, w in zip(rc, rr, wins)]
    return metrics, rows


def unpaired_metrics(logps: list, references: list | None, labels: list[bool], *, measure: Measure,
                     beta: float) -> tuple[dict, list[dict]]:
    """(metrics, one {reward, correct} per record) for single replies: a good reply is right with a reward above
    zero, a bad one below (a reward of exactly 0, the reference's own, counts half)."""
    rewards = [_score(x, r, measure, beta) for x, r in zip(logps, references or logps)]
    wins = [_wins(r, 0.0) if good else _wins(0.0, r) for r, good in zip(rewards, labels)]
    good = [r for r, g in zip(rewards, labels) if g]
    bad = [r for r, g in zip(rewards, labels) if not g]
    metrics = {"preference_accuracy": sum(wins) / max(len(wins), 1),
               "chosen_reward": sum(good) / max(len(good), 1), "rejected_reward": sum(bad) / max(len(bad), 1),
               "preference_measure": DESCRIBED[measure] + " (right when a good reply's is above 0, a bad one's below)",
               "examples": len(wins)}
    metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
    return metrics, [{"reward": r, "correct": w == 1.0} for r, w in zip(rewards, wins)]


def preference_evaluation(metrics: dict, rows: list[dict], records: list[dict]) -> Evaluation:
    """An Evaluation whose predictions show each held-out record (its prompt and replies) with its rewards."""
    predictions = [{"input": r["prompt"], **{k: r[k] for k in ("chosen", "rejected", "completion", "label") if k in r},
                    **row} for r, row in zip(records, rows)]
    return Evaluation(metrics, predictions)
