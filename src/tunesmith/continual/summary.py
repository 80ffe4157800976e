"""The standard summaries of a continual-learning run, from its score matrix.

R[i][j] is the score on task j's held-out split after training step i (tasks and steps share one order:
step i trains task i); `base[j]` is the score of the model before any step. With T tasks:

- average score (Lopez-Paz & Ranzato 2017, "ACC"): mean_j R[T-1][j], after the last step;
- backward transfer ("BWT", same paper): mean over j < T-1 of R[T-1][j] - R[j][j]; negative is forgetting;
- forward transfer ("FWT", same paper, with the untrained model as the reference b_j): mean over j > 0 of
  R[j-1][j] - base[j], what earlier steps did for a task before it was trained;
- average forgetting (Chaudhry et al. 2018, "Riemannian Walk"): mean over j < T-1 of
  max_{l < T-1} R[l][j] - R[T-1][j], the drop from the best score a task ever had to its final one.

A summary that needs two tasks is None with one. A score may be None (not measured): a summary that needs it is
None too, rather than a number from fewer terms than it claims."""

from __future__ import annotations

from statistics import fmean


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else fmean(values)


def average_score(R: list[list[float | None]]) -> float | None:
    return _mean(list(R[-1])) if R else None


def backward_transfer(R: list[list[float | None]]) -> float | None:
    T = len(R)
    if T < 2:
        return None
    terms = [None if R[-1][j] is None or R[j][j] is None else R[-1][j] - R[j][j] for j in range(T - 1)]
    return _mean(terms)


def forward_transfer(R: list[list[float | None]], base: list[float | None]) -> float | None:
    T = len(R)
    if T < 2:
        return None
    terms = [None if R[j - 1][j] is None or base[j] is None else R[j - 1][j] - base[j] for j in range(1, T)]
    return _mean(terms)


def forgetting(R: list[list[float | None]]) -> list[float | None]:
    """Per task j < T-1: the best score it had after any step before the last, minus its final score."""
    T = len(R)
    out = []
    for j in range(T - 1):
        seen = [R[l][j] for l in range(j, T - 1)]  # before step j the task was never trained: not its best
        out.append(None if R[-1][j] is None or any(v is None for v in seen) else max(seen) - R[-1][j])
    return out


def average_forgetting(R: list[list[float | None]]) -> float | None:
    return _mean(forgetting(R)) if len(R) >= 2 else None


def summarize(R: list[list[float | None]], base: list[float | None]) -> dict:
    """Every summary of one strategy's matrix, by name."""
    if any(len(row) != len(R) for row in R) or len(base) != len(R):
        raise ValueError(f"the score matrix must be T x T with T base scores; got {[len(r) for r in R]} rows "
                         f"and {len(base)} base scores")
    return {"average_score": average_score(R), "average_forgetting": average_forgetting(R),
            "backward_transfer": backward_transfer(R), "forward_transfer": forward_transfer(R, base),
            "forgetting": forgetting(R)}
