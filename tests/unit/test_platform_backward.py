"""The CPU platform layer acts inside autograd backward too (PEERS-PACKING-MOE.md §2.2 item 3).

Megatron's tensor-parallel mappings allocate with `device=torch.cuda.current_device()` inside
`autograd.Function.backward` (sequence parallelism's `_gather_along_first_dim`), and activation
recompute re-runs whole layers there. Before the fix the layer's TorchFunctionMode was missing in
backward and these calls failed with "Cannot access accelerator device when none is available".

The layer is process-global and irreversible, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is never installed with a GPU")

PRELUDE = textwrap.dedent(
    """
    import torch
    from megatron_oapl import platform
    assert platform.activate() == "cpu"

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.empty(x.shape, device=torch.cuda.current_device()).copy_(x)

        @staticmethod
        def backward(ctx, g):  # as Megatron's mappings allocate in backward
            return 2 * torch.empty(g.shape, device=torch.cuda.current_device()).copy_(g)
    """
)


def run_python(body: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cuda_allocations_in_backward_land_on_cpu():
    out = run_python(
        """
        x = torch.ones(3, requires_grad=True)
        Gather.apply(x).sum().backward()  # the reproduction of PEERS-PACKING-MOE.md
        assert x.grad.tolist() == [2.0, 2.0, 2.0], x.grad
        y = torch.ones(2, requires_grad=True)
        (g,) = torch.autograd.grad(Gather.apply(y).sum(), y)
        assert g.tolist() == [2.0, 2.0]
        z = torch.ones(2, requires_grad=True)
        torch.autograd.backward(Gather.apply(z).sum())
        assert z.grad.tolist() == [2.0, 2.0]
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_checkpoint_recompute_allocating_on_cuda_runs_in_backward():
    out = run_python(
        """
        from torch.utils.checkpoint import checkpoint

        def layer(x):  # recomputed during backward: its CUDA allocation must be redirected there too
            buf = torch.zeros(x.shape, device="cuda")
            return Gather.apply(x.tanh() + buf)

        for reentrant in (False, True):
            x = torch.linspace(-1, 1, 4, requires_grad=True)
            checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
            want = 2 * (1 - torch.linspace(-1, 1, 4).tanh() ** 2)
            torch.testing.assert_close(x.grad, want)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")
