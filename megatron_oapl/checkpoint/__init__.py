"""Run checkpoints (atomic, verified, resharding) and Megatron <-> Hugging Face conversion.

    files.py            the checkpoint directory's layout, manifests, verification, pruning (no Megatron)
    stop.py             signals and the --save-by deadline: stop at a step boundary
    collective.py       the collectives the save and the load share (no-ops in a single process)
    megatron_compat.py  shims around megatron-core 0.16.1's checkpointing
    save_load.py        save one checkpoint directory atomically; load it, resharding
    run_checkpoint.py   CheckpointManager: a run's checkpoints (latest, pruning, refusing damaged ones)
    convert.py          `oapl convert`

    from megatron_oapl.checkpoint import CheckpointManager, install_signal_handlers

Names are resolved lazily, so `megatron_oapl.checkpoint.convert.add_convert_parser` can be imported by
the CLI without importing torch or Megatron (`oapl --help` stays instant).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "files",
    "list_checkpoints": "files",
    "prune_checkpoints": "files",
    "read_meta": "files",
    "resolve_checkpoint": "files",
    "verify_checkpoint": "files",
    "StopRequest": "stop",
    "install_signal_handlers": "stop",
    "received_stop_signal": "stop",
    "load_checkpoint": "save_load",
    "load_model_weights": "save_load",
    "save_checkpoint": "save_load",
    "CheckpointManager": "run_checkpoint",
    "CheckpointRefused": "run_checkpoint",
    "hf_to_megatron": "convert",
    "megatron_to_hf": "convert",
    "add_convert_parser": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
