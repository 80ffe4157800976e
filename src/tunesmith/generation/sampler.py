"""Picking one row's next token from its logits: penalties, logit_bias and the token mask, then argmax or
seeded sampling (temperature, top-k, top-p), with logprobs when asked.

Each row has a sampler of its own with its own `torch.Generator`, and samples on the CPU in float32: a seeded
row draws the same random numbers alone or beside any batch-mates, on any device."""

from __future__ import annotations

from dataclasses import dataclass

from .params import ConstraintFailed, SamplingParams


@dataclass
class Token:
    """One generated token for logprobs: its text, its logprob and the top alternatives (text, logprob)."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


class Sampler:
    def __init__(self, params: SamplingParams, prompt: list[int], vocab: int, tokenizer):
        import torch

        self.params, self.tokenizer = params, tokenizer
        self.generator = None  # greedy rows draw nothing, and leave the global RNG as they found it
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
            self.generator = torch.Generator().manual_seed(seed % 2**64)
        # counts: generated tokens (OpenAI's penalties); seen: prompt and generated (transformers' repetition penalty)
        self.counts = torch.zeros(vocab) if (params.presence_penalty or params.frequency_penalty) else None
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            self.seen[[t for t in prompt if 0 <= t < vocab]] = True
        self.bias = None
        if params.logit_bias:
            outside = sorted(t for t in params.logit_bias if not 0 <= t < vocab)
            if outside:
                raise ValueError(f"logit_bias names token id {outside[0]}, but this model's vocabulary has ids 0 to "
                                 f"{vocab - 1}")
            self.bias = torch.zeros(vocab)
            self.bias[list(params.logit_bias)] = torch.tensor(list(params.logit_bias.values()), dtype=torch.float)
        self.mask = params.token_mask() if params.token_mask is not None else None

    def pick(self, logits, row=None) -> tuple[int, Token | None]:
        """The next token for logits [V] (float32, CPU), and its logprobs when asked; `row` goes to the mask."""
        import torch

        p = self.params
        if self.seen is not None:  # CTRL (Keskar et al. 2019) as transformers applies it: shrink toward 0
            chosen = logits[self.seen]
            logits = logits.clone()
            logits[self.seen] = torch.where(chosen > 0, chosen / p.repetition_penalty, chosen * p.repetition_penalty)
        if self.counts is not None:  # OpenAI's definition: mu - count * frequency - (count > 0) * presence
            logits = logits - self.counts * p.frequency_penalty - (self.counts > 0).float() * p.presence_penalty
        if self.bias is not None:
            logits = logits + self.bias
        if self.mask is not None and (allowed := self.mask.allowed(row)) is not None:
            allowed = allowed.to(device=logits.device, dtype=torch.bool)
            if not bool(allowed.any()):
                raise ConstraintFailed("the token mask allows no token at this step")
            logits = logits.masked_fill(~allowed, float("-inf"))
        token = int(logits.argmax()) if p.greedy else self._sample(logits)
        info = self._logprobs(logits, token) if p.logprobs is not None else None
        self.record(token)
        return token, info

    def _sample(self, logits) -> int:
        import torch

        p = self.params
        scaled = logits / p.temperature
        if 0 < p.top_k < scaled.shape[-1]:
            scaled = scaled.masked_fill(scaled < scaled.topk(p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(scaled, -1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p  # keep the smallest set reaching top_p
            drop[0] = False  # a top_p below float32's resolution (1e-300 rounds to 0) keeps the top token
            probs = probs.clone()
            probs[order[drop]] = 0
        return draw(probs, self.generator)

    def _logprobs(self, logits, token: int) -> Token:
        """Logprobs of the distribution after penalties, logit_bias and the mask, before temperature and top-k/p."""
        import torch

        logp = torch.log_softmax(logits, -1)
        top = logp.topk(self.params.logprobs) if self.params.logprobs else None
        alternatives = [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(*top)] if top else []
        return Token(self.tokenizer.decode([token]), float(logp[token]), alternatives)

    def record(self, token: int) -> None:
        """Count `token` for the penalties and move the mask past it."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.mask is not None:
            self.mask.advance(token)


def draw(probs, generator) -> int:
    """One token drawn from `probs` [V] (not necessarily summing to 1; zeros never drawn) with one uniform number
    from `generator`: the first token whose cumulative probability (float64) passes it. torch.multinomial draws V
    exponential numbers for one sample: 0.93 ms a token over SmolLM2's 49k vocabulary on this project's 2-core CPU
    against 0.03 ms, 7 % of a llama.cpp batch-1 decode step."""
    import torch

    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cdf[-1])
    token = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))
    if token >= len(probs) or not probs[token] > 0:  # u rounded onto the total: the last token that can be drawn
        token = int(probs.nonzero()[-1])
    return token


def prompt_logprobs(logits, ids: list[int], top: int, tokenizer, start: int = 0) -> list[Token | None]:
    """Prompt tokens' logprobs under the model given the tokens before them, with `top` alternatives, from the
    logits [n, V] of prompt positions start .. start + n - 1 (one piece as prefill reads it, on any device: no
    [T, V] of a whole prompt is ever kept). Position i predicts token i + 1, so this scores ids[start + 1 ..
    start + n] within the prompt, preceded by None for the first token (nothing predicts it, as OpenAI's echo
    reports it) when the piece starts the prompt. The model's distribution as it is: no penalties, this scores."""
    import torch

    targets = ids[start + 1:start + 1 + logits.shape[0]]
    out: list[Token | None] = [None] if start == 0 else []
    if not targets:
        return out
    logp = torch.log_softmax(logits[:len(targets)].float(), -1)  # [n, V]
    chosen = logp.gather(-1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
    values, indices = (t.tolist() for t in logp.topk(top, -1)) if top else ([[]] * len(chosen),) * 2
    return out + [Token(tokenizer.decode([token]), chosen[i],
                        [(tokenizer.decode([t]), v) for v, t in zip(values[i], indices[i])])
                  for i, token in enumerate(targets)]
