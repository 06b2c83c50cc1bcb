"""Overlong shaping (DAPO's soft penalty) against hand-computed values, and algo.mask_truncated: a masked
sample leaves the loss sum, never its group's V* (OAPL) or baseline (GRPO)."""

from __future__ import annotations

import pytest
import torch

from megatron_oapl.algo.grpo import grpo_loss
from megatron_oapl.algo.oapl import oapl_loss, v_star
from megatron_oapl.algo.shaping import overlong_penalties, shaped_rewards
from megatron_oapl.config import ConfigError, load_config
from megatron_oapl.learner.batch import build_batch
from megatron_oapl.learner.step import LossSpec, SequenceTargets


def test_penalty_is_zero_before_the_buffer_and_linear_to_minus_the_penalty_at_the_limit():
    # Lmax = 20, buffer 4: free up to 16 tokens, then -p * (n - 16) / 4
    got = overlong_penalties([3, 16, 17, 18, 20], max_new_tokens=20, buffer_tokens=4, penalty=1.0)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalties([19], 20, 4, penalty=0.5).tolist() == [-0.375]
    assert overlong_penalties([20, 8], 8, 0, 1.0).tolist() == [0.0, 0.0]  # buffer 0: off
    assert overlong_penalties([8, 1], 8, 8, 2.0).tolist() == [-2.0, -0.25]  # the buffer is the whole range


def test_shaped_rewards_add_the_penalty_to_the_raw_scores():
    shaped = shaped_rewards([[1.0, 0.0], [1.0, 1.0]], [[10, 4], [9, 2]], max_new_tokens=10, buffer_tokens=2,
                            penalty=1.0)
    assert shaped.dtype == torch.float32
    assert shaped.tolist() == [[0.0, 0.0], [0.5, 1.0]]


@pytest.mark.parametrize("overrides,needle", [
    (("rewards.overlong_buffer_tokens=9", "fleet.max_new_tokens=8"),
     "rewards.overlong_buffer_tokens=9 must be <= fleet.max_new_tokens=8"),
    (("rewards.overlong_buffer_tokens=-1",), "rewards.overlong_buffer_tokens=-1 must be >= 0"),
    (("rewards.overlong_penalty=-0.5",), "rewards.overlong_penalty=-0.5 must be >= 0"),
])
def test_bad_overlong_settings_are_one_line_naming_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, check_hardware=False)
    assert needle in str(err.value) and len(err.value.errors) == 1


def test_oapl_masked_sequence_leaves_the_sum_but_still_sets_v_star():
    rewards = torch.tensor([[1.0, 0.0, 0.0]])
    logp_lag = torch.tensor([[-2.0, -3.0, -1.0]])
    logp = torch.tensor([[-1.5, -3.5, -1.0]], requires_grad=True)
    keep = torch.tensor([[True, True, False]])
    loss, metrics = oapl_loss(logp, logp_lag, rewards, beta1=1.0, beta2=0.5, normalizer=1.0, keep=keep)
    loss.backward()
    vs = v_star(rewards, 1.0)  # from all three rewards
    residual = 0.5 * (logp.detach() - logp_lag) - (rewards - vs[:, None])
    assert loss.item() == pytest.approx(residual[0, :2].square().sum().item())
    assert logp.grad[0, 2] == 0 and logp.grad[0, 0] != 0
    assert metrics["kept_seq_frac"].item() == pytest.approx(2 / 3)
    assert metrics["v_star_mean"].item() == pytest.approx(vs.item())


def test_grpo_masked_tokens_leave_the_mean_but_the_group_baseline_keeps_every_reward():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    lp = torch.zeros(1, 4, 2, requires_grad=True)
    mask = torch.ones(1, 4, 2)
    mask[0, 3] = 0  # sample 3 truncated and masked
    loss, _ = grpo_loss(lp, lp.detach(), mask, rewards)
    loss.backward()
    # the advantages are those of all four rewards (mean 0.5, std 0.5): +-1; sample 3 gets no gradient
    assert lp.grad[0, :, 0].tolist() == pytest.approx([-1 / 6, 1 / 6, 1 / 6, 0.0], abs=1e-5)


def test_the_token_budget_path_combines_the_truncation_mask_with_the_degenerate_filter():
    batch = build_batch([[1, 2], [1, 2]], [[[3], [4]], [[5], [6]]], [[1.0, 0.0], [1.0, 1.0]],
                        keep=[[True, False], [True, True]])
    spec = LossSpec("oapl", temperature=1.0, vocab_size=8, filter_degenerate=True)
    targets = SequenceTargets.of(spec, batch, "cpu")
    assert targets.keep.tolist() == [True, False, False, False]  # masked sample; the all-equal group
    grpo = SequenceTargets.of(LossSpec("grpo", temperature=1.0, vocab_size=8), batch, "cpu")
    assert grpo.keep.tolist() == [True, False, True, True] and grpo.advantage[:2].tolist() == pytest.approx(
        [1.0, -1.0], abs=1e-5)


def test_batch_slices_keep_with_its_groups():
    batch = build_batch([[1], [1]], [[[2], [3]], [[4], [5]]], [[0.0, 1.0], [1.0, 0.0]],
                        keep=[[True, False], [False, True]])
    assert batch.groups(1, 2).keep.tolist() == [[False, True]]
    assert build_batch([[1]], [[[2], [3]]], [[0.0, 1.0]]).keep is None


def test_the_learner_shapes_scores_and_masks_truncated_samples_where_groups_become_loss_inputs():
    from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample
    from megatron_oapl.train import batch_from_groups, rollout_metrics

    cfg = load_config(None, ("fleet.max_new_tokens=4", "rewards.overlong_buffer_tokens=2", "algo.mask_truncated=true",
                             "fleet.group_size=2"), check_hardware=False)
    samples = [Sample([5, 6, 7, 8], [-0.1] * 4, "length", reward=1.0),
               Sample([5, 6, 9], [-0.1] * 3, "stop", reward=0.0)]
    group = RolloutGroup(Prompt("p", [1, 2]), samples, 0, 1.0, 1.0)
    batch = batch_from_groups([group], cfg)
    assert batch.rewards.tolist() == [[0.0, -0.5]]  # 4 tokens: -1; 3 tokens: -0.5
    assert batch.keep.tolist() == [[False, True]]
    assert [s.reward for s in group.samples] == [1.0, 0.0]  # the raw scores stay on the samples
    metrics = rollout_metrics([group], 0, cfg)
    assert metrics["rollout/overlong_penalized_frac"] == 1.0 and metrics["rollout/reward_mean"] == 0.5
    assert metrics["rollout/groups_trained"] == 1
    plain = load_config(None, ("fleet.group_size=2",), check_hardware=False)
    assert batch_from_groups([group], plain).rewards.tolist() == [[1.0, 0.0]]
    assert batch_from_groups([group], plain).keep is None
