"""A padded batch as one prefix-tree row: the row's layout token by token (a system prompt every row shares, a pair's
prompt, two replies that begin alike, padding on either side), the batches it declines, its epoch cost, and the
log-probabilities and gradients of the preference objectives equal to the padded batch's."""

from __future__ import annotations

import pytest
import torch

from test_shared_prefix import tiny_llama
from tunesmith.data.prefix_tree import prefix_tree, tree_tokens
from tunesmith.training.loss import token_log_probs

PAD, IGNORE = 0, -100
SYSTEM = [10, 11, 12]
# Two pairs in PreferenceCollator's order [chosen a, chosen b, rejected a, rejected b]: pair a's prompt is
# SYSTEM + [20, 21] and its replies both begin with 30; pair b's prompt is SYSTEM + [22].
ROWS = [SYSTEM + [20, 21, 30, 31, 32], SYSTEM + [22, 33], SYSTEM + [20, 21, 30, 40], SYSTEM + [22, 41, 42]]
PROMPTS = [5, 4, 5, 4]


def padded(rows: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    fill = [[PAD] * (width - len(r)) for r in rows]
    ids = [f + r if left else r + f for r, f in zip(rows, fill)]
    mask = [[0] * len(f) + [1] * len(r) if left else [1] * len(r) + [0] * len(f) for r, f in zip(rows, fill)]
    return torch.tensor(ids), torch.tensor(mask)


def test_the_row_holds_each_prefix_once_and_every_token_sees_its_ancestors_only():
    tree = prefix_tree(*padded(ROWS))
    # sorted: chosen a (all new), rejected a (shares 6: system, prompt a and the reply's first token 30),
    # chosen b (shares the system prompt), rejected b (shares system + 22)
    assert tree.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 40, 22, 33, 41, 42]]
    assert tree.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 6, 3, 4, 4, 5]]
    assert tree.index.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7],
                                   [0, 1, 2, 9, 10, -1, -1, -1],
                                   [0, 1, 2, 3, 4, 5, 8, -1],
                                   [0, 1, 2, 9, 11, 12, -1, -1]]
    mask = tree.attention_mask[0, 0]
    assert mask.shape == (13, 13) and mask.dtype == torch.bool
    seen = {p: [q for q in range(13) if mask[p, q]] for p in range(13)}
    assert seen[8] == [0, 1, 2, 3, 4, 5, 8]  # rejected a's 40: its prompt and the shared 30, never 31 or 32
    assert seen[12] == [0, 1, 2, 9, 11, 12]  # rejected b's 42: the system prompt, 22, 41, itself
    assert seen[10] == [0, 1, 2, 9, 10]  # chosen b's 33
    for b, row in enumerate(tree.index.tolist()):  # every real token: exactly its own sequence up to itself
        real = [p for p in row if p >= 0]
        for t, p in enumerate(real):
            assert seen[p] == sorted(real[:t + 1])


def test_left_padding_gives_the_same_row():
    right, left = prefix_tree(*padded(ROWS)), prefix_tree(*padded(ROWS, left=True))
    for name in ("input_ids", "position_ids", "attention_mask"):
        assert getattr(left, name).equal(getattr(right, name))
    assert left.index.tolist()[1] == [-1, -1, -1, 0, 1, 2, 9, 10]


def test_kept_positions_and_their_order():
    ids, attention = padded(ROWS)
    tree = prefix_tree(ids, attention)
    labels = torch.where(attention.bool(), ids, IGNORE)
    for b, prompt in enumerate(PROMPTS):
        labels[b, :prompt] = IGNORE
    learn = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE) != IGNORE  # t predicts t + 1
    keep, pick = tree.kept(learn)
    # chosen a predicts from rows 4..6, chosen b from 9, rejected a from 4, 5 (the same rows), rejected b from 9, 11
    assert keep[0].nonzero()[:, 0].tolist() == [4, 5, 6, 9, 11]
    assert pick.tolist() == [0, 1, 2, 3, 0, 1, 3, 4]
    assert tree.index[learn].tolist() == [4, 5, 6, 9, 4, 5, 9, 11]


def test_batches_that_would_save_too_little_stay_padded():
    assert prefix_tree(*padded(ROWS[:1])) is None  # one row: nothing to share
    different = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 1, 2, 3]]
    assert prefix_tree(*padded(different)) is None  # no common prefix
    assert prefix_tree(*padded(ROWS), worth=12 / 26) is None  # 13 row tokens for 26 real ones
    assert prefix_tree(*padded(ROWS), worth=13 / 26) is not None
    assert prefix_tree(*padded(ROWS), max_row=12) is None
    assert prefix_tree(*padded(ROWS), max_row=13).input_ids.shape == (1, 13)


def test_an_epoch_costs_each_batch_its_row():
    pair_a, pair_b = [ROWS[0], ROWS[2]], [ROWS[1], ROWS[3]]
    assert tree_tokens([pair_a, pair_b], batch_size=2) == 13
    assert tree_tokens([pair_a, pair_b], batch_size=1) == 9 + 7  # each pair's prompt once; the system prompt twice
    assert tree_tokens([pair_a, pair_b], batch_size=1, worth=0.5) == 15 + 11  # neither saves half: padded
    assert tree_tokens([], batch_size=4) == 0


# ---------------------------------------------------------------------------------------------------------
# the preference objectives' log-probabilities: the padded batch's values and gradients
# ---------------------------------------------------------------------------------------------------------

def pairs_batch(vocab: int = 100, seed: int = 0) -> dict:
    """Four pairs [chosen x4; rejected x4] with a 24-token system prompt, prompts of their own, and replies that
    begin with the same token; right-padded with labels on the replies, as PreferenceCollator makes them."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    system = draw(24)
    rows, prompts = [[], []], []
    for n in range(4):
        prompt, first = system + draw(6 + n), draw(1)
        prompts.append(len(prompt))
        rows[0].append(prompt + first + draw(5 + 2 * n))
        rows[1].append(prompt + first + draw(9 - n))
    ids, attention = padded(rows[0] + rows[1])
    labels = torch.where(attention.bool(), ids, IGNORE)
    for b, prompt in enumerate(prompts * 2):
        labels[b, :prompt] = IGNORE
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def log_probs_and_grads(model, batch: dict, share: bool) -> tuple[dict, dict, list]:
    """(token_log_probs' outputs, the gradients of a weighted sum of its log-probs, the shapes the model ran on)."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    model.zero_grad()
    try:
        out = token_log_probs(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                      "use_cache": False}, batch["labels"], share=share, chunk_rows=7)
    finally:
        hook.remove()
    weights = torch.linspace(0.5, 1.5, out["log_probs"].shape[1])  # every position's gradient counts differently
    (out["log_probs"] * weights).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, shapes


@pytest.mark.parametrize("variant", ["full", "lora", "recompute"])
def test_token_log_probs_on_the_tree_equal_the_padded_batchs(variant):
    model, batch = tiny_llama(variant), pairs_batch()
    tree = prefix_tree(batch["input_ids"], batch["attention_mask"])
    real = int(batch["attention_mask"].sum())
    assert tree is not None and tree.input_ids.shape[1] < 0.6 * real  # the tree is what runs
    padded_out, padded_grads, padded_shapes = log_probs_and_grads(model, batch, share=False)
    tree_out, tree_grads, tree_shapes = log_probs_and_grads(model, batch, share=True)
    assert padded_shapes == [batch["input_ids"].shape] and tree_shapes == [tree.input_ids.shape]
    assert tree_out.keys() == padded_out.keys()
    for name, value in padded_out.items():
        assert tree_out[name].shape == value.shape == (8, batch["input_ids"].shape[1] - 1)
        torch.testing.assert_close(tree_out[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert (padded_out["log_probs"] != 0).sum() == (batch["labels"][:, 1:] != IGNORE).sum()
    assert padded_grads.keys() == tree_grads.keys() and padded_grads
    if variant == "lora":
        assert all("lora_" in name for name in padded_grads)
    for name in padded_grads:
        torch.testing.assert_close(tree_grads[name], padded_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_batch_the_tree_cannot_stand_in_for_runs_padded():
    """Inputs the row does not carry (here position ids) keep the padded path."""
    model, batch = tiny_llama("full"), pairs_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    with torch.no_grad():
        token_log_probs(model, inputs, batch["labels"], share=True)
    hook.remove()
    assert shapes == [batch["input_ids"].shape]
