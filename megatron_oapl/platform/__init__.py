"""Hardware platform: which device the learner runs on, and the CPU compatibility layer.

`activate()` is called exactly once, by the learner's distributed init. On a CUDA machine it only defines
one name Megatron's MoE code reads without Transformer Engine; without a GPU it installs `cpu.CudaOnCpu` so
that unmodified Megatron-Core runs on gloo.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import torch

_TE_PROBE_TIMEOUT_S = 300

_ACTIVE = None


def has_gpu() -> bool:
    return torch.cuda.is_available()


def activate() -> str:
    """Prepare the process for Megatron-Core and return the device type ("cuda" or "cpu")."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if has_gpu():
        from megatron_oapl.platform.upstream import guard_missing_te_names

        guard_missing_te_names()  # an upstream slip that a GPU image without Transformer Engine meets too
        _ACTIVE = "cuda"
    else:
        from megatron_oapl.platform import cpu

        cpu.install()
        _ACTIVE = "cpu"
    return _ACTIVE


def device() -> torch.device:
    """The device tensors should live on after `activate()`."""
    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")


@functools.cache
def transformer_engine_problem() -> str | None:
    """One line when Transformer Engine is installed but cannot be imported, else None.

    Megatron-Core guards its TE imports with `except ModuleNotFoundError` only, so a TE that is present
    but broken (e.g. undefined symbols after pip replaced the torch it was built against) makes
    `import megatron.core` itself fail, deep inside an unrelated module. The probe imports what
    Megatron imports in a child interpreter (same sys.path): loading TE's CUDA libraries here could
    initialise CUDA in a process that forks later, and a crash of the probe is still an answer.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        probe = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], env=env,
                               capture_output=True, text=True, timeout=_TE_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"transformer_engine is installed but importing it took over {_TE_PROBE_TIMEOUT_S} s"
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    error = lines[-1] if lines else f"exit status {probe.returncode}"
    return (f"transformer_engine is installed but fails to import: {error}; the learner image needs "
            f"Transformer Engine built against this torch ({torch.__version__}), e.g. the NGC PyTorch "
            "image with vLLM kept out of it (or uninstall transformer_engine)")
