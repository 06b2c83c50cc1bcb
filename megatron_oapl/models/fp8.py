"""Map the run config's FP8 section onto Megatron-Core `TransformerConfig` fields.

Megatron applies the FP8 autocast inside `TransformerBlock` itself, so the learner never wraps the
forward again; all that is needed is the right config fields and Transformer Engine layers.
"""

from __future__ import annotations


def fp8_transformer_config_kwargs(fp8_cfg) -> dict:
    """TransformerConfig keyword arguments for `precision.fp8` (`fp8=None` when FP8 is off)."""
    if not fp8_cfg.enabled:
        return {"fp8": None}
    kwargs = {
        "fp8": fp8_cfg.format,  # 'e4m3' or 'hybrid' (E4M3 forward, E5M2 gradients)
        "fp8_recipe": fp8_cfg.recipe,
        "fp8_param": fp8_cfg.fp8_param,
        "first_last_layers_bf16": fp8_cfg.first_last_layers_bf16,
    }
    if fp8_cfg.recipe == "delayed":
        # Margin and amax history only exist for delayed scaling; TE silently drops them otherwise.
        kwargs.update(
            fp8_margin=fp8_cfg.margin,
            fp8_amax_history_len=fp8_cfg.amax_history_len,
            fp8_amax_compute_algo=fp8_cfg.amax_compute_algo,
        )
    return kwargs
