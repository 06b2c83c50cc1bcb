"""OAPL objective (megatron_oapl.algo.oapl) against independent float64 / loop references."""

import math

import pytest
import torch

from megatron_oapl.algo import oapl_loss, v_star


def _v_star_ref(row, beta1):
    """log-mean-exp in float64 via math, shifted by the max (independent of torch.logsumexp)."""
    m = max(x / beta1 for x in row)
    s = sum(math.exp(x / beta1 - m) for x in row)
    return beta1 * (m + math.log(s / len(row)))


def _loss_ref(logp, logp_lag, rewards, beta1, beta2, normalizer=None):
    P, G = len(rewards), len(rewards[0])
    total = 0.0
    residuals = []
    for p in range(P):
        v = _v_star_ref(rewards[p], beta1)
        row = []
        for g in range(G):
            res = beta2 * (logp[p][g] - logp_lag[p][g]) - (rewards[p][g] - v)
            row.append(res)
            total += res * res
        residuals.append(row)
    return total / (normalizer if normalizer is not None else P * G), residuals


def _batch(P=4, G=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(P, G, generator=gen, dtype=torch.float64) * 50
    logp_lag = logp + torch.randn(P, G, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (P, G), generator=gen).double()
    rewards[0] = 1.0  # one degenerate group
    return logp, logp_lag, rewards


@pytest.mark.parametrize("beta1", [0.1, 1.0, 3.0])
def test_v_star_matches_float64_formula(beta1):
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(6, 7, generator=gen, dtype=torch.float64) * 3
    got = v_star(r, beta1)
    ref = torch.tensor([_v_star_ref(row, beta1) for row in r.tolist()], dtype=torch.float64)
    assert got.shape == (6,)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got32 = v_star(r.float(), beta1)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)


def test_v_star_limits():
    r = torch.tensor([[0.0, 1.0, 0.3, 0.7], [2.0, -1.0, 0.5, 0.5]], dtype=torch.float64)
    # beta1 -> 0: max minus beta1*ln(G / #argmax) -> within 1e-3 at beta1 = 1e-4.
    torch.testing.assert_close(v_star(r, 1e-4), r.max(-1).values, rtol=0, atol=1e-3)
    # beta1 -> inf: mean + O(var / beta1) -> within 1e-5 at beta1 = 1e6.
    torch.testing.assert_close(v_star(r, 1e6), r.mean(-1), rtol=0, atol=1e-5)
    # V* lies between mean and max for any beta1.
    for b in (0.01, 0.5, 5.0):
        v = v_star(r, b)
        assert torch.all(v >= r.mean(-1) - 1e-12) and torch.all(v <= r.max(-1).values + 1e-12)


def test_v_star_no_overflow():
    # r / beta1 = 1e4: exp overflows in log(mean(exp(.))) but not in logsumexp.
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    v = v_star(r, 1e-4)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, torch.tensor([1.0 - 1e-4 * math.log(4), 1.0]), rtol=0, atol=1e-5)
    big = torch.tensor([[1e6, -1e6, 3e5]])
    vb = v_star(big, 1.0)
    assert torch.isfinite(vb).all()
    torch.testing.assert_close(vb, torch.tensor([1e6 - math.log(3)]), rtol=1e-6, atol=0)
    # large rewards AND small beta1 (r / beta1 = 1e10) in float32: exact for an all-equal group
    same = v_star(torch.full((1, 8), 1e6), 1e-4)
    assert same.item() == 1e6
    # bf16/fp16 input is upcast: fp16 alone would overflow at r/beta1 = 1e4.
    for dt in (torch.bfloat16, torch.float16):
        vh = v_star(r.to(dt), 1e-4)
        assert vh.dtype == torch.float32 and torch.isfinite(vh).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_v_star_rejects_bad_beta1(bad):
    with pytest.raises(ValueError, match="beta1"):
        v_star(torch.zeros(2, 3), bad)


def test_oapl_loss_matches_loop_reference():
    logp, logp_lag, rewards = _batch()
    beta1, beta2 = 0.7, 0.05
    loss, metrics = oapl_loss(logp, logp_lag, rewards, beta1, beta2)
    ref, residuals = _loss_ref(logp.tolist(), logp_lag.tolist(), rewards.tolist(), beta1, beta2)
    assert loss.dim() == 0
    assert math.isclose(loss.item(), ref, rel_tol=1e-12)
    flat = [x for row in residuals for x in row]
    assert math.isclose(metrics["residual_mean"].item(), sum(flat) / len(flat), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(
        metrics["residual_abs_mean"].item(), sum(abs(x) for x in flat) / len(flat), rel_tol=1e-5
    )
    lr = (logp - logp_lag).flatten().tolist()
    assert math.isclose(metrics["log_ratio_mean"].item(), sum(lr) / len(lr), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(metrics["abs_log_ratio_mean"].item(), sum(map(abs, lr)) / len(lr), rel_tol=1e-5)
    adv = [rewards[p][g].item() - _v_star_ref(rewards[p].tolist(), beta1)
           for p in range(rewards.shape[0]) for g in range(rewards.shape[1])]
    mean = sum(adv) / len(adv)
    std = math.sqrt(sum((a - mean) ** 2 for a in adv) / len(adv))
    assert math.isclose(metrics["advantage_mean"].item(), mean, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(metrics["advantage_std"].item(), std, rel_tol=1e-5)
    assert math.isclose(metrics["advantage_min"].item(), min(adv), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(metrics["advantage_max"].item(), max(adv), rel_tol=1e-5, abs_tol=1e-6)
    vs = [_v_star_ref(row, beta1) for row in rewards.tolist()]
    assert math.isclose(metrics["v_star_mean"].item(), sum(vs) / len(vs), rel_tol=1e-5)
    for v in metrics.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad


def test_oapl_gradient_is_two_beta2_residual_over_n():
    logp, logp_lag, rewards = _batch(P=3, G=4, seed=2)
    logp = logp.clone().requires_grad_(True)
    logp_lag = logp_lag.clone().requires_grad_(True)  # must be treated as constant
    rewards = rewards.clone().requires_grad_(True)  # must be treated as constant
    beta1, beta2 = 1.0, 1e-3
    loss, _ = oapl_loss(logp, logp_lag, rewards, beta1, beta2)
    loss.backward()
    _, residuals = _loss_ref(logp.tolist(), logp_lag.tolist(), rewards.tolist(), beta1, beta2)
    expected = 2 * beta2 * torch.tensor(residuals, dtype=torch.float64) / (3 * 4)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-10, atol=1e-15)
    assert logp_lag.grad is None and rewards.grad is None


def test_oapl_float32_and_bf16_logp():
    logp, logp_lag, rewards = _batch(seed=3)
    ref, _ = _loss_ref(logp.tolist(), logp_lag.tolist(), rewards.tolist(), 1.0, 0.1)
    loss32, _ = oapl_loss(logp.float(), logp_lag.float(), rewards.float(), 1.0, 0.1)
    assert loss32.dtype == torch.float32
    assert math.isclose(loss32.item(), ref, rel_tol=1e-5)
    lp16 = logp.bfloat16().requires_grad_(True)
    loss16, _ = oapl_loss(lp16, logp_lag.bfloat16(), rewards.bfloat16(), 1.0, 0.1)
    assert loss16.dtype == torch.float32
    loss16.backward()
    assert lp16.grad is not None and lp16.grad.dtype == torch.bfloat16


def test_oapl_global_normalizer_microbatches_sum_to_full_batch():
    logp, logp_lag, rewards = _batch(P=6, G=4, seed=4)
    beta1, beta2 = 1.0, 0.2
    full, _ = oapl_loss(logp, logp_lag, rewards, beta1, beta2)
    n_global = logp.numel()
    a, _ = oapl_loss(logp[:2], logp_lag[:2], rewards[:2], beta1, beta2, normalizer=n_global)
    b, _ = oapl_loss(logp[2:], logp_lag[2:], rewards[2:], beta1, beta2, normalizer=n_global)
    assert math.isclose((a + b).item(), full.item(), rel_tol=1e-12)
    # and the default (local mean) of a half is NOT the same thing
    a_local, _ = oapl_loss(logp[:2], logp_lag[:2], rewards[:2], beta1, beta2)
    assert math.isclose(a_local.item() * 8 / n_global, a.item(), rel_tol=1e-12)
    # tensor normalizer works too
    t, _ = oapl_loss(logp, logp_lag, rewards, beta1, beta2, normalizer=torch.tensor(float(n_global)))
    assert math.isclose(t.item(), full.item(), rel_tol=1e-12)


def test_oapl_degenerate_group_fraction():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.50001]])
    z = torch.zeros_like(rewards)
    _, metrics = oapl_loss(z, z, rewards, 1.0, 0.1)
    assert metrics["degenerate_group_frac"].item() == pytest.approx(0.5)
    assert metrics["kept_seq_frac"].item() == pytest.approx(1.0)


def test_oapl_zero_log_ratio_and_equal_rewards_gives_zero_loss():
    logp = (-torch.rand(3, 4) * 10).requires_grad_(True)
    rewards = torch.tensor([[0.3] * 4, [1.0] * 4, [0.0] * 4])
    loss, metrics = oapl_loss(logp, logp.detach().clone(), rewards, 1.0, 1e-3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logp.grad == 0)
    assert metrics["degenerate_group_frac"].item() == 1.0
    assert metrics["advantage_max"].item() == pytest.approx(0.0, abs=1e-6)


def test_oapl_filter_degenerate():
    logp, logp_lag, rewards = _batch(P=4, G=5, seed=5)
    rewards[0] = 1.0
    rewards[1] = 0.0
    rewards[2, 0], rewards[2, 1] = 0.0, 1.0
    rewards[3, 0], rewards[3, 1] = 1.0, 0.0
    beta1, beta2 = 1.0, 0.1
    lp = logp.clone().requires_grad_(True)
    loss, metrics = oapl_loss(lp, logp_lag, rewards, beta1, beta2, filter_degenerate=True)
    ref, _ = _loss_ref(logp[2:].tolist(), logp_lag[2:].tolist(), rewards[2:].tolist(), beta1, beta2)
    assert math.isclose(loss.item(), ref, rel_tol=1e-12)  # mean over the 10 kept sequences
    loss.backward()
    assert torch.all(lp.grad[:2] == 0) and torch.all(lp.grad[2:] != 0)
    assert metrics["kept_seq_frac"].item() == pytest.approx(0.5)
    assert metrics["degenerate_group_frac"].item() == pytest.approx(0.5)
    # explicit normalizer is used unchanged
    loss_n, _ = oapl_loss(logp, logp_lag, rewards, beta1, beta2, normalizer=20, filter_degenerate=True)
    assert math.isclose(loss_n.item(), ref * 10 / 20, rel_tol=1e-12)
    # all groups degenerate: zero loss, still differentiable, no nan
    lp2 = logp[:2].clone().requires_grad_(True)
    loss0, _ = oapl_loss(lp2, logp_lag[:2], rewards[:2], beta1, beta2, filter_degenerate=True)
    assert loss0.item() == 0.0
    loss0.backward()
    assert torch.all(lp2.grad == 0)


def test_oapl_input_validation():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta2"):
        oapl_loss(z, z, z, 1.0, 0.0)
    with pytest.raises(ValueError, match="beta1"):
        oapl_loss(z, z, z, -1.0, 0.1)
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        oapl_loss(z, z, torch.zeros(3, 2), 1.0, 0.1)
    with pytest.raises(ValueError, match="normalizer"):
        oapl_loss(z, z, z, 1.0, 0.1, normalizer=0)
