"""Packing rollout groups into the learner's padded tensors."""

from __future__ import annotations

import pytest
import torch

from megatron_oapl.learner.batch import build_batch

PROMPTS = [[5, 6, 7], [8, 9]]
COMPLETIONS = [[[1, 2], [3]], [[4, 4, 4], [2, 1]]]
LOGP = [[[-0.5, -1.0], [-2.0]], [[-0.1, -0.2, -0.3], [-1.5, -0.5]]]


def test_masked_labels_are_exactly_the_completion_tokens():
    batch = build_batch(PROMPTS, COMPLETIONS, [[1, 0], [0, 1]], LOGP, pad_id=0, seq_length=8)
    assert batch.tokens.shape == (4, 8) and batch.group_size == 2
    rows = [(p, c) for p in range(2) for c in range(2)]
    for row, (p, c) in enumerate(rows):
        mask = batch.loss_mask[row].bool()
        assert batch.labels[row][mask].tolist() == COMPLETIONS[p][c]
        assert batch.tokens[row, : len(PROMPTS[p])].tolist() == PROMPTS[p]
        assert batch.behaviour_logp[row][mask].tolist() == pytest.approx(LOGP[p][c])
    torch.testing.assert_close(batch.logp_lag, torch.tensor([[-1.5, -2.0], [-0.6, -2.0]]))


def test_shards_and_micro_batches_keep_whole_groups():
    batch = build_batch(PROMPTS * 2, COMPLETIONS * 2, [[1, 0], [0, 1]] * 2, LOGP * 2)
    shard = batch.shard(1, 2)
    assert shard.num_groups == 2 and torch.equal(shard.tokens, batch.tokens[4:])
    micro = shard.micro_batches(1)
    assert [m.num_sequences for m in micro] == [2, 2]
    with pytest.raises(ValueError, match="do not split evenly over 3 ranks"):
        batch.shard(0, 3)


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="exceeds seq_length=4"):
        build_batch(PROMPTS, COMPLETIONS, [[1, 0], [0, 1]], seq_length=4)
