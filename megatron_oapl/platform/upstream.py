"""Megatron-Core slips that bite on every device, not only on CPU (the CPU layer in `cpu.py` calls these too)."""

from __future__ import annotations


def guard_missing_te_names() -> None:
    """Megatron's moe_utils imports `te_general_gemm` inside a try, but tests `te_general_gemm is not None`
    outside it: without Transformer Engine (CPU, or a GPU image without it) the name is missing and the
    router's gating raises NameError. Define it as None, which is what that test means."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
