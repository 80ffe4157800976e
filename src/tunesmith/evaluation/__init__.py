"""Scoring a model on held-out records, for `tunesmith eval` and for training's before/after scores.

- results.py    Evaluation (metrics + predictions), EvaluateError, write_results
- scorers.py    generation (with the learnable-token loss; tool calls parsed and scored), sequence classification,
                token classification
- preference.py held-out preference accuracy: the implicit reward (against a reference) or the mean log-prob
- prompting.py  zero/k-shot prompts, classification through label words (verbalizers), calibration
- choose.py     `score`: which scorer, decided once; `evaluate`: a name, run or pair in, an Evaluation out

prompting.py loads torch at import, so it is imported only when a prompting score is asked for."""

from .choose import evaluate, score
from .results import EvaluateError, Evaluation, write_results
from .scorers import evaluate_classification, evaluate_generation, evaluate_tagging, learnable_loss

__all__ = ["EvaluateError", "Evaluation", "evaluate", "evaluate_classification", "evaluate_generation",
           "evaluate_tagging", "learnable_loss", "score", "write_results"]
