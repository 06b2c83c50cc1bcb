"""Run checkpoints (atomic, verified, resharding) and Megatron <-> Hugging Face conversion.

Importing this package does not import Megatron; `run_checkpoint` and `convert` import it lazily.
"""

from megatron_oapl.checkpoint.run_checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    StopRequest,
    install_signal_handlers,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointManager",
    "StopRequest",
    "install_signal_handlers",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "read_meta",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
