"""The sampler's draw: one seeded uniform number against the cumulative probabilities. Its frequencies are the
probabilities, a token of probability 0 (cut by top-k or top-p, or zero from the start) is never drawn, and a
seed gives the same tokens again."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tunesmith.generation import SamplingParams
from tunesmith.generation.sampler import Sampler, draw


def test_draw_frequencies_are_the_probabilities_and_zeros_are_never_drawn():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    counts = Counter(draw(probs, generator) for _ in range(n))
    assert set(counts) == {0, 2, 3}
    for token, p in [(0, 0.1), (2, 0.6), (3, 0.3)]:  # within 4 standard deviations of a binomial count
        assert abs(counts[token] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (token, counts)


def test_unnormalised_probabilities_are_drawn_in_proportion():
    generator = torch.Generator().manual_seed(1)
    counts = Counter(draw(torch.tensor([2.0, 6.0]), generator) for _ in range(8_000))
    assert abs(counts[1] / 8_000 - 0.75) < 0.02


def test_a_uniform_number_rounded_onto_the_total_draws_the_last_token_that_can_be(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))
    assert draw(torch.tensor([0.25, 0.75, 0.0, 0.0]), torch.Generator()) == 1


def test_a_seed_draws_the_same_tokens_and_top_k_keeps_to_its_k():
    vocab = 50
    logits = torch.linspace(0, 3, vocab)

    def tokens(seed: int, **settings) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed, **settings), [], vocab, None)
        return [sampler.pick(logits)[0] for _ in range(200)]

    assert tokens(7) == tokens(7) and tokens(7) != tokens(8)
    assert set(tokens(3, top_k=3)) == {vocab - 1, vocab - 2, vocab - 3}
    top_p = tokens(5, top_p=0.2)
    kept = torch.softmax(logits, -1).sort(descending=True)
    reach = int((kept.values.cumsum(-1) < 0.2).sum()) + 1  # the smallest set reaching 0.2
    assert set(top_p) <= set(kept.indices[:reach].tolist()) and len(set(top_p)) > 1


@pytest.mark.parametrize("vocab", [49_152])
def test_draw_matches_a_large_vocabularys_head(vocab):
    """On a real-sized vocabulary the most likely token is drawn about as often as its probability says."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.zeros(vocab)
    logits[123] = 12.0  # p ~ 0.76 against 49k tokens at e^0
    probs = torch.softmax(logits, -1)
    n = 4_000
    hits = sum(draw(probs, generator) == 123 for _ in range(n))
    p = float(probs[123])
    assert abs(hits / n - p) < 4 * (p * (1 - p) / n) ** 0.5
