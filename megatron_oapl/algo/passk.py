"""Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code"): with n samples of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

and 1.0 when n - c < k. The product form is used (float64) because C(1024, k)
overflows a float long before n = 1024.
"""

from __future__ import annotations

from typing import Any, Union

import torch

__all__ = ["pass_at_k"]


def _as_int(name: str, v: Any) -> int:
    """Integer value of a python/numpy int (anything with __index__ except bool)."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise ValueError(f"{name} must be an int, got {name}={v!r}")
    return v.__index__()


def _scalar(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(n: int, c: Union[int, torch.Tensor, Any], k: int) -> Union[float, torch.Tensor, Any]:
    """Unbiased pass@k from ``n`` samples with ``c`` correct.

    Args:
        n: samples per problem (int >= 1).
        c: correct samples: a python int, or a torch tensor / numpy array of ints
            (vectorised, any shape).
        k: the k of pass@k, ``1 <= k <= n``.

    Returns:
        float for an int ``c``; float64 torch tensor for a tensor ``c``; float64 numpy
        array for a numpy ``c``. Raises ValueError unless ``0 <= c <= n``.
    """
    n, k = _as_int("n", n), _as_int("k", k)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    is_torch = isinstance(c, torch.Tensor)
    is_array = not is_torch and hasattr(c, "__array__") and getattr(c, "ndim", 0) > 0
    if not (is_torch or is_array):
        # python int, numpy integer scalar or 0-d array
        c = _as_int("c", c)
        if not 0 <= c <= n:
            raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
        return _scalar(n, c, k)

    ct = c if is_torch else torch.as_tensor(c)
    if ct.is_floating_point() or ct.is_complex() or ct.dtype == torch.bool:
        raise ValueError(f"c must hold integers, got dtype {ct.dtype}")
    ct = ct.to(device="cpu", dtype=torch.int64)
    if ct.numel() and (int(ct.min()) < 0 or int(ct.max()) > n):
        raise ValueError(
            f"need 0 <= c <= n, got n={n}, c in [{int(ct.min())}, {int(ct.max())}]"
        )
    # table[m] = prod_{i=n-m+1}^{n} (1 - k/i) for m = 0..n-k (the value for c = m);
    # the cumulative product accumulates the same factors as the scalar loop.
    i = torch.arange(n, k, -1, dtype=torch.float64)  # n, n-1, ..., k+1
    table = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - k / i, 0)])
    out = torch.ones(ct.shape, dtype=torch.float64)
    ok = ct <= n - k
    out[ok] = 1.0 - table[ct[ok]]
    if is_torch:
        return out.to(c.device)
    return out.numpy()
