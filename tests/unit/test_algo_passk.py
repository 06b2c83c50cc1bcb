"""pass_at_k against the exact rational formula 1 - C(n-c, k) / C(n, k)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_oapl.algo import pass_at_k


def _exact(n, c, k):
    if n - c < k:
        return Fraction(1)
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_small_n_all_cases():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = pass_at_k(n, c, k)
                assert isinstance(got, float)
                assert got == pytest.approx(float(_exact(n, c, k)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("c", [0, 1, 3, 17, 100, 512, 1000, 1020, 1024])
@pytest.mark.parametrize("k", [1, 2, 5, 10, 64, 256, 1024])
def test_n_1024_against_fractions(c, k):
    n = 1024
    got = pass_at_k(n, c, k)
    ref = float(_exact(n, c, k))
    assert math.isfinite(got)
    assert got == pytest.approx(ref, rel=1e-11, abs=1e-14)


def test_edge_cases():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 4) == 1.0
    assert pass_at_k(16, 13, 4) == 1.0  # n - c < k
    for n, c in [(10, 3), (1024, 77), (7, 7), (5, 0)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-14, abs=0)


def test_monotone_in_k():
    for n, c in [(64, 1), (64, 10), (1024, 5), (1024, 300)]:
        vals = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(b >= a for a, b in zip(vals, vals[1:]))
        assert vals[-1] == 1.0


def test_vectorised_torch_and_numpy():
    n, k = 256, 10
    cs = [0, 1, 5, 100, 246, 247, 256]
    ref = [float(_exact(n, c, k)) for c in cs]
    t = pass_at_k(n, torch.tensor(cs), k)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.shape == (7,)
    torch.testing.assert_close(t, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    a = pass_at_k(n, np.array(cs).reshape(7, 1), k)
    assert isinstance(a, np.ndarray) and a.shape == (7, 1)
    np.testing.assert_allclose(a[:, 0], ref, rtol=1e-12, atol=1e-15)
    # the vector path agrees with the scalar path
    assert [pass_at_k(n, c, k) for c in cs] == pytest.approx(t.tolist(), rel=1e-14, abs=1e-15)


def test_validation():
    with pytest.raises(ValueError, match="c=11"):
        pass_at_k(10, 11, 1)
    with pytest.raises(ValueError, match="c=-1"):
        pass_at_k(10, -1, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(10, 3, 0)
    with pytest.raises(ValueError, match="k=11"):
        pass_at_k(10, 3, 11)
    with pytest.raises(ValueError, match="n=10"):
        pass_at_k(10, torch.tensor([0, 12]), 2)
    with pytest.raises(ValueError):
        pass_at_k(10, torch.tensor([0.5]), 2)
