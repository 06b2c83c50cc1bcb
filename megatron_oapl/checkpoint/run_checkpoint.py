"""Run checkpoints that survive crashes: Megatron distributed checkpoints + run state, written atomically.

Layout of `run_dir/checkpoints/`:

    latest                      text file naming the newest complete checkpoint ("step_30"); written last
    step_20/                    a complete checkpoint (kept: the last `keep_last` of them)
        dist/                   megatron.core.dist_checkpointing: model + optimizer sharded state
        rng/rank_00000.pt ...   per-rank RNG states (torch CPU / CUDA, Megatron tracker, random, numpy)
        meta.json               format version, step, save layout, scheduler state, the caller's run state
        config.yaml             the resolved run config (lets `oapl convert megatron-to-hf` build the model)
        manifest.json           every other file: relative path, size, sha256; written once all ranks are done
    tmp-step_30/                a save in progress (or interrupted by a crash): never loaded, removed later
    trash-step_10/              an old checkpoint being pruned (renamed first, then deleted): removed later

A save writes everything into `tmp-step_N`, barriers, hashes every file (the sha256 work is split over
the ranks, which read the shared directory; rank 0 gathers the digests), has rank 0 write
`manifest.json`, rename the directory to `step_N` (atomic on POSIX) and only then replace `latest`
(temp file + `os.replace`) and prune older checkpoints. A crash at any point leaves the previous
checkpoint intact. Pruning renames a checkpoint to `trash-step_N` before deleting it, so a kill halfway
through leaves a `trash-` directory (deleted at the next start or save), never a `step_N` without its
manifest. Saves are synchronous. All ranks must see one shared filesystem.

Loading checks the manifest before trusting a checkpoint (rank 0 checks sizes, then the ranks share the
hashing and rank 0 decides and broadcasts); a missing, truncated or corrupted file makes that
checkpoint refused with a logged message naming the file, and the next older one is tried. When every
checkpoint of a run is refused, `load_latest` raises `CheckpointRefused` instead of letting the run
start again from step 1 over them. The model
and optimizer state then come through Megatron's sharded state dicts, which
carry global shapes and offsets, so a checkpoint saved with one TP x PP x DP layout loads into another:

- model weights: any TP / PP / DP change;
- optimizer (Adam moments, fp32 main params, step): any TP / PP / DP change *with the same optimizer
  kind*. The plain Megatron optimizer keys its state by the model's sharded tensors; the distributed
  optimizer is saved in Megatron's `fully_reshardable` format, which maps every state tensor to the
  model parameter it belongs to (see `_optimizer_metadata` for why not the other formats). Switching
  `parallel.use_distributed_optimizer` between save and load is not attempted (the two kinds store
  different structures): the optimizer state is then skipped with a warning and the Adam moments
  restart from zero;
- RNG states: restored only when the layout (world size, TP, PP, DP) is the one that saved them;
- the LR scheduler: always (it is the same on every rank).

On CPU (torch's Adam, no Apex / Transformer Engine) megatron-core 0.16.1's distributed optimizer needs
three fixes to load at all and correctly; see `_distributed_optimizer_load_fixes`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from megatron_oapl.disk import StorageError, free_bytes, storage_cause
from megatron_oapl.procs import forked_children_die_with_this_process

log = logging.getLogger("oapl.checkpoint")

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
META = "meta.json"
CONFIG = "config.yaml"
DIST = "dist"
RNG = "rng"
TRASH_PREFIX = "trash-"
_STEP_RE = re.compile(r"^step_(\d+)$")
_HASH_CHUNK = 8 << 20  # 8 MiB reads: checkpoints can be far larger than memory


# --------------------------------------------------------------------------------------------------
# Files, hashes, manifests (no Megatron, no process group: usable from any process)
# --------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so a reader sees either the old or the new content, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _listed_files(root: Path) -> list[str]:
    """Every file under `root` except the manifest, as sorted POSIX relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def step_of(path: str | Path) -> int | None:
    match = _STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_manifest(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def check_files(ckpt_dir: str | Path, entries: Iterable[dict]) -> str | None:
    """The first problem among manifest `entries` (missing file, wrong size, wrong sha256), or None.
    Sizes first: a truncated file is found without hashing everything."""
    root, entries = Path(ckpt_dir), list(entries)
    problem = _size_problem(root, entries)
    if problem is not None:
        return problem
    for entry in entries:
        if sha256_file(root / entry["path"]) != entry["sha256"]:
            return f"file {entry['path']} does not match its sha256 in the manifest (corrupted)"
    return None


def _manifest_problem(ckpt_dir: Path) -> tuple[str | None, list[dict]]:
    """(problem with the manifest/meta themselves, the manifest's file entries)."""
    if not (ckpt_dir / MANIFEST).is_file():
        return f"{MANIFEST} is missing (the save did not complete)", []
    try:
        manifest = read_manifest(ckpt_dir)
        entries = list(manifest["files"])
    except (ValueError, KeyError, TypeError) as err:
        return f"file {MANIFEST} is unreadable ({err})", []
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return (f"format_version={version!r} in {MANIFEST} is newer than this code reads "
                f"(<= {FORMAT_VERSION}); upgrade megatron_oapl"), []
    if META not in {e["path"] for e in entries}:
        return f"{MANIFEST} does not list {META}", []
    return None, entries


def verify_checkpoint(ckpt_dir: str | Path) -> str | None:
    """Why the checkpoint at `ckpt_dir` cannot be trusted (naming the file), or None if it is intact."""
    ckpt_dir = Path(ckpt_dir)
    problem, entries = _manifest_problem(ckpt_dir)
    return problem or check_files(ckpt_dir, entries)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories (`step_N`), newest first. `tmp-*` saves are ignored."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p), reverse=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir, a `checkpoints/` root (its `latest`, else the
    newest `step_N`) or a run directory. Raises FileNotFoundError with what was looked for."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / META).is_file():
        return path
    for root in (path, path / CHECKPOINTS):
        if (root / LATEST).is_file():
            named = root / (root / LATEST).read_text().strip()
            if named.is_dir():
                return named
        found = list_checkpoints(root)
        if found:
            return found[0]
    raise FileNotFoundError(f"{path} holds no checkpoint (looked for {MANIFEST}, {LATEST}, step_N/ "
                            f"and {CHECKPOINTS}/)")


def read_meta(ckpt_dir: str | Path) -> dict:
    meta = json.loads((Path(ckpt_dir) / META).read_text())
    return _upgrade_meta(meta)


def _upgrade_meta(meta: dict) -> dict:
    """Patch older meta.json formats up to FORMAT_VERSION (none yet: version 1 is the first)."""
    version = meta.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"meta.json format_version={version} is newer than this code reads ({FORMAT_VERSION})")
    return meta


# --------------------------------------------------------------------------------------------------
# Signals: stop at a step boundary
# --------------------------------------------------------------------------------------------------


# Unix time (seconds) by which a run should checkpoint and stop; `oapl launch slurm --save-by` exports it.
SAVE_BY_ENV = "OAPL_SAVE_BY_EPOCH"


def save_by_deadline(environ=os.environ) -> float | None:
    """The OAPL_SAVE_BY_EPOCH deadline of this process's environment, or None."""
    text = environ.get(SAVE_BY_ENV, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{SAVE_BY_ENV}={text!r} must be a Unix time in seconds "
                         "(`oapl launch slurm --save-by MINUTES` sets it)") from None


@dataclass
class StopRequest:
    """Set by a signal handler, or due once `deadline` (Unix seconds) has passed; the training loop checks
    it at step boundaries, saves and exits. The deadline is how a job whose signals may not arrive (some
    container runtimes) still stops in time: checked at the same step boundaries as a signal."""

    requested: bool = False
    signum: int | None = None
    deadline: float | None = None
    _previous: dict = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        if not self.requested and self.deadline is not None and time.time() >= self.deadline:
            log.warning("%s=%.0f has passed: will save a checkpoint at the end of this step and exit",
                        SAVE_BY_ENV, self.deadline)
            self.requested = True
        return self.requested

    @property
    def reason(self) -> str:
        """What asked for the stop, for log lines: the signal's name or the deadline."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return f"the {SAVE_BY_ENV} deadline" if self.requested else "nothing"

    def agreed(self, group=None) -> bool:
        """Collective: True on every rank if any rank was signalled or is past the deadline (schedulers may
        signal only some ranks, node clocks differ, and all ranks must take the same save-and-exit branch)."""
        if not (dist.is_available() and dist.is_initialized()):
            return bool(self)
        flag = torch.tensor([1 if self else 0], dtype=torch.int32)
        if dist.get_backend(group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


_received: list[int] = []  # stop signals this process received (through any StopRequest's handler)


def received_stop_signal() -> int | None:
    """The first stop signal this process received, or None: lets a launcher tell a run that was stopped
    (checkpointed, resumable) from one that ran to its end."""
    return _received[0] if _received else None


def install_signal_handlers(signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)) -> StopRequest:
    """Make `signals` (SLURM's pre-timeout signal, a preemption's SIGTERM) set `.requested` instead of
    killing the process; the request also comes due at the environment's OAPL_SAVE_BY_EPOCH, if set.
    Call from the main thread of each rank."""
    stop = StopRequest(deadline=save_by_deadline())

    def handler(signum, frame):
        if not stop.requested:
            log.warning("received %s: will save a checkpoint at the end of this step and exit",
                        signal.Signals(signum).name)
        stop.requested, stop.signum = True, signum
        _received.append(signum)

    for signum in signals:
        stop._previous[signum] = signal.signal(signum, handler)
    return stop


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
    """'distributed' or 'plain': the two families whose sharded formats differ."""
    from megatron.core.optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "plain"


def _optimizer_has_state(optimizer) -> bool:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(getattr(o, "optimizer", None).state) > 0 for o in inner if getattr(o, "optimizer", None) is not None)


def _torch_adam_distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers of `optimizer` that run on torch's Adam (no Apex / Transformer Engine,
    e.g. on CPU): megatron-core 0.16.1's checkpoint code for them needs the fixes below."""
    from megatron.core.optimizer import DistributedOptimizer
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


@contextlib.contextmanager
def _distributed_optimizer_load_fixes(optimizer):
    """Work around three megatron-core 0.16.1 problems of the distributed optimizer on torch's Adam:

    1. `state_dict()` takes the step from the inner optimizer's per-parameter state and asserts there
       is exactly one value, so a fresh optimizer (no state before its first step) cannot build the
       sharded state dict to load into: give it the state torch Adam creates lazily (step 0, zero
       moments); the load overwrites all of it.
    2. `load_parameter_state_from_fully_reshardable` copies every key of the live state, `step`
       included, from the loaded tensors, which carry no `step` (it travels in the param groups):
       hide `step` during that copy.
    3. `load_state_dict` gives every parameter the *same* step tensor, which torch's Adam increments
       in place once per parameter: give each parameter its own copy afterwards.
    """
    fixed = _torch_adam_distributed_optimizers(optimizer)
    for opt in fixed:
        if len(opt.optimizer.state) == 0:
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    opt.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                              "exp_avg_sq": torch.zeros_like(p)}
        original = type(opt)._set_main_param_and_optimizer_states

        def set_states_without_step(model_param, tensors, _opt=opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                _original(_opt, model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states_without_step
    try:
        yield
    finally:
        for opt in fixed:
            opt.__dict__.pop("_set_main_param_and_optimizer_states", None)
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def _optimizer_metadata() -> dict:
    # The distributed optimizer's format. 'fully_reshardable' maps every state tensor to the model
    # parameter it belongs to (gathered over DP on save), so TP, PP and DP may all change. Megatron's
    # other choices do not work here: 'fully_sharded_model_space' (0.16.1's default) builds
    # ShardedTensors with `flattened_range`, which 0.16.1's ShardedTensor rejects on save, and
    # 'dp_reshardable' allows DP changes only. The gather is an all-gather over the DP group (Megatron's
    # default; `distrib_optim_fully_reshardable_mem_efficient` would gather on DP rank 0 over gloo
    # instead, slower but lighter on GPU memory).
    return {"distrib_optim_sharding_type": "fully_reshardable"}


# --------------------------------------------------------------------------------------------------
# Collective helpers (all no-ops without a process group)
# --------------------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list | None:
    """Objects of every rank on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * _world() if _rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _hash_shared(root: Path, rel_paths: list[str]) -> dict[str, str] | None:
    """sha256 of `rel_paths` (identical list on every rank), the work split over ranks; the result
    on rank 0. Hashing a checkpoint of hundreds of GB on one rank would stall the run."""
    mine = {rel: sha256_file(root / rel) for rel in rel_paths[_rank()::_world()]}
    parts = _gather(mine)
    return None if parts is None else {k: v for part in parts for k, v in part.items()}


def _verify_collective(ckpt: Path) -> str | None:
    """`verify_checkpoint` with the hashing shared by all ranks; the verdict is the same on every rank."""
    problem, entries = (None, [])
    if _rank() == 0:
        problem, entries = _manifest_problem(ckpt)
        if problem is None:
            problem = _size_problem(ckpt, entries)
    problem, entries = _broadcast((problem, entries))
    if problem is not None:
        return problem
    hashes = _hash_shared(ckpt, [e["path"] for e in entries])
    if _rank() == 0:
        bad = [e["path"] for e in entries if hashes[e["path"]] != e["sha256"]]
        if bad:
            problem = f"file {bad[0]} does not match its sha256 in the manifest (corrupted)"
    return _broadcast(problem)


def _size_problem(ckpt_dir: Path, entries: list[dict]) -> str | None:
    for entry in entries:
        path = ckpt_dir / entry["path"]
        if not path.is_file():
            return f"file {entry['path']} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return (f"file {entry['path']} has {size} bytes, the manifest says {entry['size']} "
                    f"({'truncated' if size < entry['size'] else 'overwritten'})")
    return None


# --------------------------------------------------------------------------------------------------
# One checkpoint directory: write (atomically) and read
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
    rank = _rank()
    if rank == 0:
        with _storage_errors_named(f"saving checkpoint {final.name}", tmp, final.parent):
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of an interrupted save of the same step
            (tmp / DIST).mkdir(parents=True)
            (tmp / RNG).mkdir()
    _barrier()

    optimizer = getattr(policy, "optimizer", None)
    scheduler = getattr(policy, "scheduler", None)
    # Adam's state appears at the first step: before it there is nothing to save, and a fresh
    # optimizer on load is exactly that state (Megatron's loader would expect moment tensors).
    with_optimizer = include_optimizer and optimizer is not None and _any_rank(_optimizer_has_state(optimizer))
    with_scheduler = include_optimizer and scheduler is not None
    sharded = model_sharded_state_dict(policy.model)
    if with_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=_optimizer_metadata())
    _writers_die_with_this_rank()
    with _storage_errors_named(f"saving checkpoint {final.name}", tmp, final.parent):
        dist_checkpointing.save(sharded, str(tmp / DIST))
        torch.save(_rng_state(), tmp / RNG / f"rank_{rank:05d}.pt")
        if rank == 0:
            _write_meta(tmp, step, ctx, optimizer, scheduler, with_optimizer, with_scheduler, state_json, config)
    # Every rank's files are on disk before the manifest is taken.
    _barrier()
    files = _broadcast(_listed_files(tmp) if rank == 0 else None)
    hashes = _hash_shared(tmp, files)
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
            _fsync_dir(final.parent)
            if on_complete is not None:
                on_complete(final)
        except Exception as err:  # noqa: BLE001 - every rank must learn about it, not just rank 0
            cause = storage_cause(err)
            error = (("storage", str(StorageError.from_os_error(cause, f"saving checkpoint {final.name}", tmp,
                                                                 _previous_size(final.parent))))
                     if cause is not None else ("other", f"{type(err).__name__}: {err}"))
    error = _broadcast(error)
    if error:
        kind, text = error
        if kind == "storage":
            raise StorageError(text)
        raise RuntimeError(f"saving checkpoint {final} failed on rank 0: {text}")
    if rank == 0:
        log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - started)
    return final


def _writers_die_with_this_rank() -> None:
    """Megatron's filesystem writer forks one writer process per file and collects their results through
    a queue served by a `spawn` Manager process, which it starts on the first save and never stops: a
    rank killed with SIGKILL left that process (and multiprocessing's resource tracker) running forever.
    Saves here are synchronous, so the queue is filled and read in this very process: an in-process
    queue does the same without a process. The forked writers die with this rank (procs.py)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    forked_children_die_with_this_process()
    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _previous_size(ckpt_root: Path) -> int | None:
    """Bytes of the newest complete checkpoint (from its manifest): what the next one will need, about."""
    for ckpt in list_checkpoints(ckpt_root):
        try:
            return sum(int(entry["size"]) for entry in read_manifest(ckpt)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


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
        raise StorageError.from_os_error(cause, action, path, _previous_size(ckpt_root)) from None


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
        if _rank() == 0:
            log.warning(
                "checkpoint %s has %s-optimizer state but this run uses the %s optimizer "
                "(parallel.use_distributed_optimizer changed): the optimizer state is not restored and "
                "the Adam moments restart from zero", ckpt, meta.get("optimizer_kind"), _optimizer_kind(optimizer))
        load_optimizer = False

    with _distributed_optimizer_load_fixes(optimizer) if load_optimizer else contextlib.nullcontext():
        sharded = model_sharded_state_dict(policy.model)
        if load_optimizer:
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                                metadata=_optimizer_metadata())
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

    rng_file = ckpt / RNG / f"rank_{_rank():05d}.pt"
    if saved == here and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    elif _rank() == 0 and "rng" in meta["contents"]:
        log.warning("checkpoint %s was saved with layout %s, this run is %s: RNG states are not restored "
                    "(they are per rank); weights, optimizer and scheduler are resharded", ckpt, saved, here)
    if _rank() == 0:
        log.info("loaded checkpoint %s (step %s)", ckpt, meta["step"])
    return meta


def _restore_scheduler(scheduler, saved: dict) -> None:
    """Megatron's scheduler adds the saved step count to its own: start from zero so that loading
    into a scheduler that already stepped does not double-count."""
    current = scheduler.state_dict()
    changed = {k: (saved[k], v) for k, v in current.items() if k != "num_steps" and k in saved and saved[k] != v}
    if changed and _rank() == 0:
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


# --------------------------------------------------------------------------------------------------
# The manager of a run's checkpoints
# --------------------------------------------------------------------------------------------------


class CheckpointRefused(RuntimeError):
    """No checkpoint that should be loaded verifies; the message names the files and what to do."""


def _discard(ckpt: Path) -> None:
    """Delete a checkpoint directory so that an interruption leaves nothing that looks like a checkpoint:
    renamed to `trash-<name>` first (atomic), then deleted."""
    trash = ckpt.with_name(TRASH_PREFIX + ckpt.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(ckpt, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(ckpt_root: str | Path) -> None:
    """Delete what interrupted saves and prunes left (`tmp-*`, `trash-*`). Only while no save runs."""
    root = Path(ckpt_root)
    if root.is_dir():
        for stale in [*root.glob("tmp-*"), *root.glob(TRASH_PREFIX + "*")]:
            shutil.rmtree(stale, ignore_errors=True)


def prune_checkpoints(ckpt_root: str | Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never `keep`), every `step_N` older
    than those that has no manifest (what a prune killed halfway left before prunes went through
    `trash-`: a save writes its manifest before the directory is named `step_N`), and the leftovers of
    interrupted saves and prunes. Returns the checkpoint directories removed."""
    root = Path(ckpt_root)
    found = list_checkpoints(root)
    complete = [p for p in found if (p / MANIFEST).is_file()]
    kept = complete[:keep_last]
    oldest_kept = min((step_of(p) for p in kept), default=None)
    removed = complete[keep_last:]
    if oldest_kept is not None:
        removed += [p for p in found if p not in complete and step_of(p) < oldest_kept]
    removed = [p for p in removed if p != keep]
    for old in removed:
        _discard(old)
        log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", old, keep_last)
    remove_leftovers(root)
    return removed


class CheckpointManager:
    """Atomic, verified, resharding run checkpoints under `run_dir/checkpoints`.

    Every learner rank constructs one and calls `save` / `load_latest` / `load` together (they are
    collective). `config` (a RunConfig or a plain dict) is written as `config.yaml` into every
    checkpoint, which is what `oapl convert megatron-to-hf` builds the model from.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2, config: Any = None):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last
        self.config = config
        self.refused: list[str] = []  # why checkpoints were refused by the last load_latest (rank 0)

    def save(self, step: int, policy, ctx, state: dict | None = None, *, include_optimizer: bool = True) -> Path:
        """Save the policy (model, optimizer, scheduler), per-rank RNG states and the run `state` as
        `checkpoints/step_<step>`; then point `latest` at it and prune to `keep_last`. Collective.

        `state` must be JSON-serialisable (step, policy version, lag schedule position, sampler
        position, metrics step, guard counters, ...); `load_latest` returns it as given.
        """
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(self.root / f"step_{step}", step, policy, ctx, state, config=self.config,
                               include_optimizer=include_optimizer, on_complete=self._complete)

    def _complete(self, final: Path) -> None:
        # `latest` moves only once the checkpoint it names is complete; older ones go only after that.
        write_atomic(self.root / LATEST, final.name + "\n")
        prune_checkpoints(self.root, self.keep_last, keep=final)

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose manifest, sizes and checksums check out. Collective; refused
        checkpoints are logged (naming the bad file) and listed in `self.refused`."""
        self.refused = []
        if _rank() == 0:  # no save is running: what interrupted saves and prunes left can go
            remove_leftovers(self.root)
        candidates = _broadcast([str(p) for p in list_checkpoints(self.root)] if _rank() == 0 else None)
        for i, ckpt in enumerate(map(Path, candidates)):
            problem = _verify_collective(ckpt)
            if problem is None:
                return ckpt
            self.refused.append(f"checkpoint {ckpt} refused: {problem}")
            if _rank() == 0:
                more = i + 1 < len(candidates)
                log.error("%s%s", self.refused[-1], "; falling back to the previous one" if more else "")
        if candidates and _rank() == 0:
            log.error("no intact checkpoint under %s", self.root)
        return None

    def load_latest(self, policy, ctx) -> dict | None:
        """Restore the newest intact checkpoint of this run into `policy`. Returns the run state given
        to `save` (plus `checkpoint_step` and `checkpoint_dir`), or None if there is none. Collective.
        Raises CheckpointRefused when checkpoints exist but none verifies: starting from step 1 would
        overwrite them, and the user may still recover one (or want a new run directory)."""
        found = self.latest_valid()
        if found is None and self.refused:
            raise CheckpointRefused(
                f"every checkpoint under {self.root} is damaged ({'; '.join(self.refused)}), and the run will not "
                f"start over from step 1 on top of them: resume from a checkpoint you trust with "
                f"checkpoint.load=PATH, or start a new run with run_dir=NEW_DIR (or move {self.root} away)")
        return None if found is None else self._load(found, policy, ctx)

    def load(self, path: str | Path, policy, ctx) -> dict:
        """Restore a given checkpoint (a checkpoint directory, a `checkpoints/` root or a run
        directory; e.g. `checkpoint.load` or the output of `oapl convert hf-to-megatron`). Collective;
        raises CheckpointRefused (a RuntimeError) if it does not verify."""
        found = None
        if _rank() == 0:
            try:
                found = str(resolve_checkpoint(path))
            except FileNotFoundError as err:  # every rank must raise it, not wait in the broadcast
                found = err
        found = _broadcast(found)
        if isinstance(found, FileNotFoundError):
            raise CheckpointRefused(f"checkpoint.load={str(path)!r}: {found}")
        ckpt = Path(found)
        problem = _verify_collective(ckpt)
        if problem is not None:
            raise CheckpointRefused(f"checkpoint.load={str(path)!r}: checkpoint {ckpt} refused: {problem}")
        return self._load(ckpt, policy, ctx)

    @staticmethod
    def _load(ckpt: Path, policy, ctx) -> dict:
        meta = load_checkpoint(ckpt, policy, ctx)
        out = dict(meta["state"])
        out.setdefault("checkpoint_step", meta["step"])
        out.setdefault("checkpoint_dir", str(ckpt))
        return out
