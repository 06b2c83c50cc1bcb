"""The file side of run checkpoints (no ranks needed: manifests, pruning and refusal are plain file I/O):
pruning that survives a kill, and a run whose every checkpoint is damaged refusing to start over."""

from __future__ import annotations

import json

import pytest

from megatron_oapl.checkpoint import CheckpointManager, CheckpointRefused, prune_checkpoints
from megatron_oapl.checkpoint.files import FORMAT_VERSION, sha256_file


def _checkpoint(root, step: int, manifest: bool = True):
    """A checkpoint directory as a save leaves it: meta.json, a shard, and the manifest hashing them."""
    ckpt = root / f"step_{step}"
    (ckpt / "dist").mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step}))
    (ckpt / "dist" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    if manifest:
        files = [{"path": p, "size": (ckpt / p).stat().st_size, "sha256": sha256_file(ckpt / p)}
                 for p in ("dist/__0_0.distcp", "meta.json")]
        (ckpt / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step,
                                                        "files": files}))
    return ckpt


def test_a_prune_killed_halfway_leaves_nothing_that_stays(tmp_path):
    root = tmp_path / "checkpoints"
    # What an older version left when killed while deleting step_1: the manifest gone, other files not.
    _checkpoint(root, 1, manifest=False)
    for step in (2, 3, 4):
        _checkpoint(root, step)
    # What this version leaves when killed while deleting (renamed first), and an interrupted save.
    (root / "trash-step_0" / "dist").mkdir(parents=True)
    (root / "tmp-step_5").mkdir()
    removed = prune_checkpoints(root, keep_last=2, keep=root / "step_4")
    assert sorted(p.name for p in removed) == ["step_1", "step_2"]
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]


def test_leftovers_of_a_killed_prune_go_at_the_next_start(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 3)
    (root / "trash-step_2" / "dist").mkdir(parents=True)
    assert CheckpointManager(tmp_path).latest_valid() == root / "step_3"
    assert sorted(p.name for p in root.iterdir()) == ["step_3"]


def test_a_run_whose_every_checkpoint_is_damaged_refuses_to_start_over(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        shard = _checkpoint(root, step) / "dist" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])  # truncated
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointRefused) as refused:
        manager.load_latest(policy=None, ctx=None)  # before any weight is touched
    message = str(refused.value)
    assert "step_4" in message and "step_2" in message and "dist/__0_0.distcp has 100 bytes" in message
    assert "checkpoint.load=PATH" in message and "run_dir=NEW_DIR" in message
    assert (root / "step_4").is_dir() and (root / "step_2").is_dir()  # nothing was deleted


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    (tmp_path / "checkpoints" / "tmp-step_1").mkdir(parents=True)  # a first save that was interrupted
    assert CheckpointManager(tmp_path).load_latest(policy=None, ctx=None) is None


def test_a_checkpoint_load_path_without_a_checkpoint_names_the_field(tmp_path):
    with pytest.raises(CheckpointRefused, match=r"^checkpoint.load='.*nowhere': .*nowhere holds no checkpoint"):
        CheckpointManager(tmp_path).load(str(tmp_path / "nowhere"), policy=None, ctx=None)
