"""A run's checkpoint files: layout, atomic writes, manifests with sha256, verification, pruning.

No Megatron and no process group: usable from any process (`oapl convert`, tests, the launcher).
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

Pruning renames a checkpoint to `trash-step_N` before deleting it, so a kill halfway through leaves a
`trash-` directory (deleted at the next start or save), never a `step_N` without its manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


def listed_files(root: Path) -> list[str]:
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
    problem = size_problem(root, entries)
    if problem is not None:
        return problem
    for entry in entries:
        if sha256_file(root / entry["path"]) != entry["sha256"]:
            return f"file {entry['path']} does not match its sha256 in the manifest (corrupted)"
    return None


def size_problem(ckpt_dir: Path, entries: list[dict]) -> str | None:
    for entry in entries:
        path = ckpt_dir / entry["path"]
        if not path.is_file():
            return f"file {entry['path']} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return (f"file {entry['path']} has {size} bytes, the manifest says {entry['size']} "
                    f"({'truncated' if size < entry['size'] else 'overwritten'})")
    return None


def manifest_problem(ckpt_dir: Path) -> tuple[str | None, list[dict]]:
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
    problem, entries = manifest_problem(ckpt_dir)
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


def previous_size(ckpt_root: Path) -> int | None:
    """Bytes of the newest complete checkpoint (from its manifest): what the next one will need, about."""
    for ckpt in list_checkpoints(ckpt_root):
        try:
            return sum(int(entry["size"]) for entry in read_manifest(ckpt)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def discard(ckpt: Path) -> None:
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
        discard(old)
        log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", old, keep_last)
    remove_leftovers(root)
    return removed
