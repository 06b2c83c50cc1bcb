"""One checkpoint directory: save it atomically and load it into a policy, resharding on the way.

A save writes everything into `tmp-step_N`, barriers, hashes every file (the sha256 work is split over
the ranks, which read the shared directory; rank 0 gathers the digests), has rank 0 write
`manifest.json`, rename the directory to `step_N` (atomic on POSIX) and only then run the caller's
`on_complete` (the manager replaces `latest` and prunes). A crash at any point leaves the previous
checkpoint intact. Saves are synchronous. All ranks must see one shared filesystem.

The model and optimizer state come through Megatron's sharded state dicts, which carry global shapes
and offsets, so a checkpoint saved with one TP x PP x DP layout loads into another:

- model weights: any TP / PP / DP change;
- optimizer (Adam moments, fp32 main params, step): any TP / PP / DP change *with the same optimizer
  kind*. The plain Megatron optimizer keys its state by the model's sharded tensors; the distributed
  optimizer is saved in Megatron's `fully_reshardable` format, which maps every state tensor to the
  model parameter it belongs to (see `megatron_compat.optimizer_metadata` for why not the other
  formats). Switching `parallel.use_distributed_optimizer` between save and load is not attempted (the
  two kinds store different structures): the optimizer state is then skipped with a warning and the
  Adam moments restart from zero;
- RNG states: restored only when the layout (world size, TP, PP, DP) is the one that saved them;
- the LR scheduler: always (it is the same on every rank).

On CPU (torch's Adam, no Apex / Transformer Engine) megatron-core 0.16.1's distributed optimizer needs
three fixes to load at all and correctly; see `megatron_compat.distributed_optimizer_load_fixes`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from megatron_oapl.checkpoint.collective import any_rank, barrier, broadcast, hash_shared, this_rank
from megatron_oapl.checkpoint.files import (
    CONFIG, DIST, FORMAT_VERSION, MANIFEST, META, RNG, fsync_dir, listed_files, previous_size, read_meta, write_atomic,
)
from megatron_oapl.checkpoint.megatron_compat import (
    distributed_optimizer_load_fixes, optimizer_metadata, writers_die_with_this_rank,
)
from megatron_oapl.disk import StorageError, free_bytes, storage_cause
from megatron_oapl.learner.model import optimizer_parts

log = logging.getLogger("oapl.checkpoint")


# --------------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        # Plain types only, so the file loads with torch.load(weights_only=True).
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])


# --------------------------------------------------------------------------------------------------
# Sharded state dicts
# --------------------------------------------------------------------------------------------------


def _unwrap(chunk):
    """The GPTModel inside Megatron's DDP / Float16Module wrappers: checkpoint keys must not depend on
    the wrapping (as in Megatron-LM, which unwraps before building sharded state dicts)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def _model_keys(model_chunks: list) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_sharded_state_dict(model_chunks: list) -> dict:
    return {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model_chunks), model_chunks)}


def _layout(ctx) -> dict:
    return {"world_size": ctx.world_size, "tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}


def _optimizer_kind(optimizer) -> str:
    """'distributed' or 'plain' (the two families whose sharded formats differ), '+experts' when the expert
    parameters have their own part: Megatron splits them off only with EP > 1 (or expert-TP != TP), and the
    saved state is keyed per part, so EP 1 <-> EP > 1 cannot reshard it."""
    from megatron.core.optimizer import DistributedOptimizer

    inner = optimizer_parts(optimizer)
    kind = "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "plain"
    return kind + "+experts" if len(inner) > 1 else kind


def _optimizer_has_state(optimizer) -> bool:
    inner = optimizer_parts(optimizer)
    return any(len(getattr(o, "optimizer", None).state) > 0 for o in inner if getattr(o, "optimizer", None) is not None)


# --------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------


def _write_meta(tmp: Path, step: int, ctx, optimizer, scheduler, with_optimizer: bool, with_scheduler: bool,
                state_json: str, config: Any) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_at": time.time(),
        "layout": _layout(ctx),
        "contents": ["model"] + (["optimizer"] if with_optimizer else [])
        + (["scheduler"] if with_scheduler else []) + ["rng"],
        "optimizer_kind": _optimizer_kind(optimizer) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if with_scheduler else None,
        "state": json.loads(state_json),
    }
    write_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True))
    if config is not None:
        write_atomic(tmp / CONFIG, _config_yaml(config))


def save_checkpoint(final: str | Path, step: int, policy, ctx, state: dict | None = None, *, config: Any = None,
                    include_optimizer: bool = True, on_complete=None) -> Path:
    """Write one checkpoint directory `final` atomically (via `tmp-<name>` beside it). Collective.

    `policy` needs `.model` (model chunks); `.optimizer` / `.scheduler` may be None (model-only
    checkpoint, e.g. an HF import). `on_complete(final)` runs on rank 0 after the rename (pointer
    update, pruning); an error there is raised on every rank.
    """
    from megatron.core import dist_checkpointing

    state = dict(state or {})
    try:
        state_json = json.dumps(state)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint state must be JSON-serialisable: {err}") from None
    final = Path(final)
    tmp = final.with_name(f"tmp-{final.name}")
    started = time.perf_counter()
    rank = this_rank()
    if rank == 0:
        with _storage_errors_named(f"saving checkpoint {final.name}", tmp, final.parent):
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of an interrupted save of the same step
            (tmp / DIST).mkdir(parents=True)
            (tmp / RNG).mkdir()
    barrier()

    optimizer = getattr(policy, "optimizer", None)
    scheduler = getattr(policy, "scheduler", None)
    # Adam's state appears at the first step: before it there is nothing to save, and a fresh
    # optimizer on load is exactly that state (Megatron's loader would expect moment tensors).
    with_optimizer = include_optimizer and optimizer is not None and any_rank(_optimizer_has_state(optimizer))
    with_scheduler = include_optimizer and scheduler is not None
    sharded = model_sharded_state_dict(policy.model)
    if with_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=optimizer_metadata())
    writers_die_with_this_rank()
    with _storage_errors_named(f"saving checkpoint {final.name}", tmp, final.parent):
        dist_checkpointing.save(sharded, str(tmp / DIST))
        torch.save(_rng_state(), tmp / RNG / f"rank_{rank:05d}.pt")
        if rank == 0:
            _write_meta(tmp, step, ctx, optimizer, scheduler, with_optimizer, with_scheduler, state_json, config)
    # Every rank's files are on disk before the manifest is taken.
    barrier()
    files = broadcast(listed_files(tmp) if rank == 0 else None)
    hashes = hash_shared(tmp, files)
    error = None
    if rank == 0:
        try:
            entries = [{"path": rel, "size": (tmp / rel).stat().st_size, "sha256": hashes[rel]} for rel in files]
            manifest = {"format_version": FORMAT_VERSION, "step": step, "files": entries}
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                trash = final.with_name(f"tmp-old-{final.name}")
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            if on_complete is not None:
                on_complete(final)
        except Exception as err:  # noqa: BLE001 - every rank must learn about it, not just rank 0
            cause = storage_cause(err)
            error = (("storage", str(StorageError.from_os_error(cause, f"saving checkpoint {final.name}", tmp,
                                                                 previous_size(final.parent))))
                     if cause is not None else ("other", f"{type(err).__name__}: {err}"))
    error = broadcast(error)
    if error:
        kind, text = error
        if kind == "storage":
            raise StorageError(text)
        raise RuntimeError(f"saving checkpoint {final} failed on rank 0: {text}")
    if rank == 0:
        log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - started)
    return final


@contextlib.contextmanager
def _storage_errors_named(action: str, path: Path, ckpt_root: Path):
    """A write that failed for lack of space or permission becomes one StorageError line naming the path
    (and the size of the last checkpoint, about what this one needs), whatever wrapped it (Megatron's
    CheckpointException carries no message). The partial `tmp-` directory is never promoted."""
    try:
        yield
    except BaseException as err:  # torch's CheckpointException is a BaseException
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        cause = None if interrupted else storage_cause(err) or _disk_full_now(path)
        if cause is None:
            raise
        raise StorageError.from_os_error(cause, action, path, previous_size(ckpt_root)) from None


def _disk_full_now(path: Path) -> OSError | None:
    # Megatron's forked writers report their error only in a log line (their exception does not always
    # reach the caller), so when a write failed on a filesystem with no space left, that is the cause.
    free = free_bytes(path)
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if free is not None and free < (1 << 20) else None


def load_model_weights(model_chunks: list, ckpt_dir: str | Path) -> dict:
    """Load only the model weights of checkpoint `ckpt_dir` (any saving layout) into `model_chunks`
    (DDP-wrapped or bare GPTModels of this rank). Collective. Returns the checkpoint's meta."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(ckpt / DIST))
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    return meta


def load_checkpoint(ckpt_dir: str | Path, policy, ctx) -> dict:
    """Restore checkpoint `ckpt_dir` (already verified) into `policy`; returns its meta. Collective."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    saved, here = meta["layout"], _layout(ctx)
    optimizer, scheduler = policy.optimizer, policy.scheduler

    load_optimizer = "optimizer" in meta["contents"] and optimizer is not None
    if load_optimizer and meta.get("optimizer_kind") != _optimizer_kind(optimizer):
        if this_rank() == 0:
            log.warning(
                "checkpoint %s has %s-optimizer state but this run uses the %s optimizer "
                "(parallel.use_distributed_optimizer changed, or parallel.expert_model_parallel_size between 1 "
                "and more): the optimizer state is not restored and the Adam moments restart from "
                "zero", ckpt, meta.get("optimizer_kind"), _optimizer_kind(optimizer))
        load_optimizer = False

    with distributed_optimizer_load_fixes(optimizer) if load_optimizer else contextlib.nullcontext():
        sharded = model_sharded_state_dict(policy.model)
        if load_optimizer:
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                                metadata=optimizer_metadata())
        loaded = dist_checkpointing.load(sharded, str(ckpt / DIST))
        for key, chunk in zip(_model_keys(policy.model), policy.model):
            _unwrap(chunk).load_state_dict(loaded[key], strict=True)
        if load_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
    if not load_optimizer and optimizer is not None:
        # fp32 main copies (bf16/fp16 or distributed optimizer) must follow the loaded weights.
        optimizer.reload_model_params()
    if scheduler is not None and meta.get("scheduler"):
        _restore_scheduler(scheduler, meta["scheduler"])

    rng_file = ckpt / RNG / f"rank_{this_rank():05d}.pt"
    if saved == here and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    elif this_rank() == 0 and "rng" in meta["contents"]:
        log.warning("checkpoint %s was saved with layout %s, this run is %s: RNG states are not restored "
                    "(they are per rank); weights, optimizer and scheduler are resharded", ckpt, saved, here)
    if this_rank() == 0:
        log.info("loaded checkpoint %s (step %s)", ckpt, meta["step"])
    return meta


def _restore_scheduler(scheduler, saved: dict) -> None:
    """Megatron's scheduler adds the saved step count to its own: start from zero so that loading
    into a scheduler that already stepped does not double-count."""
    current = scheduler.state_dict()
    changed = {k: (saved[k], v) for k, v in current.items() if k != "num_steps" and k in saved and saved[k] != v}
    if changed and this_rank() == 0:
        log.warning("the LR schedule differs from the checkpoint's; the checkpoint's values win "
                    "(Megatron's use_checkpoint_opt_param_scheduler): %s",
                    ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in changed.items()))
    scheduler.num_steps = 0
    scheduler.load_state_dict(dict(saved))


def _config_yaml(config) -> str:
    import yaml

    from megatron_oapl.config import to_yaml

    if isinstance(config, dict):
        return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return to_yaml(config)
