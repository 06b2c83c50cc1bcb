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


# --------------------------------------------------------------------------------------------------
# Token-budget micro-batches and packing
# --------------------------------------------------------------------------------------------------

from megatron_oapl.learner.batch import (  # noqa: E402
    assign_to_ranks,
    deal_packed,
    deal_padded,
    layout,
    pad_multiple,
    plan_micro_batches,
)


def test_pad_multiple_is_lcm_of_tp_and_16():
    assert [pad_multiple(tp) for tp in (1, 2, 3, 8, 32)] == [16, 16, 48, 16, 32]


def test_padded_dealing_fills_the_budget_longest_first_and_isolates_long_sequences():
    lengths = [5, 40, 12, 3, 17, 16]
    # padded to 16: rows of 48 tokens (40) alone; 17 -> 32 alone in 32; then 16,12,5 -> 3 x 16 = 48 > 40
    assert deal_padded(lengths, 32, 16) == [[1], [4], [5, 2], [0, 3]]
    for ids in deal_padded(lengths, 32, 16):
        padded = -(-max(lengths[i] for i in ids) // 16) * 16
        assert len(ids) * padded <= 32 or len(ids) == 1


def test_packed_dealing_is_first_fit_decreasing_within_the_budget():
    lengths = [5, 40, 12, 3, 17, 9]
    bins = deal_packed(lengths, 32, 16)
    assert bins == [[1], [4, 2, 3], [5, 0]]  # 40 alone (over budget); 17+12+3 = 32; 9+5 = 14 -> 16
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


def test_ranks_get_equal_micro_batch_counts_padded_with_empty_ones():
    lengths = [10, 10, 10, 30, 10]
    plans = assign_to_ranks([[3], [0, 1], [2], [4]], lengths, 3, 16, pack=False)
    assert [len(p) for p in plans] == [2, 2, 2]
    assert sorted(i for p in plans for b in p for i in b) == [0, 1, 2, 3, 4]
    assert sum(b == [] for p in plans for b in p) == 2


def test_plan_counts_padding_over_all_ranks():
    batch = build_batch(PROMPTS, COMPLETIONS, [[1, 0], [0, 1]], LOGP)  # lengths 5, 4, 5, 4
    assert batch.lengths.tolist() == [5, 4, 5, 4]
    plan = plan_micro_batches(batch, 16, 16, pack=True, ranks=2)
    assert plan.micro_batches_per_rank == 1 and plan.computed_tokens == 32 and plan.useful_tokens == 18
    assert plan.padding_fraction == pytest.approx(1 - 18 / 32)


def test_padded_layout_keeps_each_sequence_in_its_row():
    batch = build_batch(PROMPTS, COMPLETIONS, [[1, 0], [0, 1]], LOGP, seq_length=8)
    mb = layout(batch, [2, 1], multiple=16, pack=False)
    assert mb.tokens.shape == (2, 16) and mb.seq_index.tolist() == [2, 1]
    assert torch.equal(mb.tokens[0, :5], batch.tokens[2, :5]) and torch.equal(mb.labels[1, :4], batch.labels[1, :4])
    assert mb.loss_mask.sum() == batch.loss_mask[[1, 2]].sum()
    assert mb.segments[0].tolist() == [0] * 5 + [-1] * 11


def test_packed_layout_restarts_positions_and_confines_attention():
    batch = build_batch(PROMPTS, COMPLETIONS, [[1, 0], [0, 1]], LOGP, seq_length=8)
    mb = layout(batch, [0, 3, 1], multiple=16, pack=True)  # lengths 5, 4, 4 -> 13 tokens in a row of 16
    assert mb.tokens.shape == (1, 16)
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 0]
    assert mb.cu_seqlens.tolist() == [0, 5, 9, 13, 16]  # the tail padding is a segment of its own
    assert torch.equal(mb.tokens[0, 5:9], batch.tokens[3, :4])
    # Each sequence's completion labels and engine log-probs stay with it.
    for k, i in enumerate([0, 3, 1]):
        here = (mb.segments[0] == k) & (mb.loss_mask[0] != 0)
        assert mb.labels[0][here].tolist() == batch.labels[i][batch.loss_mask[i] != 0].tolist()
        assert mb.behaviour_logp[0][here].tolist() == batch.behaviour_logp[i][batch.loss_mask[i] != 0].tolist()
    allowed = ~mb.block_causal_mask()[0, 0]
    assert allowed[6, 5] and not allowed[5, 4] and not allowed[4, 5] and allowed[4, 0]
    assert allowed.sum() == 15 + 10 + 10 + 6  # causal triangles of 5, 4, 4 and the 3-token tail


def test_empty_micro_batch_is_one_aligned_padding_row():
    batch = build_batch(PROMPTS, COMPLETIONS, [[1, 0], [0, 1]], LOGP)
    mb = layout(batch, [], multiple=16, pack=False)
    assert mb.tokens.shape == (1, 16) and mb.num_sequences == 0 and mb.loss_mask.sum() == 0


def test_packing_needs_a_token_budget():
    from megatron_oapl.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"^parallel.pack_sequences=true needs a token budget"):
        from_dict({"parallel": {"pack_sequences": True}})
    assert from_dict({"parallel": {"pack_sequences": True, "micro_batch_tokens": 64}}).parallel.pack_sequences


def test_budget_below_the_longest_prompt_is_refused():
    from megatron_oapl.config import ConfigError, from_dict
    from megatron_oapl.data.checks import _check_token_budget
    from megatron_oapl.rollout.types import Prompt

    prompts = [Prompt(prompt_id=str(n), token_ids=[1] * n, text="q", answer="a") for n in (3, 9)]
    _check_token_budget(from_dict({"parallel": {"micro_batch_tokens": 10}}), prompts)
    with pytest.raises(ConfigError, match=r"^parallel.micro_batch_tokens=9 is below the longest train prompt"):
        _check_token_budget(from_dict({"parallel": {"micro_batch_tokens": 9}}), prompts)


def test_packing_is_refused_where_the_local_attention_would_ignore_the_mask():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_oapl.learner.step import packing_attention_problem

    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2)
    assert packing_attention_problem(TransformerConfig(**base), transformer_engine=False) is None
    fused = TransformerConfig(**base, masked_softmax_fusion=True)
    assert packing_attention_problem(fused, transformer_engine=False).startswith("parallel.pack_sequences=true")
    assert packing_attention_problem(fused, transformer_engine=True) is None  # TE packs as THD


def test_padding_to_a_multiple_adds_masked_pad_tokens_only():
    batch = build_batch([[5, 6]], [[[7, 8, 9], [7]]], [[1.0, 0.0]], [[[-0.5, -0.25, -1.0], [-2.0]]])
    padded = batch.padded_to_multiple(16)
    assert (batch.seq_length, padded.seq_length) == (5, 16)
    assert torch.equal(padded.tokens[:, :5], batch.tokens) and not padded.tokens[:, 5:].any()
    assert torch.equal(padded.loss_mask.sum(-1), batch.loss_mask.sum(-1))
    assert torch.equal(padded.logp_lag, batch.logp_lag) and torch.equal(padded.lengths, batch.lengths)
    assert padded.padded_to_multiple(16) is padded
