"""The manager of a run's checkpoints: save each step's checkpoint, point `latest` at it, prune to
`keep_last`, and on start load the newest one that verifies.

    manager = CheckpointManager(run_dir, keep_last=2, config=cfg)   # every learner rank
    state = manager.load_latest(policy, ctx)                        # None on a fresh run
    manager.save(step, policy, ctx, state={...})                    # collective

`latest` moves only once the checkpoint it names is complete, and older ones are pruned only after
that (`files.py` has the layout, `save_load.py` the save itself). Loading checks the manifest before
trusting a checkpoint (rank 0 checks sizes, then the ranks share the hashing and rank 0 decides and
broadcasts); a missing, truncated or corrupted file makes that checkpoint refused with a logged message
naming the file, and the next older one is tried. When every checkpoint of a run is refused,
`load_latest` raises `CheckpointRefused` instead of letting the run start again from step 1 over them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from megatron_oapl.checkpoint.collective import broadcast, this_rank, verify_collective
from megatron_oapl.checkpoint.files import (
    CHECKPOINTS, LATEST, list_checkpoints, prune_checkpoints, remove_leftovers, resolve_checkpoint, write_atomic,
)
from megatron_oapl.checkpoint.save_load import load_checkpoint, save_checkpoint

log = logging.getLogger("oapl.checkpoint")


class CheckpointRefused(RuntimeError):
    """No checkpoint that should be loaded verifies; the message names the files and what to do."""


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
        if this_rank() == 0:
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
        if this_rank() == 0:  # no save is running: what interrupted saves and prunes left can go
            remove_leftovers(self.root)
        candidates = broadcast([str(p) for p in list_checkpoints(self.root)] if this_rank() == 0 else None)
        for i, ckpt in enumerate(map(Path, candidates)):
            problem = verify_collective(ckpt)
            if problem is None:
                return ckpt
            self.refused.append(f"checkpoint {ckpt} refused: {problem}")
            if this_rank() == 0:
                more = i + 1 < len(candidates)
                log.error("%s%s", self.refused[-1], "; falling back to the previous one" if more else "")
        if candidates and this_rank() == 0:
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
        if this_rank() == 0:
            try:
                found = str(resolve_checkpoint(path))
            except FileNotFoundError as err:  # every rank must raise it, not wait in the broadcast
                found = err
        found = broadcast(found)
        if isinstance(found, FileNotFoundError):
            raise CheckpointRefused(f"checkpoint.load={str(path)!r}: {found}")
        ckpt = Path(found)
        problem = verify_collective(ckpt)
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
