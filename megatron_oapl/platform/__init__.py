"""Hardware platform: which device the learner runs on, and the CPU compatibility layer.

`activate()` is called exactly once, by the learner's distributed init. On a CUDA machine it does
nothing; without a GPU it installs `cpu.CudaOnCpu` so that unmodified Megatron-Core runs on gloo.
"""

from __future__ import annotations

import torch

_ACTIVE = None


def has_gpu() -> bool:
    return torch.cuda.is_available()


def activate() -> str:
    """Prepare the process for Megatron-Core and return the device type ("cuda" or "cpu")."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if has_gpu():
        _ACTIVE = "cuda"
    else:
        from megatron_oapl.platform import cpu

        cpu.install()
        _ACTIVE = "cpu"
    return _ACTIVE


def device() -> torch.device:
    """The device tensors should live on after `activate()`."""
    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")
