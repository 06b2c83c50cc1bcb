"""GRPO baseline loss (megatron_oapl.algo.grpo) against a python-loop reference."""

import math

import pytest
import torch

from megatron_oapl.algo import group_normalized_advantages, grpo_loss


def _adv_ref(rewards, eps):
    out = []
    for row in rewards:
        m = sum(row) / len(row)
        sd = math.sqrt(sum((x - m) ** 2 for x in row) / len(row))
        out.append([(x - m) / (sd + eps) for x in row])
    return out


def _grpo_ref(lp, lpb, mask, rewards, eps_low, eps_high, adv_eps, normalizer=None):
    adv = _adv_ref(rewards, adv_eps)
    total, n, clipped, ratio_sum, kl = 0.0, 0, 0, 0.0, 0.0
    for p in range(len(lp)):
        for g in range(len(lp[p])):
            a = adv[p][g]
            for t in range(len(lp[p][g])):
                if not mask[p][g][t]:
                    continue
                ratio = math.exp(lp[p][g][t] - lpb[p][g][t])
                clip_r = min(max(ratio, 1 - eps_low), 1 + eps_high)
                total += -min(ratio * a, clip_r * a)
                n += 1
                clipped += (a > 0 and ratio > 1 + eps_high) or (a < 0 and ratio < 1 - eps_low)
                ratio_sum += ratio
                kl += (ratio - 1) - math.log(ratio)
    norm = normalizer if normalizer is not None else n
    return total / norm, clipped / n, ratio_sum / n, kl / n


def _batch(P=3, G=4, T=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lpb = -torch.rand(P, G, T, generator=gen, dtype=torch.float64) * 3
    lp = lpb + 0.3 * torch.randn(P, G, T, generator=gen, dtype=torch.float64)
    mask = torch.rand(P, G, T, generator=gen) > 0.3
    mask[..., 0] = True
    rewards = torch.rand(P, G, generator=gen, dtype=torch.float64)
    rewards[0] = 0.5  # a degenerate group
    return lp, lpb, mask, rewards


def test_group_normalized_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2], [3.0, 1.0, 2.0, 0.5]], dtype=torch.float64)
    got = group_normalized_advantages(r, 1e-6)
    torch.testing.assert_close(got, torch.tensor(_adv_ref(r.tolist(), 1e-6), dtype=torch.float64))
    assert torch.all(got[1] == 0)
    # population std: {0, 1} group -> +-1 (unbiased std would give +-0.866)
    torch.testing.assert_close(got[0], torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.1, 0.28)])
def test_grpo_loss_matches_loop_reference(eps_low, eps_high):
    lp, lpb, mask, rewards = _batch()
    loss, metrics = grpo_loss(lp, lpb, mask, rewards, eps_low=eps_low, eps_high=eps_high)
    ref, clip_frac, ratio_mean, kl = _grpo_ref(
        lp.tolist(), lpb.tolist(), mask.tolist(), rewards.tolist(), eps_low, eps_high, 1e-6
    )
    assert math.isclose(loss.item(), ref, rel_tol=1e-10, abs_tol=1e-12)
    assert math.isclose(metrics["clip_frac"].item(), clip_frac, abs_tol=1e-6)
    assert clip_frac > 0  # the batch exercises clipping
    assert math.isclose(metrics["ratio_mean"].item(), ratio_mean, rel_tol=1e-5)
    assert math.isclose(metrics["approx_kl"].item(), kl, rel_tol=1e-4)
    adv = [x for row in _adv_ref(rewards.tolist(), 1e-6) for x in row]
    assert math.isclose(metrics["advantage_min"].item(), min(adv), rel_tol=1e-5)
    assert math.isclose(metrics["advantage_max"].item(), max(adv), rel_tol=1e-5)
    assert metrics["degenerate_group_frac"].item() == pytest.approx(1 / 3)
    # explicit normalizer
    loss_n, _ = grpo_loss(lp, lpb, mask, rewards, eps_low=eps_low, eps_high=eps_high, normalizer=100)
    assert math.isclose(loss_n.item(), ref * mask.sum().item() / 100, rel_tol=1e-10, abs_tol=1e-12)


def test_grpo_clip_fraction_constructed():
    # one group of two: A = +1 for seq 0, -1 for seq 1 (population std, eps 0)
    rewards = torch.tensor([[1.0, 0.0]])
    log_r = torch.log(torch.tensor([[[1.5, 1.1, 0.5, 1.0], [0.5, 0.9, 1.5, 1.0]]]))
    lpb = torch.zeros(1, 2, 4)
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1]]])
    # clipped (zero grad): seq0 tok0 (A>0, 1.5>1.2), seq1 tok0 (A<0, 0.5<0.8) -> 2 of 7 masked tokens
    # not clipped: ratio inside the range, or on the side where min() picks the unclipped term
    lp = log_r.clone().requires_grad_(True)
    loss, metrics = grpo_loss(lp, lpb, mask, rewards, adv_eps=0.0)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 7)
    loss.backward()
    g = lp.grad
    assert g[0, 0, 0] == 0 and g[0, 1, 0] == 0  # clipped -> no gradient
    assert g[0, 0, 3] == 0  # masked
    # unclipped: d/dlogp of -ratio*A / 7 = -ratio*A/7
    torch.testing.assert_close(g[0, 0, 2], torch.tensor(-0.5 / 7))
    torch.testing.assert_close(g[0, 1, 2], torch.tensor(1.5 / 7))
    # masked per-token losses -min(ratio*A, clip(ratio)*A), with A = +1 (seq 0) / -1 (seq 1):
    seq0 = [-1.2, -1.1, -0.5]  # tok0 clipped at 1 + eps_high; tok3 masked out
    seq1 = [0.8, 0.9, 1.5, 1.0]  # tok0 clipped at 1 - eps_low
    assert loss.item() == pytest.approx(sum(seq0 + seq1) / 7, rel=1e-6)


def test_grpo_on_policy_gradient():
    lp, _, mask, rewards = _batch(seed=1)
    lp = lp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(lp, lp.detach().clone(), mask, rewards)
    loss.backward()
    adv = torch.tensor(_adv_ref(rewards.tolist(), 1e-6), dtype=torch.float64)[:, :, None]
    expected = -adv * mask.double() / mask.sum().double()
    torch.testing.assert_close(lp.grad, expected, rtol=1e-10, atol=1e-14)
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_grpo_padding_with_inf_logprobs_is_ignored():
    lp, lpb, mask, rewards = _batch(seed=2)
    lp2, lpb2 = lp.clone(), lpb.clone()
    lp2[~mask] = float("-inf")
    lpb2[~mask] = float("-inf")
    loss, metrics = grpo_loss(lp2, lpb2, mask, rewards)
    ref, _ = grpo_loss(lp, lpb, mask, rewards)
    assert torch.isfinite(loss) and math.isclose(loss.item(), ref.item(), rel_tol=1e-12)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_grpo_input_validation():
    z = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(z, z, torch.ones(2, 3, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="eps_low"):
        grpo_loss(z, z, torch.ones(2, 3, 4), torch.zeros(2, 3), eps_low=-0.1)


def test_sequence_log_ratio_metric_matches_a_direct_sum():
    """abs_log_ratio_mean is the per-sequence |sum of token log-ratios| over the valid tokens, averaged
    over sequences (the key OAPL reports), so lag studies can plot GRPO's drift too."""
    torch.manual_seed(0)
    lp = torch.randn(2, 3, 5, dtype=torch.float64)
    lp_b = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.ones(2, 3, 5)
    mask[0, 1, 3:] = 0
    lp_b[0, 1, 3:] = float("-inf")  # padding may hold -inf behaviour log-probs
    _, metrics = grpo_loss(lp, lp_b, mask, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    want = torch.stack([((lp[p, g] - lp_b[p, g]) * mask[p, g]).nan_to_num().sum().abs()
                        for p in range(2) for g in range(3)]).mean()
    assert abs(metrics["abs_log_ratio_mean"].item() - want.item()) < 1e-5
