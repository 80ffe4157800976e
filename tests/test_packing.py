"""Packing: a packed batch gives every example exactly the loss it has alone (sdpa and eager), the exact
first-fit-decreasing layout, the collators' exact tensors, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.packing import (PackedCollator, PaddingCollator, pack, packing_efficiency,
                                    prepare_model_for_packing)
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_chat, tokenize_completion

MAX_LENGTH = 80


@pytest.fixture
def examples(chatml_tokenizer):
    """Four real examples of 66, 11, 12 and 34 tokens: they pack into rows [66 + 12] and [34 + 11], so the
    11- and 12-token ones each follow another example."""
    tok = chatml_tokenizer
    made = [
        tokenize_chat(tok, [{"role": "user", "content": "What is the capital of France?"},
                            {"role": "assistant", "content": "Paris."}]),
        tokenize_completion(tok, "Q: 2+2?\nA:", " 4"),
        # No prompt: even the first token is learnable, which a packed row must not keep (see `pack`).
        tokenize_completion(tok, "", "Review: great movie, loved it. Sentiment: positive"),
        tokenize_chat(tok, [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "Hello!"},
                            {"role": "assistant", "content": "How can I help you today?"}]),
    ]
    assert [len(e.input_ids) for e in made] == [66, 11, 12, 34]
    assert made[2].labels[0] == made[2].input_ids[0]
    return [e.features() for e in made]


def token_losses(logits, labels):
    """Per-token cross-entropy with the standard causal shift: logits (B, T, V), labels (B, T) -> (B, T-1),
    entry t being the loss of predicting labels[t+1] from position t; 0 where that label is -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape[0], -1)


def segments(position_ids):
    """(start, end) of each segment of a packed row: positions restart at 0."""
    starts = [t for t, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


def solo(model, example):
    """Logits (T, V) and per-token losses (T-1,) of one example run alone: no padding, no packing."""
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits[0], token_losses(logits, labels)[0]


def locate(batch, examples):
    """(row, start, end) of each example in a packed batch, found by its token ids between position restarts;
    the padding segment matches no example."""
    found = {}
    for r, row_positions in enumerate(batch["position_ids"].tolist()):
        for start, end in segments(row_positions):
            ids = batch["input_ids"][r, start:end].tolist()
            found.update({i: (r, start, end) for i, e in enumerate(examples) if e["input_ids"] == ids})
    assert sorted(found) == list(range(len(examples)))
    return [found[i] for i in range(len(examples))]


def per_example(model, batch, examples):
    """Each example's logits (T, V) and per-token losses (T-1,) cut out of one forward pass over the batch."""
    with torch.no_grad():
        logits = model(**batch).logits
    losses = token_losses(logits, batch["labels"])
    # losses[:, t] scores token t+1, so a segment's own tokens 1.. are losses[:, start:end-1].
    return [(logits[r, start:end], losses[r, start:end - 1]) for r, start, end in locate(batch, examples)]


def mean_loss(losses, labels):
    learnable = torch.tensor(labels[1:]) != IGNORE_INDEX
    return losses[learnable].mean()


# ---------------------------------------------------------------------------------------------------------
# The model sees every packed example exactly as it sees it alone
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_example_its_solo_loss(tiny_lm, chatml_tokenizer, examples, attn):
    tiny_lm.set_attn_implementation(attn)
    tiny_lm.config.use_cache = False
    rows = pack(examples, MAX_LENGTH)
    batch = PackedCollator(chatml_tokenizer.pad_token_id)(rows)
    assert batch["input_ids"].shape == (2, 78)  # rows of 66+12 and 34+11 tokens, the second padded by 33

    for example, (logits, losses) in zip(examples, per_example(tiny_lm, batch, examples)):
        solo_logits, solo_losses = solo(tiny_lm, example)
        torch.testing.assert_close(logits, solo_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(losses, solo_losses, rtol=0, atol=1e-5)
        torch.testing.assert_close(mean_loss(losses, example["labels"]),
                                   mean_loss(solo_losses, example["labels"]), rtol=0, atol=1e-5)

    # The model's own loss on the packed batch (what Trainer optimises) is the token-weighted mean of the solo
    # losses: no extra term for a last token predicting the next example's first token, none for padding.
    solo_sum = sum(solo(tiny_lm, e)[1].sum() for e in examples)
    learnable = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    with torch.no_grad():
        packed_loss = tiny_lm(**batch).loss
    torch.testing.assert_close(packed_loss, solo_sum / learnable, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_plain_concatenation_leaks_between_examples(tiny_lm, chatml_tokenizer, examples, attn):
    """The same rows without restarting positions (attention_mask of ones over real tokens): every example
    after the first in its row attends to its predecessors and gets a different loss. So the test above can
    fail."""
    tiny_lm.set_attn_implementation(attn)
    tiny_lm.config.use_cache = False
    batch = PackedCollator(chatml_tokenizer.pad_token_id)(pack(examples, MAX_LENGTH))
    segmented = per_example(tiny_lm, batch, examples)
    # Rows of 78 and 45 real tokens; positions default to 0..77 in both.
    attention_mask = (torch.arange(78) < torch.tensor([[78], [45]])).long()
    with torch.no_grad():
        logits = tiny_lm(input_ids=batch["input_ids"], attention_mask=attention_mask).logits
    losses = token_losses(logits, batch["labels"])

    differences = []
    for example, (_, packed_losses), (r, start, end) in zip(examples, segmented, locate(batch, examples)):
        concatenated = losses[r, start:end - 1]
        differences.append((mean_loss(concatenated, example["labels"])
                            - mean_loss(packed_losses, example["labels"])).abs().item())
    # The 66- and 34-token examples open their rows, so plain causal attention already isolates them; the
    # 11- and 12-token ones sit second and read the example before them.
    assert differences[0] < 1e-5 and differences[3] < 1e-5, differences
    assert differences[1] > 1e-3 and differences[2] > 1e-3, differences


def test_kv_cache_switches_packing_detection_off(tiny_lm, chatml_tokenizer, examples):
    """transformers only reads segments from position_ids when there is no cache; with config.use_cache=True
    (the default, even in train mode) the examples leak. prepare_model_for_packing turns the cache off."""
    tiny_lm.train()  # Llama has no dropout, so train mode is deterministic here
    batch = PackedCollator(chatml_tokenizer.pad_token_id)(pack(examples, MAX_LENGTH))
    assert tiny_lm.config.use_cache is True
    with torch.no_grad():
        cached = tiny_lm(**batch).logits
    prepare_model_for_packing(tiny_lm)
    assert tiny_lm.config.use_cache is False
    with torch.no_grad():
        uncached = tiny_lm(**batch).logits
    # The first segment of each row is causal-only either way; the 12-token example at row 0, 66:78 is not.
    torch.testing.assert_close(cached[:, :34], uncached[:, :34], rtol=0, atol=1e-5)
    assert (cached[0, 66:78] - uncached[0, 66:78]).abs().max() > 1e-3
    torch.testing.assert_close(uncached[0, 66:78], solo(tiny_lm, examples[2])[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------

def synthetic(*lengths):
    """Example n (0-based) has ids 100n, 100n+1, ... and every label learnable."""
    made = []
    for n, length in enumerate(lengths):
        ids = list(range(100 * n, 100 * n + length))
        made.append({"input_ids": ids, "labels": list(ids)})
    return made


def test_first_fit_decreasing_layout_is_exact():
    # Longest first: 5 opens row 0; 4 does not fit its 3 free slots and opens row 1; 3 fills row 0; 2 -> row 1.
    rows = pack(synthetic(5, 3, 4, 2), max_length=8)
    assert rows == [
        {"input_ids": [0, 1, 2, 3, 4, 100, 101, 102],
         "labels": [-100, 1, 2, 3, 4, -100, 101, 102],
         "position_ids": [0, 1, 2, 3, 4, 0, 1, 2]},
        {"input_ids": [200, 201, 202, 203, 300, 301],
         "labels": [-100, 201, 202, 203, -100, 301],
         "position_ids": [0, 1, 2, 3, 0, 1]},
    ]
    assert packing_efficiency(rows, 8) == 14 / 16


def test_ties_keep_input_order_and_every_token_appears_once():
    examples = synthetic(3, 6, 3, 2, 6, 1, 4, 3, 5, 2)
    rows = pack(examples, max_length=8)
    # Placement order 1, 4 (the two 6s, in input order), 8, 6, 0, 2, 7 (the 3s), 3, 9 (the 2s), 5; each goes to
    # the leftmost row with room: 6, 6, 5, 4 open rows 0-3, the 3s fill row 2, row 3 and open row 4, the 2s
    # close rows 0 and 1, and the 1 closes row 3.
    starts = [[token // 100 for token, p in zip(row["input_ids"], row["position_ids"]) if p == 0] for row in rows]
    assert starts == [[1, 3], [4, 9], [8, 0], [6, 2, 5], [7]]
    assert pack(examples, max_length=8) == rows  # deterministic
    flat = sorted(token for row in rows for token in row["input_ids"])
    assert flat == sorted(token for e in examples for token in e["input_ids"])
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 8
        for start, end in segments(row["position_ids"]):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == IGNORE_INDEX
            assert row["labels"][start + 1:end] == row["input_ids"][start + 1:end]


def test_an_example_of_exactly_max_length_fills_a_row_and_nothing_packs_to_nothing():
    assert pack(synthetic(8), 8)[0]["position_ids"] == list(range(8))
    assert pack([], 8) == []
    assert packing_efficiency([], 8) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------

def test_packed_collator_pads_with_a_segment_of_its_own_and_no_attention_mask():
    rows = pack(synthetic(5, 3, 4, 2), max_length=8)
    batch = PackedCollator(pad_token_id=7)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4, 100, 101, 102], [200, 201, 202, 203, 300, 301, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 1, 2, 3, 4, -100, 101, 102],
                                        [-100, 201, 202, 203, -100, 301, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    # What transformers makes of it: segment ids per token, attention only within equal ids. The padding is a
    # third segment even though it follows a segment with the same positions.
    from transformers.masking_utils import find_packed_sequence_indices

    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [[0, 0, 0, 0, 0, 1, 1, 1],
                                                                           [0, 0, 0, 0, 1, 1, 2, 2]]


def test_padding_collator_right_pads_with_an_attention_mask():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddingCollator(pad_token_id=0)(examples)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

def test_an_example_longer_than_max_length_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"^example 2 has 9 tokens, more than max_length=8; truncate examples to "
                                         r"max_length before packing \(tokenize_records\(\.\.\., max_length=8\)\)$"):
        pack(synthetic(3, 9), max_length=8)


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": [1, 2], "labels": [1]}, "example 1 has 2 input ids but 1 labels; they must line up one to one"),
    ({"input_ids": [], "labels": []}, "example 1 has no tokens; drop empty examples before packing"),
])
def test_malformed_examples_are_errors(bad, message):
    with pytest.raises(ValueError) as err:
        pack([bad], max_length=8)
    assert str(err.value) == message
