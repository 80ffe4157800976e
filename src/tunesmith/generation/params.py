"""The one set of sampling settings every caller passes: the CLI, the terminal chat, evaluation and the server,
and `LIMITS`, the one set of ranges they are checked against on every surface (SamplingParams, the CLI's flags,
the server's request schemas)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from annotated_types import Interval

# OpenAI's documented ranges are the reference (temperature 0..2, top_p 0..1, presence and frequency penalty
# -2..2, logit_bias -100..100); top_p 0 would leave no token to sample, so it is excluded. pydantic reads an
# Interval inside Annotated as it reads Field(ge=..., le=...), so the server's schemas use these objects as is.
LIMITS: dict[str, Interval] = {
    "max_new_tokens": Interval(ge=0),  # 0 ends after the prompt
    "temperature": Interval(ge=0, le=2),
    "top_p": Interval(gt=0, le=1),
    "top_k": Interval(ge=0),
    "presence_penalty": Interval(ge=-2, le=2),
    "frequency_penalty": Interval(ge=-2, le=2),
    "repetition_penalty": Interval(gt=0),
    "logit_bias": Interval(ge=-100, le=100),  # of each token's bias
    "n": Interval(ge=1),
    "logprobs": Interval(ge=0),
    "prompt_logprobs": Interval(ge=0),
}


def describe(limit: Interval) -> str:
    """The range in words: "in [0, 2]", "in (0, 1]", "0 or more", "above 0"."""
    low, high = (limit.ge if limit.ge is not None else limit.gt), (limit.le if limit.le is not None else limit.lt)
    if low is not None and high is not None:
        return f"in {'[' if limit.ge is not None else '('}{low:g}, {high:g}{']' if limit.le is not None else ')'}"
    if low is not None:
        return f"{low:g} or more" if limit.ge is not None else f"above {low:g}"
    return f"{high:g} or less" if limit.le is not None else f"below {high:g}"


def within(value, limit: Interval) -> bool:
    """Whether `value` is inside `limit` (NaN never is)."""
    return ((limit.ge is None or value >= limit.ge) and (limit.gt is None or value > limit.gt)
            and (limit.le is None or value <= limit.le) and (limit.lt is None or value < limit.lt))

# Below this temperature sampling means argmax, as in vLLM (_SAMPLING_EPS): logits / 1e-45 overflow float32 to
# inf and softmax turns them into NaN, which torch.multinomial rejects.
GREEDY_BELOW = 1e-5


class ConstraintFailed(Exception):
    """A token mask that cannot go on mid-reply (its grammar hit a limit, or allows no token): the row ends
    there with finish_reason "grammar_error", its text so far kept, and the other rows go on."""


class TokenMask(Protocol):
    """Which tokens one row may generate next: the hook for constrained decoding (a grammar, a JSON schema).

    `SamplingParams.token_mask` is a factory called once per row, so every row gets a mask with its own state.
    Before each token the sampler calls `allowed(row)` (`row.tokens`: the ids generated so far) for a bool
    tensor of shape [vocab] (True = allowed; None = no restriction this step); after the token is chosen it
    calls `advance(token)`. The mask applies after penalties and logit_bias, before temperature, top-k and
    top-p, so logprobs report the constrained distribution. A step where nothing is allowed, or where
    `allowed` raises ConstraintFailed, ends the row with finish_reason "grammar_error"."""

    def allowed(self, row) -> object | None: ...

    def advance(self, token: int) -> None: ...


@dataclass
class SamplingParams:
    """How to pick each token and when to stop. The server fills it from OpenAI's fields; `n` choices run as
    n rows, choice j seeded with `seed + j` (`choices()`), the same on every path."""

    max_new_tokens: int = 256  # the server's max_tokens; 0 ends after the prompt (usage and prompt only)
    temperature: float = 0.0  # below GREEDY_BELOW: greedy (argmax)
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # sample from the k most likely tokens; 0 = all
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL / transformers: divide positive logits of prompt and generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 bans it)
    seed: int | None = None  # a seeded row's text depends on nothing else: not its batch-mates, not the device RNG
    stop: list[str] = field(default_factory=list)  # the reply ends before the first of these strings
    logprobs: int | None = None  # alternatives per generated token to report with its logprob; None = no logprobs
    prompt_logprobs: int | None = None  # the same for every prompt token (OpenAI's echo + logprobs); None = off
    n: int = 1  # choices per prompt (generate_batch and the server expand them into rows)
    token_mask: Callable[[], TokenMask] | None = None  # constrained decoding: one fresh mask per row

    def __post_init__(self):
        checks = [(name, getattr(self, name), limit) for name, limit in LIMITS.items() if name != "logit_bias"]
        checks += [(f"logit_bias[{token}]", bias, LIMITS["logit_bias"]) for token, bias in self.logit_bias.items()]
        problems = [f"{name} {value!r} must be {describe(limit)}" for name, value, limit in checks
                    if value is not None and not within(value, limit)]
        if problems:
            raise ValueError("sampling settings: " + "; ".join(problems))
        self.stop = [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def choices(self) -> list[SamplingParams]:
        """One setting per choice, n = 1 each; choice j is seeded with seed + j."""
        return [replace(self, n=1, seed=None if self.seed is None else self.seed + j) for j in range(self.n)]
