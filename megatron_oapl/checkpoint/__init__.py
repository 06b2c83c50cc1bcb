"""Run checkpoints (atomic, verified, resharding) and Megatron <-> Hugging Face conversion.

    from megatron_oapl.checkpoint import CheckpointManager, install_signal_handlers

Names are resolved lazily, so `megatron_oapl.checkpoint.convert.add_convert_parser` can be imported by
the CLI without importing torch or Megatron (`oapl --help` stays instant).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "run_checkpoint",
    "CheckpointManager": "run_checkpoint",
    "CheckpointRefused": "run_checkpoint",
    "StopRequest": "run_checkpoint",
    "install_signal_handlers": "run_checkpoint",
    "list_checkpoints": "run_checkpoint",
    "load_checkpoint": "run_checkpoint",
    "load_model_weights": "run_checkpoint",
    "prune_checkpoints": "run_checkpoint",
    "read_meta": "run_checkpoint",
    "received_stop_signal": "run_checkpoint",
    "resolve_checkpoint": "run_checkpoint",
    "save_checkpoint": "run_checkpoint",
    "verify_checkpoint": "run_checkpoint",
    "hf_to_megatron": "convert",
    "megatron_to_hf": "convert",
    "add_convert_parser": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
